"""Learner backends: `hf` (transformers + torch, data parallel) and, on GPUs, `megatron`."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from justrl.learner.hf import HFLearner, NonFiniteError
from justrl.learner.packing import Sequence


def build_learner(cfg: DictConfig, model_path: str | Path):
    """The configured learner, with its weights loaded from the HF directory `model_path`."""
    mini_batch_size = cfg.algorithm.mini_batch_prompts * cfg.rollout.n
    if cfg.learner.name == "hf":
        return HFLearner(model_path, cfg.learner, cfg.optim, cfg.algorithm, mini_batch_size, cfg.rollout.temperature)
    raise NotImplementedError(f"learner.name={cfg.learner.name!r} is not implemented yet; use learner=hf")


__all__ = ["build_learner", "HFLearner", "NonFiniteError", "Sequence"]
