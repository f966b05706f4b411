"""The HTTP client of one vLLM server (justrl.rollout.engine starts the servers).

Every engine is vLLM's OpenAI-compatible server (`vllm.entrypoints.openai.api_server`) with its
development endpoints on (`VLLM_SERVER_DEV_MODE=1`). `EngineClient` talks to it with these calls:

- `POST /v1/completions` with `prompt` = token ids and `return_token_ids` = true: one request per
  prompt asking for n samples with a per-prompt seed; back come the response token ids (the EOS
  token included when the model stopped) and `finish_reason` ("length": cut at the limit).
- `POST /collective_rpc` `justrl_reload_weights(weights_path=<dir of safetensors>)`: vLLM's
  `reload_weights` plus the repair of tied output layers (justrl.rollout.vllm_worker): the weights
  in place (no restart, no re-allocation of the KV cache), then `POST /reset_prefix_cache` so that
  no KV block computed with the old weights is reused. This is the portable weight sync: the
  learner writes HF safetensors to the run directory on a filesystem every engine sees. vLLM's
  NCCL weight transfer (justrl.weight_sync.nccl) is the fast path on GPUs.
- `GET /health`.
- colocated (cluster.placement): `POST /sleep?level=1` after a step's rollouts, `POST
  /wake_up?tags=weights` before its weights are pushed, `POST /wake_up?tags=kv_cache` after
  (justrl.rollout.phases owns the order).

Every request carries the run's secret (justrl.rollout.auth) in the session's headers.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from justrl.rollout.auth import auth_headers

log = logging.getLogger(__name__)

SERVED_MODEL_NAME = "policy"
# Concurrent HTTP requests per engine: enough to keep vLLM's scheduler full (it batches them).
MAX_IN_FLIGHT_PER_ENGINE = 256


class EngineError(RuntimeError):
    """An engine could not start, died, or answered with an error."""


class EngineRequestError(EngineError):
    """The engine refused a request (HTTP 4xx): a bug in the request, not a dead engine, so it
    is raised at once instead of restarting the engine."""


@dataclass(frozen=True)
class SamplingSettings:
    """What one generation call asks of vLLM (training rollouts or validation)."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int


@dataclass(frozen=True)
class Completion:
    """One sampled response."""

    token_ids: tuple[int, ...]
    """Response token ids, ending with the EOS token when the model stopped by itself."""
    truncated: bool
    """True when the response was cut at the token limit (finish_reason "length")."""


class EngineClient:
    """HTTP client of one running vLLM server. `secret`: the engine's (justrl.rollout.auth), sent
    on every request of `session`; anything else that talks to the engine uses this session."""

    def __init__(self, url: str, request_timeout_s: float = 3600.0, secret: str | None = None):
        self.url = url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        # Engine traffic stays inside the cluster: clusters often export http_proxy, and requests
        # would send `node:8100` through it. trust_env=False ignores the environment's proxies
        # (and netrc); the pool holds as many connections as requests in flight.
        self.session = requests.Session()
        self.session.trust_env = False
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=MAX_IN_FLIGHT_PER_ENGINE)
        self.session.mount("http://", adapter)
        if secret:
            self.session.headers.update(auth_headers(secret))

    def health_status(self) -> int | None:
        """The HTTP status of `/health`; None when nothing answers."""
        try:
            return self.session.get(f"{self.url}/health", timeout=5).status_code
        except requests.RequestException:
            return None

    def healthy(self) -> bool:
        return self.health_status() == 200

    def _post(self, path: str, payload: dict | None = None) -> dict:
        """POST `payload`; a connection that fails while the server is healthy (a pooled connection
        it had closed) is retried once on a new one. Every justrl request may run twice: seeded
        sampling gives the same samples, and a reload or a cache reset is idempotent."""
        url = f"{self.url}{path}"
        for attempt in range(2):
            try:
                response = self.session.post(url, json=payload, timeout=self.request_timeout_s)
                break
            except requests.RequestException as exc:
                dropped = isinstance(exc, requests.ConnectionError) and attempt == 0
                if not (dropped and self.healthy()):
                    raise EngineError(f"{url}: {type(exc).__name__}: {exc}") from exc
                log.warning("%s: %s on a healthy server; retrying once", url, exc)
        if response.status_code != 200:
            kind = EngineRequestError if 400 <= response.status_code < 500 else EngineError
            raise kind(f"{url}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else {}

    def complete(self, prompt_ids: list[int], settings: SamplingSettings, seed: int) -> list[Completion]:
        """`settings.n` responses to one prompt; sample i uses seed `seed + i` (vLLM's rule)."""
        body = self._post("/v1/completions", {
            "model": SERVED_MODEL_NAME,
            "prompt": [list(prompt_ids)],
            "n": settings.n,
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
            "seed": seed,
            "return_token_ids": True,
            "skip_special_tokens": False,
        })
        choices = sorted(body["choices"], key=lambda c: c["index"])
        if len(choices) != settings.n or any(c.get("token_ids") is None for c in choices):
            raise EngineError(f"{self.url}: asked for {settings.n} responses with token ids, got "
                              f"{len(choices)} ({[sorted(c) for c in choices[:1]]})")
        return [Completion(tuple(c["token_ids"]), c["finish_reason"] == "length") for c in choices]

    def complete_many(self, prompts: list[list[int]], settings: SamplingSettings,
                      seeds: list[int]) -> list[list[Completion]]:
        """Many prompts at once (concurrent requests; vLLM batches them)."""
        workers = max(1, min(MAX_IN_FLIGHT_PER_ENGINE, len(prompts)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda args: self.complete(args[0], settings, args[1]), zip(prompts, seeds)))

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode (`POST /sleep?level=`, a dev-mode route; vLLM 0.32's
        entrypoints/serve/dev/sleep/api_router.py): the scheduler pauses (requests in flight are
        aborted: call it between steps), and level 1 offloads the weights to host memory and
        frees the KV cache (gpu_worker.sleep; the CPU worker logs "not supported" and keeps both)."""
        self._post(f"/sleep?level={level}")

    def wake_up(self, tags: tuple[str, ...] = ()) -> bool:
        """`POST /wake_up?tags=...` (no tags: everything); True when the engine is fully awake
        (every tag resident again: the scheduler resumes then, not before)."""
        query = "&".join(f"tags={t}" for t in tags)
        return self._post("/wake_up" + (f"?{query}" if query else "")).get("status") == "awake"

    def is_sleeping(self) -> bool:
        """`GET /is_sleeping`: asleep at any level (the scheduler paused, or memory released)."""
        try:
            response = self.session.get(f"{self.url}/is_sleeping", timeout=self.request_timeout_s)
        except requests.RequestException as exc:
            raise EngineError(f"{self.url}/is_sleeping: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise EngineError(f"{self.url}/is_sleeping: HTTP {response.status_code}: {response.text[:300]}")
        return bool(response.json()["is_sleeping"])

    def load_weights(self, weights_dir: str | Path) -> None:
        """Reload the model's weights in place from a directory of HF safetensors."""
        self._post("/collective_rpc", {"method": "justrl_reload_weights",
                                       "kwargs": {"weights_path": str(Path(weights_dir).resolve())}})
        self._post("/reset_prefix_cache")
