"""Sequences -> data-parallel shares -> packed micro-batches, without padding between sequences.

A step's responses have very different lengths (a few hundred to 15k tokens in the recipe), so
padding them to a common length wastes most of the compute. Instead each rank's sequences are
concatenated into rows of at most `capacity` tokens ("packing"); the attention of one sequence
never sees another because the position ids restart at 0 at every sequence start, which
transformers (and Megatron, through cu_seqlens) turn into a block-diagonal causal mask.

Pure Python + torch, no distributed import: the learner passes its rank and world size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from justrl.grpo import Sequence

log = logging.getLogger(__name__)


def split_for_ranks(lengths: list[int], world_size: int) -> list[list[int]]:
    """Indices of the sequences each rank trains on, balanced by token count.

    Longest first, each to the rank with the fewest tokens so far (ties: lowest rank), so that
    every rank finishes its micro-batches at about the same time. Deterministic: every rank
    computes the same split without communicating. Each share is returned in ascending order.
    """
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(i)
        load[rank] += lengths[i]
    return [sorted(s) for s in shares]


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sequence indices into bins of at most `capacity` tokens (first-fit decreasing).

    A sequence longer than `capacity` gets a bin of its own (it cannot be split; raise
    learner.micro_batch_tokens if that happens often: the log says so).
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            if lengths[i] > capacity:
                log.warning("a sequence of %d tokens exceeds learner.micro_batch_tokens=%d; it gets a "
                            "micro-batch of its own", lengths[i], capacity)
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


@dataclass
class MicroBatch:
    """Packed sequences as one row: every tensor is `[1, L]`, L = total tokens of the row.

    `targets[0, j]` is the token at j + 1 of the same sequence (the one the logits at j predict);
    `mask` is 1 where that target is a response token; `advantages` holds the sequence's
    advantage at those positions. `old_logprobs` is filled by the learner before the update.
    """

    input_ids: torch.Tensor
    num_real_tokens: int
    position_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None

def build_micro_batch(sequences: list[Sequence], pad_multiple: int = 1) -> MicroBatch:
    """Concatenate `sequences` into one row, padded at the end to a multiple of `pad_multiple`
    tokens (Megatron's sequence parallelism and GPU kernels want round lengths; 1: no padding).
    The padding is a separate pseudo-sequence (its positions restart at 0) with mask 0."""
    ids, pos, tgt, msk, adv = [], [], [], [], []
    for s in sequences:
        tokens = list(s.prompt_ids) + list(s.response_ids)
        n, p = len(tokens), len(s.prompt_ids)
        ids += tokens
        pos += range(n)
        tgt += tokens[1:] + [0]
        # logits at position j predict token j + 1; response tokens are p .. n - 1
        msk += [0.0] * (p - 1) + [1.0] * (n - p) + [0.0]
        adv += [s.advantage] * n
    pad = -len(ids) % pad_multiple
    ids += [0] * pad
    pos += range(pad)
    tgt += [0] * pad
    msk += [0.0] * pad
    adv += [0.0] * pad
    row = lambda values, dtype: torch.tensor([values], dtype=dtype)  # noqa: E731
    return MicroBatch(row(ids, torch.long), len(ids) - pad, row(pos, torch.long), row(tgt, torch.long),
                      row(msk, torch.float32), row(adv, torch.float32))


def plan_mini_batch(sequences: list[Sequence], rank: int, world_size: int, capacity: int,
                    pad_multiple: int = 1) -> list[MicroBatch]:
    """This rank's packed micro-batches of one PPO mini-batch."""
    lengths = [len(s) for s in sequences]
    mine = split_for_ranks(lengths, world_size)[rank]
    bins = pack([lengths[i] for i in mine], capacity)
    return [build_micro_batch([sequences[mine[j]] for j in b], pad_multiple) for b in bins]


def padding_fraction(micro_batches: list[MicroBatch]) -> float:
    """Share of the positions the learner computes that hold padding, not a token."""
    total = sum(mb.input_ids.numel() for mb in micro_batches)
    real = sum(mb.num_real_tokens for mb in micro_batches)
    return 0.0 if total == 0 else 1.0 - real / total


def micro_batch_fill(micro_batches: list[MicroBatch], capacity: int) -> float:
    """Tokens computed over the capacity of the micro-batches used (1.0: every row full)."""
    if not micro_batches:
        return 0.0
    return sum(mb.input_ids.numel() for mb in micro_batches) / (len(micro_batches) * capacity)
