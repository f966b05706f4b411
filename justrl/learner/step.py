"""One GRPO training step, as both learners run it: `grpo_update(backend, sequences, settings,
nonfinite)`. The learners are "model + parallelism": each implements the `Backend` contract below
(log-probs of a packed micro-batch, its data-parallel split, reduce-and-step, the learning rate)
and nothing of the recipe.

1. cut the step into PPO mini-batches (consecutive groups, no shuffle), split each mini-batch
   over the data-parallel ranks by token count and pack each rank's share into micro-batches;
2. recompute the old log-probs of every response token with the current weights (no grad),
   except the first mini-batch's: no optimizer step has happened when it trains, so its old
   log-probs are its training forward's own, detached (the same weights and inputs: bitwise the
   same values on CPU, checked in tests/test_learner.py), which saves a forward over 1/k of the
   step's tokens with k mini-batches. veRL's dp_actor does the same when a step is one
   mini-batch (`on_policy`: `old_log_prob = log_prob.detach()`);
3. per mini-batch: forward/backward every micro-batch with the loss divided by the mini-batch's
   response-token count over all ranks (`justrl.grpo.policy_loss`), then let the learner sum the
   gradients over the ranks, clip and step, unless the loss or the gradient is not finite; too
   many non-finite updates in a row stop the run;
4. advance the learning-rate schedule once (per training step, as veRL does).

Returns the step's metrics (identical on every rank): the `actor/*` values are token means over
each mini-batch, averaged over the mini-batches (as veRL reports them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.checkpoint import checkpoint

from justrl.grpo import Sequence, policy_loss
from justrl.learner.packing import MicroBatch, micro_batch_fill, padding_fraction, plan_mini_batch

log = logging.getLogger(__name__)

# Positions whose logits are computed at once (2048 x 151936 float32 logits = 1.2 GiB).
LOGIT_CHUNK_TOKENS = 2048
# Per-mini-batch sums kept by `_mini_batch_update`, in this order.
SUMMED_METRICS = ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/entropy")


def chunked_logprobs_entropy(fn, hidden: torch.Tensor, targets: torch.Tensor, need_entropy: bool,
                             remat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both learners' output layer: `fn(hidden[c], targets[c]) -> (log-probs, entropies)` over
    `LOGIT_CHUNK_TOKENS` positions at a time, so that no more than one chunk's logits exist at once;
    with `remat`, each chunk runs under activation checkpointing (its logits are recomputed in the
    backward pass instead of kept). Entropies carry a gradient only when `need_entropy`."""
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], LOGIT_CHUNK_TOKENS):
        piece = slice(start, start + LOGIT_CHUNK_TOKENS)
        if remat:
            lp, ent = checkpoint(fn, hidden[piece], targets[piece], use_reentrant=False)
        else:
            lp, ent = fn(hidden[piece], targets[piece])
        logprobs.append(lp)
        entropies.append(ent if need_entropy else ent.detach())
    return torch.cat(logprobs), torch.cat(entropies)


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a NaN/inf loss or gradient."""


def constant_with_warmup(warmup_steps: int):
    """veRL's (and transformers') constant schedule with linear warm-up: factor step / warmup
    for step < warmup, then 1. Note step 0 has factor 0: the first training step moves only the
    optimizer's moments, exactly as in the reference."""
    def factor(step: int) -> float:
        return step / max(1.0, warmup_steps) if step < warmup_steps else 1.0
    return factor


