"""The recipe's math: GRPO advantages, the clipped policy loss, token log-probs and entropy.

JustRL (arXiv 2512.16649) trains with plain GRPO as implemented in the authors' veRL fork
(`verl/trainer/ppo/core_algos.py`): outcome rewards, group-normalised advantages, the PPO clipped
surrogate with clip-higher (0.2 / 0.28) and dual clip (c = 10) for negative advantages,
token-mean aggregation, no KL term and no entropy bonus.

Pure torch on purpose: no torch.distributed, Megatron or vLLM import. Every normaliser that
depends on the parallel layout (the mini-batch's global token count) is an argument; the learner
does the all-reduce. Both learners (hf, megatron) call these functions.

Where this module departs from the reference, on purpose:
- Token-mean divides by the number of response tokens of the whole mini-batch (`num_tokens`),
  summed over micro-batches and data-parallel ranks, so gradient accumulation and the number of
  ranks do not change the gradient. The reference (veRL at the time of the paper) took a mean per
  micro-batch and rescaled by the micro-batch's share of sequences, which weights tokens unevenly
  when micro-batches hold different numbers of tokens.
- A group whose rewards are all equal gets advantage exactly 0. The reference computes
  `(r - mean) / (std + eps)`, which is 0 for rewards that are exactly representable (+1/-1) but
  can come out as ~0.03 when float rounding makes the group mean differ from r by one ulp
  (possible with length-penalty rewards).
- The 1e-8 that the reference adds to the token count is not added; a zero count divides by 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# exp() of a log-ratio beyond this overflows nothing but makes the ratio meaningless; the
# reference clamps log(pi/pi_old) to [-20, 20] before exponentiating, and so do we.
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class Sequence:
    """One prompt + response of the step, with its GRPO advantage: what the rollout produces and
    the learner trains on."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    advantage: float

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantages, one per response: (r - group mean) / (group std + eps).

    Args:
        rewards: `[B]` float, one scalar reward per response.
        group_ids: `[B]` ints; responses to the same prompt share an id (any values, any order).
        eps: added to the standard deviation.

    Returns:
        `[B]` advantages, same dtype as `rewards`. The std is torch's unbiased (Bessel) std, as in
        the reference. A group whose rewards are all equal gets 0. A group of a single response
        gets `r / (1 + eps)` (mean 0, std 1), as the reference does.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} "
                         f"and {tuple(group_ids.shape)}")
    if not torch.is_floating_point(rewards):
        raise TypeError(f"rewards must be a float tensor, got {rewards.dtype}")
    advantages = torch.zeros_like(rewards)
    # One small loop over groups (256 per step in the recipe) with the same torch.mean/torch.std
    # calls as the reference, so the numbers agree bit for bit.
    for gid in torch.unique(group_ids):
        idx = (group_ids == gid).nonzero(as_tuple=True)[0]
        group = rewards[idx]
        if group.numel() == 1:
            mean, std = torch.zeros((), dtype=rewards.dtype), torch.ones((), dtype=rewards.dtype)
        elif bool((group == group[0]).all()):
            continue  # no signal in this group: advantage exactly 0
        else:
            mean, std = torch.mean(group), torch.std(group)
        advantages[idx] = (group - mean) / (std + eps)
    return advantages


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float = 10.0,
    num_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with clip-higher and dual clip, token-mean aggregated.

    Per token, with ratio = exp(clamp(logprobs - old_logprobs, +-20)) and A the advantage:
        clipped = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
        loss    = min(clipped, -A * clip_c)  if A < 0   (dual clip)
                  clipped                   otherwise
    and the returned loss is sum(loss * mask) / num_tokens.

    Args:
        logprobs: `[B, T]` log-probs of the response tokens under the policy being trained.
        old_logprobs: `[B, T]` log-probs of the same tokens under the policy that sampled them
            (recomputed by the learner before the update).
        advantages: `[B]` (one per response) or `[B, T]` (one per token).
        mask: `[B, T]`, 1 for response tokens, 0 for prompt and padding.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        clip_c: dual-clip constant (> 1); caps the loss of a negative-advantage token at -A * c.
        num_tokens: the number of response tokens to divide by: for gradient accumulation and
            data parallelism, the count of the whole mini-batch over all micro-batches and ranks.
            None means this call's own `mask.sum()` (a plain token-mean).

    Returns:
        (loss, metrics). The metrics are detached scalars normalised by the same `num_tokens` as
        the loss, so summing them over micro-batches and ranks gives the mini-batch's token mean:
        `actor/pg_loss`, `actor/pg_clipfrac` (tokens whose ratio the clip bound changed),
        `actor/ppo_kl` (mean of old - new log-prob, the approximate KL), and
        `actor/pg_clipfrac_lower` (negative-advantage tokens capped by the dual clip).
    """
    if not (0.0 <= clip_low < 1.0) or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0; got {clip_low}, {clip_high}")
    if clip_c <= 1.0:
        raise ValueError(f"the dual-clip constant clip_c must be > 1, got {clip_c}")
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(f"logprobs, old_logprobs and mask must all be [B, T]; got "
                         f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.expand_as(logprobs)
    mask = mask.to(logprobs.dtype)
    denominator = mask.sum() if num_tokens is None else num_tokens
    denominator = torch.clamp(torch.as_tensor(denominator, dtype=logprobs.dtype), min=1.0)

    log_ratio = torch.clamp(logprobs - old_logprobs, min=-MAX_LOG_RATIO, max=MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clip_loss = torch.maximum(unclipped, clipped)
    dual_bound = -advantages * clip_c
    negative = advantages < 0
    per_token = torch.where(negative, torch.minimum(clip_loss, dual_bound), clip_loss)

    loss = (per_token * mask).sum() / denominator

    def token_mean(x: torch.Tensor) -> torch.Tensor:
        return ((x.to(mask.dtype) * mask).sum() / denominator).detach()

    metrics = {
        "actor/pg_loss": loss.detach(),
        "actor/pg_clipfrac": token_mean(clipped > unclipped),
        "actor/ppo_kl": token_mean(-log_ratio),
        "actor/pg_clipfrac_lower": token_mean((clip_loss > dual_bound) & negative),
    }
    return loss, metrics


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label under `logits / temperature`.

    Args:
        logits: `[..., V]` (float32 recommended).
        labels: `[...]` token ids, same leading shape.
        temperature: the sampling temperature; the reference divides the logits by it too.

    Returns:
        `[...]` log-probs. Computed as gather - logsumexp, which never materialises a full
        log-softmax of the vocabulary.
    """
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the categorical distribution softmax(logits / temperature), per position.

    Args:
        logits: `[..., V]`.

    Returns:
        `[...]` entropies in nats: logsumexp(z) - sum(softmax(z) * z).
    """
    if temperature != 1.0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (0 when the mask is empty). Shapes: any, equal."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / torch.clamp(mask.sum(), min=1.0)
