"""What a weight transport is, and the errors of a sync. One file per transport beside this one
(files.py, nccl.py, ipc.py); justrl.weight_sync.sync owns the order of a sync and picks the transport."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """An engine does not serve the learner's weights after a sync."""


class EnginePushError(WeightSyncError):
    """An engine died, refused or stalled during an NCCL or IPC push; `engines` names the ones whose
    copy of the weights is unknown (WeightSync restarts them and reloads the files)."""

    def __init__(self, message: str, engines: list[str]):
        super().__init__(message)
        self.engines = engines


class Transport(ABC):
    """How a new version reaches the engines. `push` is called on learner rank 0 after the version's
    directory is written (on every rank when `every_rank`; `fleet` is None off rank 0); `state` is
    the learner's HF-named weights when `uses_learner_state` (else None): rank 0's, or each rank's
    own with `every_rank`. `engine_args` and `engine_env` are the extra vLLM server arguments and
    environment it needs."""

    name = ""
    uses_learner_state = False
    every_rank = False
    engine_args: tuple[str, ...] = ()
    engine_env: tuple[tuple[str, str], ...] = ()

    @abstractmethod
    def push(self, fleet, weights_dir: Path, step: int, state=None) -> None:
        """Make every live engine of `fleet` serve the version in `weights_dir` (or `state`)."""

    def close(self, fleet) -> None:
        """Release what the transport holds (called once, at the end of the run)."""


def post_route(engine, path: str, payload: dict | None, timeout_s: float) -> None:
    """POST one of vLLM's weight-transfer routes through the engine's own session (trust_env=False,
    so a cluster's http_proxy never sees node:port; it carries the engine's secret,
    justrl.rollout.auth). Raises WeightSyncError naming the engine on any answer but 200."""
    response = engine.client.session.post(f"{engine.client.url}{path}", json=payload, timeout=timeout_s)
    if response.status_code != 200:
        raise WeightSyncError(f"{engine.name} {path}: HTTP {response.status_code}: {response.text[:500]}")


def shutdown_transfer_engines(fleet, timeout_s: float) -> None:
    """`/shutdown_weight_transfer_engine` on every live engine; a failure is logged, not raised
    (the run is ending)."""
    import requests

    for engine in fleet.live_engines:
        if engine.alive():
            try:
                post_route(engine, "/shutdown_weight_transfer_engine", None, timeout_s)
            except (requests.RequestException, WeightSyncError) as exc:
                log.warning("%s: shutting the weight transfer down failed: %s", engine.name, exc)
