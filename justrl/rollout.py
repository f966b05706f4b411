"""Rollout engines: real vLLM servers driven token-in/token-out over HTTP.

Every engine is vLLM's OpenAI-compatible server (`vllm.entrypoints.openai.api_server`) with its
development endpoints on (`VLLM_SERVER_DEV_MODE=1`). The controller talks to it with three calls:

- `POST /v1/completions` with `prompt` = token ids and `return_token_ids` = true: one request per
  prompt asking for n samples with a per-prompt seed; back come the response token ids (the EOS
  token included when the model stopped) and `finish_reason` ("length": cut at the limit).
- `POST /collective_rpc` `justrl_reload_weights(weights_path=<dir of safetensors>)`: vLLM's
  `reload_weights` plus the repair of tied output layers (justrl.vllm_worker): the weights in place
  (no restart, no re-allocation of the KV cache), then `POST /reset_prefix_cache`
  so that no KV block computed with the old weights is reused. This is the portable weight sync:
  the learner writes HF safetensors to the run directory on a filesystem every engine sees.
  vLLM's NCCL weight transfer (`/init_weight_transfer_engine`, `/update_weights`) is the fast path
  on GPUs; it would replace `EngineClient.load_weights` and nothing else.
- `GET /health`.

The same client serves engines started here (`LocalEngine`: a subprocess of the controller, logs in
the run directory) and engines started elsewhere (an srun step on another node): only how an
engine is started and restarted differs. `RolloutFleet` sends each prompt's request to the
least-loaded live engine, restarts an engine that died mid-step and retries only the requests it
had outstanding, a bounded number of times.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

# CPU engines' extra vLLM arguments, added where the server starts (justrl.engine_launch).
from justrl.engine_launch import CPU_ENGINE_ARGS  # noqa: F401

log = logging.getLogger(__name__)

SERVED_MODEL_NAME = "policy"
# Mixed into every engine's vLLM worker; the file weight sync calls its justrl_reload_weights.
WORKER_EXTENSION = "justrl.vllm_worker.ReloadExtension"
# Concurrent HTTP requests per engine: enough to keep vLLM's scheduler full (it batches them).
MAX_IN_FLIGHT_PER_ENGINE = 256
# Lines of an engine's log quoted in an error message.
LOG_TAIL_LINES = 30


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
    """HTTP client of one running vLLM server."""

    def __init__(self, url: str, request_timeout_s: float = 3600.0):
        self.url = url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        # Engine traffic stays inside the cluster: clusters often export http_proxy, and requests
        # would send `node:8100` through it. trust_env=False ignores the environment's proxies
        # (and netrc); the pool holds as many connections as requests in flight.
        self.session = requests.Session()
        self.session.trust_env = False
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=MAX_IN_FLIGHT_PER_ENGINE)
        self.session.mount("http://", adapter)

    def healthy(self) -> bool:
        try:
            return self.session.get(f"{self.url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def _post(self, path: str, payload: dict | None = None) -> dict:
        try:
            response = self.session.post(f"{self.url}{path}", json=payload, timeout=self.request_timeout_s)
        except requests.RequestException as exc:
            raise EngineError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            kind = EngineRequestError if 400 <= response.status_code < 500 else EngineError
            raise kind(f"{self.url}{path}: HTTP {response.status_code}: {response.text[:500]}")
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

    def load_weights(self, weights_dir: str | Path) -> None:
        """Reload the model's weights in place from a directory of HF safetensors."""
        self._post("/collective_rpc", {"method": "justrl_reload_weights",
                                       "kwargs": {"weights_path": str(Path(weights_dir).resolve())}})
        self._post("/reset_prefix_cache")


