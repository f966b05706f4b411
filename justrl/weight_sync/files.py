"""The portable transport: every engine reloads the version's HF directory in place."""
from __future__ import annotations

from pathlib import Path

from justrl.weight_sync.base import Transport


class FileTransport(Transport):
    """Today's portable sync: every engine reloads the HF directory in place."""

    name = "files"
    uses_learner_state = False

    def push(self, fleet, weights_dir: Path, step: int, state=None) -> None:
        fleet.load_weights(weights_dir)
