"""Where a model's weights come from: a local HF directory, a hub id, or the tiny model (training);
a run directory, a checkpoint, an HF directory or a hub id (evaluation and the judge)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from justrl.config import ConfigError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model, build: bool = True) -> Path:
    """A local HF directory holding `model.path`'s config, weights and tokenizer.

    `model` is the `model` config. A missing directory is built when `model.build_tiny_if_missing`
    (only if `build`: one rank builds, the others wait and read), downloaded when `model.path`
    looks like a hub id, and otherwise reported with the key's name.
    """
    path = Path(model.path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={model.path}: the directory has no config.json (not a HF model)")
        return path.absolute()
    if model.build_tiny_if_missing:
        if build:
            from justrl.model.tiny import make_tiny_model

            log.info("model.path=%s does not exist: building the tiny model there", model.path)
            make_tiny_model(path)
        return path.absolute()
    if _HUB_ID.match(model.path) and not path.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(model.path, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                      "*.model", "*.jinja", "*.tiktoken"]))
        except Exception as exc:
            raise ConfigError(f"model.path={model.path}: not a local directory, and fetching it from the HF hub "
                              f"failed ({type(exc).__name__}: {exc})") from exc
    raise ConfigError(f"model.path={model.path}: no such directory")


def resolve_eval_model(path: str) -> Path:
    """An HF directory for `model_path=`: a run directory (latest checkpoint), a checkpoint, an HF
    directory, or a hub id (downloaded)."""
    from omegaconf import OmegaConf

    from justrl import checkpoint as ckpt

    p = Path(path)
    if (p / "checkpoints").is_dir():
        latest = ckpt.latest_checkpoint(p / "checkpoints")
        if latest is None:
            raise ConfigError(f"model_path={path}: a run directory without a complete checkpoint")
        p = latest
    if (p / ckpt.COMPLETE).is_file():
        p = p / "hf"
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"model_path={path}: not a HF model directory, checkpoint or run directory "
                          f"(no config.json in {p})")
    return resolve_model_path(OmegaConf.create({"path": str(p), "build_tiny_if_missing": False}))