class Backend(Protocol):
    """What `grpo_update` needs from a learner (`justrl.learner.hf.HFLearner`,
    `justrl.learner.megatron.MegatronLearner`)."""

    device: torch.device
    model: torch.nn.Module  # the update sets its train()/eval() mode

    def forward(self, micro: MicroBatch, need_entropy: bool,
                response_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies `[1, L]` of a packed micro-batch. `response_only`: only the
        positions of mask 1 are needed (the others may hold anything)."""

    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) over which a step is split."""

    def zero_grad(self) -> None: ...

    def reduce_and_step(self, sums: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        """Sum the gradients and the metric sums over the data-parallel ranks; step the optimizer
        unless the loss (sums[0]) or the gradient is not finite. Returns (sums on the host,
        gradient norm, finite)."""

    def current_lr(self) -> float: ...

    def advance_schedule(self) -> None: ...


@dataclass(frozen=True)
class UpdateSettings:
    """The recipe's knobs of one update (from the `learner` and `algorithm` configs)."""

    mini_batch_size: int  # sequences per PPO mini-batch (mini_batch_prompts x n)
    micro_batch_tokens: int
    ppo_epochs: int
    clip_low: float
    clip_high: float
    clip_c: float
    entropy_coef: float
    max_nonfinite_updates: int

    @classmethod
    def from_config(cls, learner, algorithm, mini_batch_size: int) -> "UpdateSettings":
        return cls(mini_batch_size, learner.micro_batch_tokens, algorithm.ppo_epochs, algorithm.clip_low,
                   algorithm.clip_high, algorithm.clip_c, algorithm.entropy_coef, learner.max_nonfinite_updates)


class NonFiniteCounter:
    """Updates skipped in a row for a non-finite loss or gradient (kept in checkpoints)."""

    def __init__(self, limit: int, consecutive: int = 0):
        self.limit, self.consecutive = limit, consecutive

    def record(self, finite: bool, loss: float, grad_norm: float) -> None:
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        log.warning("non-finite update skipped (loss %s, grad norm %s); %d in a row", loss, grad_norm,
                    self.consecutive)
        if self.consecutive >= self.limit:
            raise NonFiniteError(
                f"{self.consecutive} updates in a row had a non-finite loss or gradient "
                f"(last: loss={loss}, grad_norm={grad_norm}); stopping "
                f"(learner.max_nonfinite_updates={self.limit}). The weights are those of "
                f"the last finite update; the latest checkpoint is intact. Lower optim.lr or inspect the batch.")


def grpo_update(backend: Backend, sequences: list[Sequence], settings: UpdateSettings,
                nonfinite: NonFiniteCounter) -> dict[str, float]:
    """Old log-probs, then the PPO mini-batch updates, then one schedule step (see above)."""
    per = settings.mini_batch_size
    if len(sequences) % per:
        raise ValueError(f"{len(sequences)} sequences do not split into mini-batches of {per}")
    mini_batches = [sequences[i:i + per] for i in range(0, len(sequences), per)]
    rank, size = backend.data_parallel()
    plans = [plan_mini_batch(mb, rank, size, settings.micro_batch_tokens) for mb in mini_batches]
    # The token-mean's denominator: the mini-batch's response tokens over all ranks. Every rank
    # holds the whole mini-batch, so no all-reduce is needed to know it.
    token_counts = [sum(len(s.response_ids) for s in mb) for mb in mini_batches]

    backend.model.eval()  # no dropout either way; eval() only skips recomputation under no_grad
    with torch.no_grad():
        for plan in plans[1:]:  # the first mini-batch's come from its own forward (see above)
            for micro in plan:
                # kept on the device: no host sync per micro-batch
                micro.old_logprobs = backend.forward(micro, need_entropy=False, response_only=True)[0]
    backend.model.train()

    lr = backend.current_lr()
    totals: dict[str, float] = {}
    skipped = 0
    for _ in range(settings.ppo_epochs):
        for plan, num_tokens in zip(plans, token_counts):
            metrics = _mini_batch_update(backend, plan, num_tokens, settings)
            finite = not metrics.pop("actor/nonfinite")
            nonfinite.record(finite, metrics["actor/pg_loss"], metrics["actor/grad_norm"])
            skipped += int(not finite)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
    backend.advance_schedule()  # also after a step whose updates were all skipped
    updates = len(plans) * settings.ppo_epochs
    result = {key: value / updates for key, value in totals.items()}
    all_micro = [m for plan in plans for m in plan]
    result.update({
        "actor/lr": lr,
        "actor/skipped_updates": float(skipped),
        "perf/padding_fraction": padding_fraction(all_micro),
        "perf/micro_batch_fill": micro_batch_fill(all_micro, settings.micro_batch_tokens),
        "perf/micro_batches": float(len(all_micro)),
    })
    return result


def _mini_batch_update(backend: Backend, plan: list[MicroBatch], num_tokens: int,
                       settings: UpdateSettings) -> dict[str, float]:
    """One optimizer step on one mini-batch (this rank's micro-batches of it). The metric sums
    stay on the device (no host sync per micro-batch); `reduce_and_step` brings them back."""
    backend.zero_grad()
    sums = torch.zeros(len(SUMMED_METRICS), dtype=torch.float64, device=backend.device)
    coef = settings.entropy_coef
    for micro in plan:
        logprobs, entropy = backend.forward(micro, need_entropy=coef > 0, response_only=True)
        if micro.old_logprobs is None:  # the step's first mini-batch, before any optimizer step
            micro.old_logprobs = logprobs.detach()
        mask = micro.mask.to(backend.device)
        loss, m = policy_loss(logprobs, micro.old_logprobs.to(backend.device), micro.advantages.to(backend.device),
                              mask, settings.clip_low, settings.clip_high, settings.clip_c, num_tokens=num_tokens)
        entropy_term = (entropy * mask).sum() / max(num_tokens, 1)
        if coef > 0:
            loss = loss - coef * entropy_term
        loss.backward()
        m["actor/entropy"] = entropy_term
        sums += torch.stack([m[name].detach().to(torch.float64) for name in SUMMED_METRICS])
    sums, grad_norm, finite = backend.reduce_and_step(sums)
    metrics = {name: value for name, value in zip(SUMMED_METRICS, sums.tolist())}
    metrics["actor/grad_norm"] = float(grad_norm)
    metrics["actor/nonfinite"] = float(not finite)
    return metrics
