"""Attention over packed rows without an L x L mask: every sequence attends only to itself.

A packed row `[1, L]` holds many sequences. Given packed `position_ids`, transformers' `sdpa`
path builds a dense `[1, 1, L, L]` block-diagonal mask, which costs O(L^2) memory and compute and
keeps PyTorch off its flash kernel (on a 2-core CPU a 512-token row of 4-6 toy sequences took
3x longer than the same sequences as a padded batch; at 32k tokens on a GPU it is ~185 TFLOP of
wasted mask work per forward at the 1.5B shape).

Two implementations, one per device, both called with the row's sequence boundaries
(`cu_seq_lens_q`, FlashAttention's varlen convention, built by `varlen_kwargs`):

- `flash_attention_2` (transformers' own integration) where the `flash_attn` package is installed
  (GPUs): its varlen kernel takes the boundaries directly.
- `justrl_varlen` (registered here with transformers' `AttentionInterface`; its mask function,
  registered with `AttentionMaskInterface`, returns None so no L x L mask is ever built): plain
  `scaled_dot_product_attention` with `is_causal=True` on each sequence, either one call per
  sequence or, when it is cheaper, the sequences gathered into a padded `[B, H, longest, D]`
  batch (padding sits after each sequence's last token, so a causal query never sees it) and one
  call. `padded_is_cheaper` is the cost rule.

The idea of registering a custom attention function through `AttentionInterface` is the one
transformers documents ("Attention Interface"); the padding-free kwargs are those of its
`DataCollatorWithFlattening`.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

NAME = "justrl_varlen"
# One SDPA call costs about as much as this many query x key products of the tiny model on a
# CPU (Python dispatch + kernel set-up, forward and backward); measured with
# benchmarks/peer_trl.py's micro-batches on the 2-core VM, 2026-11-22. Only the choice between
# per-sequence and padded calls depends on it, never the numbers.
CALL_OVERHEAD_PRODUCTS = 64 * 64


def padded_is_cheaper(lengths: list[int]) -> bool:
    """Per-sequence calls cost sum(l^2)/2 causal products plus one call overhead each; a padded
    batch costs B * longest^2 / 2 products (the padding too) plus one overhead."""
    if len(lengths) <= 1:
        return False
    per_sequence = sum(n * n for n in lengths) / 2 + len(lengths) * CALL_OVERHEAD_PRODUCTS
    padded = len(lengths) * max(lengths) ** 2 / 2 + CALL_OVERHEAD_PRODUCTS
    return padded < per_sequence


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Causal SDPA on `[B, H, T, D]` queries and `[B, Hkv, T, D]` keys/values."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                          enable_gqa=k.shape[1] != q.shape[1])


def varlen_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        cu_seq_lens_q: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: `query` `[1, H, L, D]`, `key`/`value`
    `[1, Hkv, L, D]`; returns `[1, L, H, D]`. `cu_seq_lens_q` `[S + 1]`: sequence boundaries
    in the row (None: the row is one sequence)."""
    if dropout:
        raise ValueError("justrl_varlen attention has no dropout (Qwen2 uses none)")
    if query.shape[0] != 1:
        raise ValueError(f"justrl_varlen attention takes one packed row, got a batch of {query.shape[0]}")
    length = query.shape[2]
    bounds = [0, length] if cu_seq_lens_q is None else cu_seq_lens_q.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if len(lengths) == 1:
        out = _sdpa(query, key, value, scaling)
    elif padded_is_cheaper(lengths):
        # [S, longest] gather indices into the row; padding slots read position 0 and are dropped
        longest = max(lengths)
        offsets = torch.arange(longest, device=query.device)
        starts = torch.tensor(bounds[:-1], device=query.device)[:, None]
        valid = offsets[None, :] < torch.tensor(lengths, device=query.device)[:, None]
        index = torch.where(valid, starts + offsets[None, :], 0)
        gather = lambda x: x[0][:, index].transpose(0, 1)  # noqa: E731  [H, L, D] -> [S, H, longest, D]
        out = _sdpa(gather(query), gather(key), gather(value), scaling)  # [S, H, longest, D]
        out = out.transpose(0, 1)[:, valid][None]  # [1, H, L, D], back in row order
    else:
        out = torch.cat([_sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scaling)
                         for a, b in zip(bounds[:-1], bounds[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


def no_mask(*args, **kwargs) -> None:
    """The mask function of `justrl_varlen`: the boundaries travel as `cu_seq_lens_q`, no mask."""
    return None


def register() -> None:
    """Make `attn_implementation="justrl_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_sdpa_forward)
    AttentionMaskInterface.register(NAME, no_mask)


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def implementation(compute_dtype: torch.dtype = torch.bfloat16) -> str:
    """`flash_attention_2` where flash-attn and a GPU are there and the compute dtype is a 16-bit
    one (its kernels take no float32), else `justrl_varlen`."""
    if flash_attn_available() and compute_dtype in (torch.bfloat16, torch.float16):
        return "flash_attention_2"
    register()
    return NAME


def varlen_kwargs(position_ids: torch.Tensor, device: torch.device | str | None = None) -> dict:
    """FlashAttention's varlen kwargs for a packed row `[1, L]` whose positions restart at 0 at
    every sequence (transformers passes them down to the attention function). `device`: where
    `cu_seq_lens_*` go (default: the position ids'); flash-attn's `mha_varlen_fwd` requires them
    on the GPU (`CHECK_DEVICE(cu_seqlens_q)` in csrc/flash_attn/flash_api.cpp), the SDPA path
    reads them back as Python ints and wants them on the CPU (`bounds_device`)."""
    row = position_ids[0].cpu()
    starts = torch.nonzero(row == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        raise ValueError("a packed row's position ids must start at 0")
    bounds = starts + [row.numel()]
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    cu = torch.tensor(bounds, dtype=torch.int32, device=position_ids.device if device is None else device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def bounds_device(attn_implementation: str, model_device: torch.device) -> torch.device:
    """Where `varlen_kwargs` puts the boundaries: the model's device for FlashAttention (its
    kernel checks), the CPU for `justrl_varlen` (no device sync for its `.tolist()`)."""
    return model_device if attn_implementation == "flash_attention_2" else torch.device("cpu")
