"""Let Megatron-core 0.16 run on a CPU-only torch build (tests and the tiny experiment).

Megatron asks `torch.cuda.current_device()` for the device of ~20 tensors it allocates itself
(RoPE frequencies, all-gather buffers, the grad buffers of its DDP, ...) and forks a CUDA RNG
tracker around attention dropout. On a machine without CUDA, `enable()` answers the first with
the CPU and makes the tracker's `fork` a no-op (the recipe has no dropout, so there is no random
state to fork). Nothing else changes: the same GPTModel, DDP, optimizer and checkpointing code
runs on the CPU, over gloo, as on GPUs over NCCL. On a machine with CUDA it does nothing.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


class _CudaToCpu(TorchFunctionMode):
    """Tensors that Megatron creates with `device="cuda"` (or moves with `.cuda()`) stay on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # Megatron's dtype checks
            return func(*args).replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def enable() -> bool:
    """Patch once per process when CUDA is unavailable; returns whether running on the CPU."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if not _enabled:
        from megatron.core import tensor_parallel

        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda device=None: None
        _CudaToCpu().__enter__()
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker.fork = lambda name=None: contextlib.nullcontext()
        _enabled = True
    return True