def _ignore_preemption_signals() -> None:
    """Run in the engine's process before exec: Slurm and submitit send their pre-emption
    signals (SIGUSR1/SIGUSR2) to every process of the job, and their default action would kill
    the server mid-step; the training loop handles them. Ignored dispositions survive exec."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def engine_srun_command(spec: EngineSpec) -> list[str]:
    """The srun prefix of a remote engine: a step of the running job on `spec.node` that
    overlaps the learner's step (shares its CPUs, memory and GPUs), holds all of the job's GPUs
    and CPUs on that node and all its memory, and binds no CPUs (engines and learner ranks on one
    node would otherwise be pinned to the same cores)."""
    cmd = ["srun", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={spec.node}", "--export=ALL",
           "--mem=0", "--cpu-bind=none", "--kill-on-bad-exit=1"]
    if spec.node_gpus:
        cmd.append(f"--gres=gpu:{spec.node_gpus}")
    if spec.node_cpus:
        cmd.append(f"--cpus-per-task={spec.node_cpus}")
    return [*cmd, *spec.srun_args]


def engine_cpu_shares(engines: int, cpus: list[int] | None = None) -> list[tuple[int, ...]]:
    """Each of `engines` local CPU engines' cores: contiguous, disjoint shares of this process's
    usable cores (`os.sched_getaffinity`); with more engines than cores, engines share cores
    round-robin. vLLM's own automatic binding would give every engine of the machine the same
    first cores."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else list(cpus)
    if engines <= 0 or not cpus:
        return [() for _ in range(max(engines, 0))]
    if engines > len(cpus):
        return [(cpus[i % len(cpus)],) for i in range(engines)]
    return [tuple(cpus[len(cpus) * i // engines:len(cpus) * (i + 1) // engines]) for i in range(engines)]


def engine_thread_env(spec: "EngineSpec") -> dict[str, str]:
    """The engine's thread settings, chosen by justrl and never inherited from the user's
    `OMP_NUM_THREADS` (a cluster's `OMP_NUM_THREADS=16` made CPU rollouts 4x slower: the API
    server and engine-core processes spun 16 OpenMP threads against the worker).

    CPU engine: its API server and engine core do no heavy math (1 thread); the worker computes
    on the engine's cores (`VLLM_CPU_OMP_THREADS_BIND`, vLLM then runs one OpenMP thread per
    core) less the last one, left to the server and scheduler as vLLM's own binding does
    (`reserve_cpu_num`); a one-core share is the worker's. GPU or remote engine: nothing set (the
    caller drops `OMP_NUM_THREADS`), so vLLM picks its workers' thread count itself
    (vllm.v1.executor.multiproc_executor)."""
    if spec.gpu_ids or spec.node:
        return {}
    env = {"OMP_NUM_THREADS": "1"}
    if spec.cpu_ids:
        worker = spec.cpu_ids[:-1] if len(spec.cpu_ids) > 1 else spec.cpu_ids
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, worker))
    return env


def _group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group `pgid` (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":  # fields[2]: pgrp, fields[0]: state
                members.append(int(entry))
    return members


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class EngineSpec:
    """How to start one local vLLM server."""

    max_model_len: int
    dtype: str
    seed: int
    tensor_parallel_size: int = 1
    gpu_ids: tuple[int, ...] = ()
    """CUDA devices of this engine; empty: vLLM's CPU build."""
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gb: int = 1
    extra_args: tuple[str, ...] = ()
    node: str | None = None
    """Run the server on this node of the Slurm job (an `srun --overlap` step); None: here."""
    port: int | None = None
    """Fixed port (remote engines); None: a free port of this machine."""
    srun_args: tuple[str, ...] = ()
    """Extra srun arguments for remote engines."""
    node_gpus: int = 0
    """GPUs the job holds on `node`: the engine's srun step asks for all of them (--overlap steps
    share them) and justrl.engine_launch narrows them to `gpu_ids` inside the step."""
    node_cpus: int = 0
    """CPUs the job holds on `node`, all of them given to the (overlapping) engine step; 0: srun's default."""
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 3600.0
    cpu_ids: tuple[int, ...] = ()
    """This machine's cores the engine's vLLM worker computes on (a local CPU engine; see
    `engine_cpu_shares`); empty: vLLM's own choice."""


class LocalEngine:
    """A vLLM server that justrl starts and stops: a subprocess of this machine, or, when
    `spec.node` is set, an `srun --overlap` step of the current Slurm job on that node (the srun
    process is the subprocess; stopping it stops the remote server).

    Its stdout and stderr go to `log_path`, appended across restarts.
    """

    def __init__(self, name: str, spec: EngineSpec, log_path: str | Path):
        self.name = name
        self.spec = spec
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self.client: EngineClient | None = None

    def start(self, model_dir: str | Path) -> None:
        """Start serving `model_dir` and wait until the server answers /health."""
        spec = self.spec
        port = spec.port or free_port()
        host = spec.node or "127.0.0.1"
        # justrl.engine_launch runs where the server runs (inside the srun step for a remote
        # engine): it sets CUDA_VISIBLE_DEVICES to the planned GPUs there, because slurmstepd
        # overwrites what we export with the step's GRES; it picks CPU or GPU vLLM arguments,
        # logs the hostname and devices the server sees, and execs the server.
        cmd = [sys.executable, "-m", "justrl.engine_launch", "--gpus", ",".join(map(str, spec.gpu_ids)),
               "--cpu-kv-cache-gb", str(spec.cpu_kv_cache_gb), "--",
               "--model", str(model_dir), "--served-model-name", SERVED_MODEL_NAME,
               "--host", "0.0.0.0" if spec.node else "127.0.0.1", "--port", str(port), "--dtype", spec.dtype,
               "--max-model-len", str(spec.max_model_len), "--seed", str(spec.seed),
               "--tensor-parallel-size", str(spec.tensor_parallel_size),
               "--gpu-memory-utilization", str(spec.gpu_memory_utilization),
               "--worker-extension-cls", WORKER_EXTENSION, *spec.extra_args]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # see engine_thread_env
        env.update(VLLM_SERVER_DEV_MODE="1", **engine_thread_env(spec))
        if spec.node:
            cmd = [*engine_srun_command(spec), *cmd]
        # The guard takes the server down if this process dies without cleaning up (kill -9).
        cmd = [sys.executable, "-m", "justrl.engine_guard", str(os.getpid()), "--", *cmd]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== justrl: starting {self.name}: {' '.join(cmd)}\n".encode())
            out.flush()
            # A session of its own, so that stop() takes vLLM's engine-core children down with it.
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=_ignore_preemption_signals)
        self.client = EngineClient(f"http://{host}:{port}", spec.request_timeout_s)
        deadline = time.monotonic() + spec.startup_timeout_s
        while not self.client.healthy():
            if self.process.poll() is not None:
                raise EngineError(f"{self.name} exited with code {self.process.returncode} while starting "
                                  f"(log: {self.log_path}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(f"{self.name} did not answer /health within {spec.startup_timeout_s:.0f} s "
                                  f"(log: {self.log_path}):\n{self.log_tail()}")
            time.sleep(0.5)
        log.info("%s serving %s at %s (pid %d)", self.name, model_dir, self.client.url, self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def can_freeze(self) -> bool:
        """Only a CPU engine on this machine competes with the learner for its cores."""
        return self.spec.node is None and not self.spec.gpu_ids

    def freeze(self) -> None:
        """Stop the engine's processes (SIGSTOP) so that they use no CPU while the learner trains.

        Why signals and not vLLM's endpoints: on the CPU build (0.32) `/sleep` is a no-op
        (CPUWorker.sleep logs "sleep mode is not supported on CPU"), and `/pause` only holds the
        scheduler, while the worker keeps spinning on its shared-memory queue for
        `busy_loop_s` = 1 s after each read (vllm/distributed/device_communicators/shm_broadcast.py,
        SpinCondition) and the API server's event loop keeps running. The guard process (the group
        leader, see justrl.engine_guard) is left running, so that it still takes the engine down if
        this process dies; SIGKILL ends stopped processes too."""
        if self.can_freeze() and self.alive():
            for pid in _group_members(self.process.pid):
                if pid != self.process.pid:
                    _signal(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Continue a frozen engine (SIGCONT; harmless on a running one)."""
        if self.can_freeze() and self.alive():
            try:
                os.killpg(self.process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def process_tree_cpu_seconds(self) -> float:
        """User + system CPU seconds of the engine's processes (read from /proc/<pid>/stat)."""
        return sum(_cpu_seconds(pid) for pid in _group_members(self.process.pid)) if self.process else 0.0

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            os.killpg(self.process.pid, signal.SIGCONT)  # a frozen engine (see `freeze`) acts on it
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])


class RolloutFleet:
    """The step's rollout engines: dispatches requests to them, reloads weights, restarts the dead.

    `weights_dir` is the directory the engines serve now (the model at start, then each step's
    synced weights); an engine that is restarted comes back serving it.

    Dispatch (`generate`): one request = one prompt's n samples. Requests wait in a queue here and
    each goes to the live engine with the fewest outstanding requests (ties: the lowest index),
    at most `max_requests_per_engine` outstanding per engine. The cap matters: vLLM batches up to
    `--max-num-seqs` sequences and queues the rest inside the engine, where a request can no longer
    move to an engine that frees up first; holding the surplus here lets an engine that drew
    short responses take more, so the engine that draws the long tails does not hold up the step
    with work queued behind them (the "least-loaded worker" idea of veRL's and SGLang's routers).
    When an engine fails, its outstanding requests, and only those, go back to the front of the
    queue and run on another engine or on it once restarted; each prompt keeps its seed, so the
    results do not depend on where or how often a request ran.
    """

    def __init__(self, engines: list[LocalEngine], weights_dir: str | Path, max_restarts: int = 2,
                 max_requests_per_engine: int = MAX_IN_FLIGHT_PER_ENGINE):
        if not engines:
            raise ValueError("a rollout fleet needs at least one engine")
        if max_requests_per_engine < 1:
            raise ValueError(f"max_requests_per_engine must be >= 1, got {max_requests_per_engine}")
        self.engines = engines
        self.weights_dir = Path(weights_dir)
        self.max_restarts = max_restarts
        self.max_requests_per_engine = max_requests_per_engine
        self.restarts = 0
        self.last_dispatch: DispatchRecord | None = None
        # Busy time per engine (seconds with at least one outstanding request), for
        # perf/engine_idle_fraction; read by another thread while a generate call runs.
        self._busy_lock = threading.Lock()
        self._busy_total = [0.0] * len(engines)
        self._busy_since: list[float | None] = [None] * len(engines)

    def start(self) -> None:
        with ThreadPoolExecutor(max_workers=len(self.engines)) as pool:
            list(pool.map(lambda e: e.start(self.weights_dir), self.engines))

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()

    def freeze(self) -> None:
        """The local CPU engines stop using CPU until `thaw` (the learner trains meanwhile)."""
        for engine in self.engines:
            engine.freeze()

    def thaw(self) -> None:
        for engine in self.engines:
            engine.thaw()

    def busy_seconds(self) -> list[float]:
        """Cumulative seconds each engine had at least one request outstanding (ongoing included)."""
        now = time.monotonic()
        with self._busy_lock:
            return [total + (now - since if since is not None else 0.0)
                    for total, since in zip(self._busy_total, self._busy_since)]

    def _set_busy(self, index: int, busy: bool) -> None:
        now = time.monotonic()
        with self._busy_lock:
            since = self._busy_since[index]
            if busy and since is None:
                self._busy_since[index] = now
            elif not busy and since is not None:
                self._busy_total[index] += now - since
                self._busy_since[index] = None

    def _restart(self, engine: LocalEngine, error: Exception) -> None:
        self.restarts += 1
        log.warning("%s failed (%s); restarting it from %s", engine.name, error, self.weights_dir)
        engine.stop()
        engine.start(self.weights_dir)

    def _give_up(self, engine: LocalEngine, failures: int, error: Exception) -> EngineError:
        times = f"{failures} time{'s' if failures > 1 else ''}"
        return EngineError(f"{engine.name} failed {times} in a row; giving up "
                           f"(rollout.max_restarts={self.max_restarts}). Last error: {error}\n"
                           f"log {engine.log_path}:\n{engine.log_tail()}")

    def _on_engine(self, engine: LocalEngine, work):
        """Run `work(client)`; if the engine dies, restart it and retry, `max_restarts` times."""
        for attempt in range(self.max_restarts + 1):
            try:
                if not engine.alive():
                    raise EngineError(f"{engine.name} is not running (exit code "
                                      f"{engine.process.returncode if engine.process else None})")
                return work(engine.client)
            except EngineRequestError:
                raise
            except EngineError as exc:
                if attempt == self.max_restarts:
                    raise self._give_up(engine, attempt + 1, exc) from exc
                self._restart(engine, exc)

    def generate(self, prompts: list[list[int]], settings: SamplingSettings | list[SamplingSettings],
                 seeds: list[int]) -> list[list[Completion]]:
        """`n` completions per prompt; prompt i is sampled with seed `seeds[i]` and
        `settings` (or `settings[i]` when a list is given: per-prompt limits, e.g. benchmarks).

        Requests are dispatched to the least-loaded live engine (see the class docstring). An
        engine that fails is restarted in the background (up to `max_restarts` times in a row; a
        completed request resets its count) while the others go on; only its outstanding requests
        are retried. `last_dispatch` records where every request ran.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        per_prompt = list(settings) if isinstance(settings, (list, tuple)) else [settings] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling settings")
        engines, cap = self.engines, self.max_requests_per_engine
        results: list[list[Completion] | None] = [None] * len(prompts)
        record = DispatchRecord([[] for _ in prompts], [None] * len(prompts), [], [])
        self.last_dispatch = record
        queue_ = deque(range(len(prompts)))
        outstanding: list[set[int]] = [set() for _ in engines]
        restarting = [False] * len(engines)
        failures = [0] * len(engines)
        # Bumped when an engine is marked failed: a request sent to the engine before that
        # (its process is gone) is requeued when its error arrives, without counting again.
        generation = [0] * len(engines)
        done: queue.Queue = queue.Queue()  # (kind, engine index, request index, payload)
        remaining = len(prompts)
        pool = ThreadPoolExecutor(max_workers=cap * len(engines) + len(engines),
                                  thread_name_prefix="justrl-rollout")

        def request(e: int, i: int, gen: int) -> None:
            try:
                done.put(("done", e, i, engines[e].client.complete(prompts[i], per_prompt[i], seeds[i])))
            except BaseException as exc:  # noqa: BLE001 - handed to the dispatcher thread
                done.put(("error", e, i, (gen, exc)))

        def restart(e: int, error: Exception) -> None:
            try:
                self._restart(engines[e], error)
                done.put(("restarted", e, None, None))
            except BaseException as exc:  # noqa: BLE001
                done.put(("restart_failed", e, None, exc))

        def engine_failed(e: int, error: Exception) -> None:
            """Mark engine e down (once per failure) and restart it, or give up."""
            if restarting[e]:
                return
            failures[e] += 1
            generation[e] += 1
            record.failures.append(engines[e].name)
            if failures[e] > self.max_restarts:
                raise self._give_up(engines[e], failures[e], error) from error
            restarting[e] = True
            pool.submit(restart, e, error)

        try:
            while remaining:
                # Dispatch while a live engine has room.
                while queue_:
                    for e, engine in enumerate(engines):
                        if not restarting[e] and not engine.alive():
                            engine_failed(e, EngineError(
                                f"{engine.name} is not running (exit code "
                                f"{engine.process.returncode if engine.process else None})"))
                    live = [e for e in range(len(engines)) if not restarting[e] and len(outstanding[e]) < cap]
                    if not live:
                        break
                    e = min(live, key=lambda e: (len(outstanding[e]), e))
                    i = queue_.popleft()
                    outstanding[e].add(i)
                    record.attempts[i].append(engines[e].name)
                    self._set_busy(e, True)
                    pool.submit(request, e, i, generation[e])
                kind, e, i, payload = done.get()
                if kind == "done":
                    outstanding[e].discard(i)
                    results[i] = payload
                    record.engine_of[i] = engines[e].name
                    failures[e] = 0
                    remaining -= 1
                elif kind == "error":
                    gen, error = payload
                    outstanding[e].discard(i)
                    if isinstance(error, EngineRequestError) or not isinstance(error, EngineError):
                        raise error
                    record.retried.append(i)
                    queue_.appendleft(i)
                    if gen == generation[e]:
                        engine_failed(e, error)
                elif kind == "restarted":
                    restarting[e] = False
                else:  # restart_failed: the start itself failed; count it and try again
                    if isinstance(payload, EngineRequestError) or not isinstance(payload, EngineError):
                        raise payload
                    restarting[e] = False
                    engine_failed(e, payload)
                if not outstanding[e]:
                    self._set_busy(e, False)
        finally:
            for e in range(len(engines)):
                self._set_busy(e, False)
            # On an error, do not wait for requests still running on other engines.
            pool.shutdown(wait=not remaining, cancel_futures=True)
        return results

    def load_weights(self, weights_dir: str | Path, engines: list[LocalEngine] | None = None) -> None:
        """Every engine (or those given) reloads its weights from `weights_dir` (in place)."""
        self.weights_dir = Path(weights_dir)
        targets = self.engines if engines is None else engines
        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            list(pool.map(lambda e: self._on_engine(e, lambda c: c.load_weights(self.weights_dir)), targets))


@dataclass
class DispatchRecord:
    """Where the requests of one `generate` call ran (request i = prompt i)."""

    attempts: list[list[str]]
    """Engines request i was sent to, in order (more than one: it was retried)."""
    engine_of: list[str | None]
    """The engine whose answer was kept."""
    retried: list[int]
    """Request indices sent back to the queue because their engine failed (with repeats)."""
    failures: list[str]
    """Engine names, once per failure seen (each one restarted)."""
