"""Writing an HF model directory from a state dict: what transformers and vLLM load.

Used by the `megatron` learner's weight exports and by `tools/merge_checkpoint.py`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# Copied from the source model directory when present (sampling defaults vLLM reads).
EXTRA_FILES = ("generation_config.json",)


def write_hf_dir(out_dir: str | Path, state: dict[str, torch.Tensor], config: dict, tokenizer=None,
                 extra_from: str | Path | None = None) -> Path:
    """config.json, model.safetensors and the tokenizer in `out_dir`, written into
    `<out_dir>.tmp` and renamed, so `out_dir` is either absent or whole."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtypes = {v.dtype for v in state.values()}
    config = dict(config)
    if len(dtypes) == 1:
        config["dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if extra_from is not None:
        for name in EXTRA_FILES:
            if (Path(extra_from) / name).is_file():
                shutil.copy(Path(extra_from) / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
