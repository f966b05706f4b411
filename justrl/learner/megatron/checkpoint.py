"""The Megatron learner's checkpoints: written and read back with Megatron's runtime (`save`,
`load`: model, distributed optimizer, schedule), and merged into an HF directory in one process
without it (`merge_checkpoint`, for tools/merge_checkpoint.py).

Merging:

A Megatron distributed checkpoint (torch_dist format) stores every model tensor in its global,
unsharded shape: a TP-sharded weight is one tensor whose shards each rank wrote, so merging the
tensor-parallel shards is reading the global tensors (torch.distributed.checkpoint does it, with
no process group). What is left is Megatron's layout: the layers are stacked along a leading
axis (`decoder.layers.<name>` of shape `[num_layers, ...]`), the norms carry Transformer Engine
names whichever layer spec wrote them, the vocabulary is padded, QKV and gate/up are fused; the
mapping module (`justrl.learner.megatron.adapter`) turns that into HF tensors.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from justrl.checkpoint import COMPLETE
from justrl.config import ConfigError
from justrl.model.hf_io import EXTRA_FILES
from justrl.learner.megatron.adapter import Qwen2Shape, mcore_to_hf

MEGATRON_DIR = "megatron"
HF_CONFIG_DIR = "hf_config"
# DP-reshardable: each DP rank saves its optimizer shard as is (no gather); a checkpoint loads
# with the same TP size and any DP size.
_OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


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

    from justrl.model.hf_io import write_hf_dir

    state, config, hf_config = merged_hf_state(checkpoint)
    if dtype is not None:
        state = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
    tokenizer = AutoTokenizer.from_pretrained(hf_config)
    return write_hf_dir(out_dir, state, config, tokenizer, extra_from=hf_config)


# -- the learner's side (every rank calls, inside Megatron's runtime) --------------------------------

def save(learner, ckpt_dir: str | Path, tokenizer) -> None:
    """A Megatron distributed checkpoint (model, distributed optimizer, schedule position and
    the non-finite counter) in `<ckpt_dir>/megatron/`, and the HF config and tokenizer the
    merge tool needs in `<ckpt_dir>/hf_config/`. Every rank must call."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if learner.rank == 0:
        (ckpt_dir / MEGATRON_DIR).mkdir(parents=True, exist_ok=True)
        hf_config = ckpt_dir / HF_CONFIG_DIR
        hf_config.mkdir(parents=True, exist_ok=True)
        (hf_config / "config.json").write_text(json.dumps(learner.config, indent=2) + "\n")
        tokenizer.save_pretrained(hf_config)
        for name in EXTRA_FILES:
            if (learner.model_path / name).is_file():
                shutil.copy(learner.model_path / name, hf_config / name)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(learner, is_loading=False), str(ckpt_dir / MEGATRON_DIR))
    dist.barrier()


def load(learner, ckpt_dir: str | Path) -> None:
    """Load what `save` wrote (same TP size; any DP size). Every rank must call."""
    from megatron.core import dist_checkpointing

    path = Path(ckpt_dir) / MEGATRON_DIR
    if not (path / "metadata.json").is_file():
        raise ConfigError(f"{ckpt_dir} holds no Megatron distributed checkpoint ({MEGATRON_DIR}/metadata.json): "
                          f"it was written by learner=hf; resume it with learner=hf, or start a new run "
                          f"(trainer.output_dir) from its hf/ weights (model.path)")
    _materialise_optimizer_state(learner.optimizer)
    state = dist_checkpointing.load(_sharded_state(learner, is_loading=True), str(path))
    learner.gpt.load_state_dict(state["model"], strict=False)
    with torch.no_grad():  # Megatron copies into views of the parameters
        learner.optimizer.load_state_dict(state["optimizer"])
    learner_state = state["learner"]
    if learner_state["tensor_parallel_size"] != learner.tp:
        raise ConfigError(f"{path} was written with learner.tensor_parallel_size="
                           f"{learner_state['tensor_parallel_size']}, this run has {learner.tp}")
    learner.schedule_step = learner_state["schedule_step"]
    learner.nonfinite.consecutive = learner_state["consecutive_nonfinite"]
    learner.adam_steps = learner_state["adam_steps"]
    _set_adam_step(learner.optimizer, learner.adam_steps)
    learner.set_lr()


def _materialise_optimizer_state(optimizer) -> None:
    """torch's Adam creates its state at its first step, and Megatron's loader needs the state
    to exist: take one step with zero gradients and learning rate 0 (no parameter moves, not
    even by weight decay); the loaded state replaces it."""
    for opt in [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]:
        if len(opt.state):
            continue
        lrs = [group["lr"] for group in opt.param_groups]
        with warnings.catch_warnings():  # fp32 shards are views: "grad of a non-leaf Tensor"
            warnings.simplefilter("ignore", UserWarning)
            for group in opt.param_groups:
                group["lr"] = 0.0
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr


def _set_adam_step(optimizer, adam_steps: int) -> None:
    """Adam's step count after a load. torch's Adam keeps it per parameter, and Megatron's
    DP-reshardable loader (written for Apex/TE's FusedAdam, which keeps it per group) leaves
    the placeholder's count there: set it in both places."""
    for opt in [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]:
        for group in opt.param_groups:
            if "step" in group:
                group["step"] = adam_steps
        for state in opt.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(adam_steps), dtype=state["step"].dtype,
                                             device=state["step"].device)


def _sharded_state(learner, is_loading: bool) -> dict:
    model = learner.gpt.sharded_state_dict()
    return {
        "model": model,
        "optimizer": learner.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=_OPTIMIZER_SHARDING),
        # plain values are "common" state, written once by rank 0
        "learner": {"schedule_step": learner.schedule_step, "consecutive_nonfinite": learner.nonfinite.consecutive,
                    "adam_steps": learner.adam_steps, "tensor_parallel_size": learner.tp},
    }
