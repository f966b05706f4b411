"""Let Megatron-core 0.16 run on a CPU-only torch build (tests and the tiny experiment), inside a
scope.

Megatron asks `torch.cuda.current_device()` for the device of ~20 tensors it allocates itself
(RoPE frequencies, all-gather buffers, the grad buffers of its DDP, ...) and forks a CUDA RNG
tracker around attention dropout. Inside `cuda_as_cpu()`, on a machine without CUDA, the first
answers the CPU, tensors asked for on "cuda" are made on the CPU, and the tracker's `fork` is a
no-op (the recipe has no dropout, so there is no random state to fork). Nothing else changes: the
same GPTModel, DDP, optimizer and checkpointing code runs on the CPU, over gloo, as on GPUs over
NCCL. Leaving the (outermost) scope puts every patched function back, so code outside the
Megatron learner (the hf learner, vLLM's client, tests) sees the torch it imported. On a machine
with CUDA the scope does nothing.

The Megatron learner enters the scope in each of its public methods (`on_cpu_scope`).
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch.overrides import TorchFunctionMode

_depth = threading.local()


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


@contextlib.contextmanager
def cuda_as_cpu():
    """The scope described above; re-entrant (nested scopes patch once). Yields whether it runs
    on the CPU (False where CUDA is available: nothing is patched)."""
    if torch.cuda.is_available():
        yield False
        return
    depth = getattr(_depth, "value", 0)
    _depth.value = depth + 1
    try:
        if depth:
            yield True
            return
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.get_cuda_rng_tracker()
        saved = (torch.cuda.current_device, torch.cuda.synchronize, tracker.__dict__.get("fork"))
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda device=None: None
        tracker.fork = lambda name=None: contextlib.nullcontext()
        try:
            with _CudaToCpu():
                yield True
        finally:
            torch.cuda.current_device, torch.cuda.synchronize = saved[0], saved[1]
            if saved[2] is None:
                del tracker.fork  # the class's method again
            else:
                tracker.fork = saved[2]
    finally:
        _depth.value = depth


def on_cpu_scope(method):
    """Run a Megatron learner method inside `cuda_as_cpu()`."""
    @functools.wraps(method)
    def scoped(*args, **kwargs):
        with cuda_as_cpu():
            return method(*args, **kwargs)
    return scoped
