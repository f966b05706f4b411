"""Learner backends: `hf` (transformers + torch, data parallel) and `megatron` (Megatron-core,
tensor x data parallel). Both have the same methods:

    train_step(sequences) -> metrics          one GRPO step (old log-probs, PPO mini-batch updates)
    export_hf(out_dir, tokenizer, dtype)      the weights as an HF directory (for the engines)
    save_checkpoint(ckpt_dir, tokenizer)      the learner's part of a checkpoint
    load_checkpoint(ckpt_dir)                 ... and back

and every method is called on every learner rank.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from justrl.config import ConfigError

from justrl.learner.hf import HFLearner
from justrl.learner.step import NonFiniteError
from justrl.grpo import Sequence


def init_source(cfg: DictConfig, model_path: str | Path, resume: Path | None) -> Path:
    """Where the learner's initial weights come from: the hf learner builds from a checkpoint's
    `hf/` export when resuming; the megatron learner always builds from the model and then loads
    its distributed checkpoint."""
    if resume is not None and cfg.learner.name == "hf":
        if not (resume / "hf").is_dir():
            raise ConfigError(f"{resume} has no hf/ weights: it was written by learner=megatron; resume it with "
                              f"learner=megatron, or merge it (tools/merge_checkpoint.py) and start a new run from "
                              f"the merged directory (model.path)")
        return resume / "hf"
    return Path(model_path)


def build_learner(cfg: DictConfig, model_path: str | Path, resume: Path | None = None):
    """The configured learner, with its initial weights (see `init_source`) loaded."""
    mini_batch_size = cfg.algorithm.mini_batch_prompts * cfg.rollout.n
    args = (init_source(cfg, model_path, resume), cfg.learner, cfg.optim, cfg.algorithm, mini_batch_size,
            cfg.rollout.temperature)
    if cfg.learner.name == "megatron":
        from justrl.learner.megatron import MegatronLearner

        return MegatronLearner(*args)
    return HFLearner(*args)


__all__ = ["build_learner", "init_source", "HFLearner", "NonFiniteError", "Sequence"]
