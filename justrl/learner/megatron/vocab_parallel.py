"""Per-token log-probs and entropy from vocabulary-parallel logits.

Under tensor parallelism each rank of a TP group holds the logits of one contiguous slice of the
(padded) vocabulary: `[N, V_pad / tp]`. The full `[N, V]` logits are never gathered; three
reductions over the group suffice:

    m       = max over the vocabulary              (all-reduce MAX, no gradient)
    Z       = sum exp(z - m)                       (all-reduce SUM)
    z_y     = the target's logit, from its owner   (all-reduce SUM of a one-hot pick)
    sum_pz  = sum softmax(z) * z                   (all-reduce SUM)

    log p(y) = z_y - m - log Z          entropy = m + log Z - sum_pz

with z = logits / temperature, exactly `justrl.grpo.token_logprobs` and `entropy_from_logits` on
the gathered logits (a test checks values and gradients at TP=2). Vocabulary rows past the
model's real `vocab_size` (Megatron's padding for TP) are excluded, as HF and vLLM exclude them.

The backward is written out (as in Megatron's vocab-parallel cross-entropy): with z = logits / T,
p = softmax(z) and E[z] = sum p z, on every rank's own columns

    d log p(y) / d z_v = [v = y] - p_v          d entropy / d z_v = -p_v (z_v - E[z])

so the backward needs no communication. (Autograd through the all-reduces would need one: each
rank uses the global Z in its own local terms.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_size, temperature, group):
        z = logits.float()
        if temperature != 1.0:
            z = z / temperature
        local_vocab = z.shape[-1]
        columns = torch.arange(vocab_start, vocab_start + local_vocab, device=z.device)
        real = columns < vocab_size
        z = z.masked_fill(~real, float("-inf"))
        m = _all_reduce(z.max(dim=-1).values, group, dist.ReduceOp.MAX)
        shifted = (z - m[:, None]).masked_fill(~real, 0.0)
        exp = torch.exp(shifted).masked_fill(~real, 0.0)
        log_z = torch.log(_all_reduce(exp.sum(dim=-1), group))
        probs = exp.div_(torch.exp(log_z)[:, None])

        local_target = targets - vocab_start
        owned = (local_target >= 0) & (local_target < local_vocab)
        index = local_target.clamp(0, local_vocab - 1)[:, None]
        picked = torch.gather(shifted, -1, index)[:, 0]
        target_shifted = _all_reduce(torch.where(owned, picked, torch.zeros_like(picked)), group)
        mean_shifted = _all_reduce((probs * shifted).sum(dim=-1), group)  # E[z] - m

        ctx.save_for_backward(probs, shifted, mean_shifted, index, owned)
        ctx.temperature, ctx.input_dtype = temperature, logits.dtype
        return target_shifted - log_z, log_z - mean_shifted

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        probs, shifted, mean_shifted, index, owned = ctx.saved_tensors
        grad = -probs * grad_logprobs[:, None]
        grad.scatter_add_(-1, index, torch.where(owned, grad_logprobs, torch.zeros_like(grad_logprobs))[:, None])
        grad -= grad_entropy[:, None] * probs * (shifted - mean_shifted[:, None])
        if ctx.temperature != 1.0:
            grad /= ctx.temperature
        return grad.to(ctx.input_dtype), None, None, None, None, None


def vocab_parallel_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                    vocab_size: int, temperature: float = 1.0,
                                    group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy per position from this rank's vocabulary slice.

    Args:
        logits: `[N, V_local]`, this rank's columns `vocab_start .. vocab_start + V_local`.
        targets: `[N]` global token ids.
        vocab_start: the first global vocabulary index of this rank's slice.
        vocab_size: the model's real vocabulary size (columns at or past it are padding).
        temperature: the sampling temperature (logits are divided by it).
        group: the tensor-parallel process group (None: a single rank holds the whole vocabulary).

    Returns:
        `([N], [N])` float32 log-probs and entropies, identical on every rank of the group.
    """
    return _VocabParallelLogprobsEntropy.apply(logits, targets, vocab_start, vocab_size, temperature, group)
