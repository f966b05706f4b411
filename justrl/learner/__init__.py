"""Learner backends: `hf` (transformers + torch, data parallel) and, on GPUs, `megatron`."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from justrl.config import ConfigError

from justrl.learner.hf import HFLearner, NonFiniteError
from justrl.learner.packing import Sequence


def check_learner(cfg: DictConfig) -> None:
    """Refuse, at start-up, a learner that does not exist yet."""
    if cfg.learner.name != "hf":
        raise ConfigError(f"learner.name={cfg.learner.name!r}: the Megatron-core learner is not implemented yet "
                          f"(only its HF <-> Megatron weight mapping is, justrl/learner/mcore_adapter.py); "
                          f"use learner=hf")


def build_learner(cfg: DictConfig, model_path: str | Path):
    """The configured learner, with its weights loaded from the HF directory `model_path`."""
    check_learner(cfg)
    mini_batch_size = cfg.algorithm.mini_batch_prompts * cfg.rollout.n
    return HFLearner(model_path, cfg.learner, cfg.optim, cfg.algorithm, mini_batch_size, cfg.rollout.temperature)


__all__ = ["build_learner", "check_learner", "HFLearner", "NonFiniteError", "Sequence"]
