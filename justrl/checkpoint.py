"""Atomic checkpoints in the run directory, and finding the one to resume from.

    <run>/checkpoints/step_000050/      one complete checkpoint
        hf/                             learner=hf: the weights as an HF directory (float32
                                        master weights): config.json, model.safetensors,
                                        tokenizer; transformers and vLLM load it as it is
        optimizer.pt                    learner=hf: optimizer and schedule state
        megatron/                       learner=megatron: a Megatron distributed checkpoint
                                        (model, distributed optimizer, schedule position);
                                        tools/merge_checkpoint.py turns it into an HF directory
        hf_config/                      learner=megatron: config.json and tokenizer for the merge
        trainer_state.pt                step, sampler position, RNG states, counters
        config.yaml                     the run's whole configuration
        COMPLETE                        written last: the checkpoint is whole
    <run>/checkpoints/latest            the name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp/` and renamed to `step_N/` only once every file is on
disk (and `COMPLETE` written); then `latest` is replaced atomically. A crash at any point leaves
the previous checkpoint and the `latest` pointer as they were; the stale `.tmp` directory is
removed at the next save.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
RUN_CONFIG = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin_checkpoint(checkpoint_root: str | Path, step: int) -> Path:
    """The empty `step_N.tmp/` directory to write checkpoint `step` into (a stale one from a
    crashed save is removed first)."""
    root = Path(checkpoint_root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (step_dir_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finish_checkpoint(checkpoint_root: str | Path, step: int, keep: int | None = None) -> Path:
    """Mark `step_N.tmp/` complete, rename it to `step_N/`, point `latest` at it, and delete all
    but the newest `keep` complete checkpoints (None keeps all)."""
    root = Path(checkpoint_root)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    (tmp / COMPLETE).write_text(json.dumps({"step": step}) + "\n")
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. a rerun): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    pointer_tmp = root / (LATEST + ".tmp")
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)
    if keep is not None:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    return final


def save_checkpoint(checkpoint_root: str | Path, step: int, write: Callable[[Path], None],
                    keep: int | None = None) -> Path:
    """Write checkpoint `step` atomically in one process; `write(tmp_dir)` writes its files.
    (Collective writers call `begin_checkpoint`, write from every rank, then `finish_checkpoint`.)"""
    tmp = begin_checkpoint(checkpoint_root, step)
    write(tmp)
    return finish_checkpoint(checkpoint_root, step, keep)


def complete_checkpoints(checkpoint_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir() and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_root: str | Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names, if complete; otherwise (pointer
    missing or damaged) the complete checkpoint with the highest step; None if there is none."""
    root = Path(checkpoint_root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _STEP_DIR.match(named.name) and is_complete(named):
            return named
        log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one",
                    pointer, named.name)
    found = complete_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    return json.loads((Path(path) / COMPLETE).read_text())["step"]


# -- the run directory and the trainer's part of a checkpoint -------------------------------------

@dataclass(frozen=True)
class RunDir:
    """Where a run's files go; one directory per run, shared by every rank and restart."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        """Where the event file goes: the run directory itself. TensorBoard names a run by the
        directory that holds its event file, relative to `--logdir`: `justrl-tiny-none` under
        `--logdir outputs/`, `0-length_penalty` under `--logdir <sweep dir>`."""
        return self.root

    @property
    def engine_logs(self) -> Path:
        return self.root / "engines"

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    def adopt_legacy_event_file(self, name: str) -> None:
        """Runs before 2026-11-22 logged to <run>/tensorboard/: move that event file to where it
        goes now, so that a resumed old run keeps one history."""
        legacy = self.root / "tensorboard" / name
        if legacy.is_file() and not (self.tensorboard / name).exists():
            os.replace(legacy, self.tensorboard / name)


@dataclass
class TrainerState:
    """Rank 0's part of a checkpoint (`trainer_state.pt`): what the learner's files do not hold."""

    sampler: dict
    """The prompt sampler's position (justrl.data.PromptSampler.state_dict)."""
    rng: dict
    """Python's and torch's RNG states."""
    counters: dict
    """total_tokens, and the run's fault counts (justrl.run_summary.RunFaults.state)."""
    rollout_ahead: Any = None
    """rollout.max_policy_lag=1: the next step's batch, generated before the checkpoint."""

    def save(self, checkpoint_dir: Path, cfg) -> None:
        """Write trainer_state.pt and the run's config.yaml into `checkpoint_dir`."""
        import torch
        from omegaconf import OmegaConf

        torch.save({"sampler": self.sampler, "rng": self.rng, "state": self.counters,
                    "rollout_ahead": self.rollout_ahead}, Path(checkpoint_dir) / TRAINER_STATE)
        OmegaConf.save(cfg, Path(checkpoint_dir) / RUN_CONFIG)

    @classmethod
    def load(cls, checkpoint_dir: Path) -> "TrainerState":
        import torch

        saved = torch.load(Path(checkpoint_dir) / TRAINER_STATE, weights_only=False)
        return cls(saved["sampler"], saved["rng"], saved["state"], saved.get("rollout_ahead"))


def rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def record_run_config(run: RunDir, cfg, resume: Path | None) -> None:
    """A fresh run writes its config.yaml; a resumed one keeps its checkpoint's state and says
    which settings differ from the checkpoint's config."""
    from omegaconf import OmegaConf

    if resume is None:
        OmegaConf.save(cfg, run.root / RUN_CONFIG)
        return

    def flat(node, prefix=""):
        out = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out
    old = flat(OmegaConf.to_container(OmegaConf.load(resume / RUN_CONFIG)))
    new = flat(OmegaConf.to_container(cfg))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        log.warning("resuming with settings that differ from the checkpoint's: %s",
                    ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
