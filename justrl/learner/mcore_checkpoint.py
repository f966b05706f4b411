"""Megatron distributed checkpoint -> HF directory, in one process, without Megatron's runtime.

A Megatron distributed checkpoint (torch_dist format) stores every model tensor in its global,
unsharded shape: a TP-sharded weight is one tensor whose shards each rank wrote, so merging the
tensor-parallel shards is reading the global tensors (torch.distributed.checkpoint does it, with
no process group). What is left is Megatron's layout: the layers are stacked along a leading
axis (`decoder.layers.<name>` of shape `[num_layers, ...]`), the norms carry Transformer Engine
names whichever layer spec wrote them, the vocabulary is padded, QKV and gate/up are fused; the
mapping module (`justrl.learner.mcore_adapter`) turns that into HF tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from justrl.checkpoint import COMPLETE
from justrl.learner.mcore_adapter import Qwen2Shape, mcore_to_hf

MEGATRON_DIR = "megatron"
HF_CONFIG_DIR = "hf_config"


class NotAMegatronCheckpoint(ValueError):
    """The path is not a complete justrl/Megatron checkpoint."""


def locate(checkpoint: str | Path) -> tuple[Path, Path]:
    """(Megatron checkpoint dir, HF config dir) of a justrl checkpoint `step_N/` (or of its
    `megatron/` subdirectory), with a clear error for anything else."""
    path = Path(checkpoint)
    if path.name == MEGATRON_DIR:
        path = path.parent
    if not path.exists():
        raise NotAMegatronCheckpoint(f"{path}: no such file or directory")
    if not path.is_dir():
        raise NotAMegatronCheckpoint(f"{path}: not a directory (give a checkpoint directory, e.g. "
                                     f"<run>/checkpoints/step_000050)")
    if (path / "hf").is_dir() and not (path / MEGATRON_DIR).exists():
        raise NotAMegatronCheckpoint(f"{path}: a learner=hf checkpoint; its weights are already an HF directory: "
                                     f"{path / 'hf'}")
    meg = path / MEGATRON_DIR
    if not (meg / "metadata.json").is_file():
        raise NotAMegatronCheckpoint(f"{path}: not a Megatron checkpoint (no {MEGATRON_DIR}/metadata.json)")
    if not (path / COMPLETE).is_file():
        raise NotAMegatronCheckpoint(f"{path}: incomplete checkpoint (no {COMPLETE} marker: its save was "
                                     f"interrupted); use an earlier one")
    if not (meg / ".metadata").is_file():
        raise NotAMegatronCheckpoint(f"{meg}: incomplete Megatron checkpoint (no .metadata index)")
    config = path / HF_CONFIG_DIR / "config.json"
    if not config.is_file():
        raise NotAMegatronCheckpoint(f"{path}: no {HF_CONFIG_DIR}/config.json (the model's HF config)")
    return meg, path / HF_CONFIG_DIR


def read_model_tensors(megatron_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a Megatron distributed checkpoint, global shapes, layers stacked."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(megatron_dir))
    metadata = reader.read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if isinstance(meta, TensorStorageMetadata) and not key.startswith("optimizer.")}
    try:
        dcp.load(state, storage_reader=reader, no_dist=True)
    except (Exception, dcp.api.CheckpointException) as e:  # a missing or truncated shard file
        raise NotAMegatronCheckpoint(f"{megatron_dir}: cannot read the model tensors ({type(e).__name__}: {e})") from e
    return state


def unstack_layers(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """`decoder.layers.<name>` `[L, ...]` -> `decoder.layers.<i>.<name>`."""
    out = {}
    for key, value in state.items():
        if key.startswith("decoder.layers."):
            if value.shape[0] != num_layers:
                raise NotAMegatronCheckpoint(f"{key}: {value.shape[0]} layers stacked, the config has {num_layers}")
            name = key[len("decoder.layers."):]
            for i in range(num_layers):
                out[f"decoder.layers.{i}.{name}"] = value[i]
        else:
            out[key] = value
    return out


def merged_hf_state(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(HF state dict, HF config, HF config dir) of a justrl Megatron checkpoint."""
    meg, hf_config = locate(checkpoint)
    config = json.loads((hf_config / "config.json").read_text())
    shape = Qwen2Shape.from_hf_config(config)
    state = unstack_layers(read_model_tensors(meg), shape.num_layers)
    try:
        return mcore_to_hf([state], shape, fused_norms=True), config, hf_config
    except KeyError as e:
        raise NotAMegatronCheckpoint(f"{meg}: tensor {e} is missing (not a checkpoint of this model?)") from e


def merge_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Write the HF directory of a Megatron checkpoint (config.json, model.safetensors,
    tokenizer); `dtype` None keeps the stored dtype."""
    from transformers import AutoTokenizer

    from justrl.hf_io import write_hf_dir

    state, config, hf_config = merged_hf_state(checkpoint)
    if dtype is not None:
        state = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
    tokenizer = AutoTokenizer.from_pretrained(hf_config)
    return write_hf_dir(out_dir, state, config, tokenizer, extra_from=hf_config)
