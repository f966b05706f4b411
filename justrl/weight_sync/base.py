"""What a weight transport is, and the errors of a sync. One file per transport beside this one
(files.py, nccl.py); justrl.weight_sync.sync owns the order of a sync and picks the transport."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path


class WeightSyncError(RuntimeError):
    """An engine does not serve the learner's weights after a sync."""


class EnginePushError(WeightSyncError):
    """An engine died, refused or stalled during an NCCL push; `engines` names the ones whose
    copy of the weights is unknown (WeightSync restarts them and reloads the files)."""

    def __init__(self, message: str, engines: list[str]):
        super().__init__(message)
        self.engines = engines


class Transport(ABC):
    """How a new version reaches the engines. `push` is called on learner rank 0 after the version's
    directory is written; `state` is the learner's HF-named weights on rank 0 when
    `uses_learner_state` (else None). `engine_args` are the extra vLLM server arguments it needs."""

    name = ""
    uses_learner_state = False
    engine_args: tuple[str, ...] = ()

    @abstractmethod
    def push(self, fleet, weights_dir: Path, step: int, state=None) -> None:
        """Make every live engine of `fleet` serve the version in `weights_dir` (or `state`)."""

    def close(self, fleet) -> None:
        """Release what the transport holds (called once, at the end of the run)."""
