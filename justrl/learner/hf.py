"""The `hf` learner: a transformers causal LM trained with torch, data parallel over torch.distributed.

One training step, on every rank (each rank holds the whole step's sequences; see
`justrl.trainer`):

1. cut the step into PPO mini-batches (consecutive groups, no shuffle), split each mini-batch
   over the ranks by token count and pack each rank's share into micro-batches;
2. recompute the old log-probs of every response token with the current weights (no grad);
3. per mini-batch: forward/backward every micro-batch with the loss divided by the mini-batch's
   response-token count over all ranks, all-reduce (sum) the gradients, clip their norm, and take
   an AdamW step, unless the loss or the gradient norm is not finite, in which case the update is
   skipped and counted;
4. advance the learning-rate schedule once (per training step, as veRL does).

Every rank ends the step with the same weights and optimizer state (plain data parallelism, no
sharding), so rank 0 alone writes checkpoints and weight exports. The master weights and the
optimizer state are float32; `learner.dtype=bfloat16` runs forward and backward under autocast.

Logits are never materialised for a whole row: the final hidden states go through the output
layer `LOGIT_CHUNK_TOKENS` positions at a time, under activation checkpointing, so a 32k-token
micro-batch of a 152k-vocabulary model needs ~1 GiB of logits instead of ~19 GiB.
"""
from __future__ import annotations

import logging
import math
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from justrl.grpo import entropy_from_logits, policy_loss, token_logprobs
from justrl.learner.packing import MicroBatch, Sequence, micro_batch_fill, padding_fraction, plan_mini_batch

log = logging.getLogger(__name__)

# Positions whose logits are computed at once (2048 x 151936 float32 logits = 1.2 GiB).
LOGIT_CHUNK_TOKENS = 2048
OPTIMIZER_FILE = "optimizer.pt"


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a NaN/inf loss or gradient."""


def constant_with_warmup(warmup_steps: int):
    """veRL's (and transformers') constant schedule with linear warm-up: factor step / warmup
    for step < warmup, then 1. Note step 0 has factor 0: the first training step moves only the
    optimizer's moments, exactly as in the reference."""
    def factor(step: int) -> float:
        return step / max(1.0, warmup_steps) if step < warmup_steps else 1.0
    return factor


def _logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-prob of `targets` and entropy, for `hidden` `[N, H]`, in float32."""
    logits = hidden.float() @ weight.float().t()
    return token_logprobs(logits, targets, temperature), entropy_from_logits(logits, temperature)


class HFLearner:
    """Policy model, optimizer and schedule of the `hf` backend.

    Args:
        model_path: HF directory to load the weights from (the model, or a checkpoint's `hf/`).
        learner: the `learner` config (dtype, micro_batch_tokens, gradient_checkpointing,
            max_nonfinite_updates).
        optim: the `optim` config.
        algorithm: the `algorithm` config (clips, epochs, entropy_coef).
        mini_batch_size: sequences per PPO mini-batch (mini_batch_prompts x n).
        temperature: the rollout temperature (logits are divided by it, as in the reference).
    """

    def __init__(self, model_path: str | Path, learner, optim, algorithm, mini_batch_size: int,
                 temperature: float):
        from transformers import AutoModelForCausalLM

        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.cfg, self.algorithm = learner, algorithm
        self.mini_batch_size = mini_batch_size
        self.temperature = temperature
        self.autocast_dtype = torch.bfloat16 if learner.dtype == "bfloat16" else None
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).to(self.device)
        if learner.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        self.model.train()  # Qwen2 has no dropout; train() only matters for gradient checkpointing
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                           eps=optim.eps, weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, constant_with_warmup(optim.warmup_steps))
        self.grad_clip = optim.grad_clip
        self.consecutive_nonfinite = 0

    # -- forward ------------------------------------------------------------------------------

    def _forward(self, mb: MicroBatch, need_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies `[1, L]` of a packed micro-batch (block-diagonal attention:
        transformers derives it from position ids that restart at every sequence)."""
        input_ids, position_ids = mb.input_ids.to(self.device), mb.position_ids.to(self.device)
        targets = mb.targets.to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            hidden = self.model.model(input_ids=input_ids, position_ids=position_ids,
                                      use_cache=False).last_hidden_state[0]
        weight = self.model.get_output_embeddings().weight
        logprobs, entropies = [], []
        for start in range(0, hidden.shape[0], LOGIT_CHUNK_TOKENS):
            piece = slice(start, start + LOGIT_CHUNK_TOKENS)
            if torch.is_grad_enabled():
                lp, ent = checkpoint(_logprobs_and_entropy, hidden[piece], weight, targets[0, piece],
                                     self.temperature, use_reentrant=False)
            else:
                lp, ent = _logprobs_and_entropy(hidden[piece], weight, targets[0, piece], self.temperature)
            logprobs.append(lp)
            entropies.append(ent if need_entropy else ent.detach())
        return torch.cat(logprobs)[None], torch.cat(entropies)[None]

    # -- one training step ----------------------------------------------------------------------

    def train_step(self, sequences: list[Sequence]) -> dict[str, float]:
        """Old log-probs, then the PPO mini-batch updates, then one schedule step.

        Returns the step's metrics (identical on every rank): the `actor/*` values are token means
        over each mini-batch, averaged over the mini-batches (as veRL reports them).
        """
        if len(sequences) % self.mini_batch_size:
            raise ValueError(f"{len(sequences)} sequences do not split into mini-batches of {self.mini_batch_size}")
        mini_batches = [sequences[i:i + self.mini_batch_size] for i in range(0, len(sequences), self.mini_batch_size)]
        plans = [plan_mini_batch(mb, self.rank, self.world_size, self.cfg.micro_batch_tokens) for mb in mini_batches]
        # The token-mean's denominator: the mini-batch's response tokens over all ranks. Every rank
        # holds the whole mini-batch, so no all-reduce is needed to know it.
        token_counts = [sum(len(s.response_ids) for s in mb) for mb in mini_batches]

        with torch.no_grad():
            for plan in plans:
                for micro in plan:
                    micro.old_logprobs = self._forward(micro, need_entropy=False)[0].cpu()

        lr = self.optimizer.param_groups[0]["lr"]
        totals: dict[str, float] = {}
        skipped = 0
        for _ in range(self.algorithm.ppo_epochs):
            for plan, num_tokens in zip(plans, token_counts):
                metrics = self._update(plan, num_tokens)
                skipped += int(metrics.pop("actor/nonfinite"))
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
        with warnings.catch_warnings():
            # a step whose updates were all skipped (non-finite) still advances the schedule
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        updates = len(plans) * self.algorithm.ppo_epochs
        result = {key: value / updates for key, value in totals.items()}
        all_micro = [m for plan in plans for m in plan]
        result.update({
            "actor/lr": lr,
            "actor/skipped_updates": float(skipped),
            "perf/padding_fraction": padding_fraction(all_micro),
            "perf/micro_batch_fill": micro_batch_fill(all_micro, self.cfg.micro_batch_tokens),
            "perf/micro_batches": float(len(all_micro)),
        })
        return result

    def _update(self, plan: list[MicroBatch], num_tokens: int) -> dict[str, float]:
        """One optimizer step on one mini-batch (this rank's micro-batches of it)."""
        self.optimizer.zero_grad(set_to_none=False)
        sums = torch.zeros(5, dtype=torch.float64)  # pg_loss, clipfrac, ppo_kl, clipfrac_lower, entropy
        coef = self.algorithm.entropy_coef
        for micro in plan:
            logprobs, entropy = self._forward(micro, need_entropy=coef > 0)
            mask = micro.mask.to(self.device)
            loss, m = policy_loss(logprobs, micro.old_logprobs.to(self.device), micro.advantages.to(self.device),
                                  mask, self.algorithm.clip_low, self.algorithm.clip_high, self.algorithm.clip_c,
                                  num_tokens=num_tokens)
            entropy_term = (entropy * mask).sum() / max(num_tokens, 1)
            if coef > 0:
                loss = loss - coef * entropy_term
            loss.backward()
            sums += torch.tensor([m["actor/pg_loss"].item(), m["actor/pg_clipfrac"].item(), m["actor/ppo_kl"].item(),
                                  m["actor/pg_clipfrac_lower"].item(), entropy_term.item()], dtype=torch.float64)
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:  # a rank with no sequences in this mini-batch still joins the all-reduce
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world_size > 1:
            for p in params:  # the loss is already divided by the global token count: sum
                dist.all_reduce(p.grad)
            sums_dev = sums.to(self.device)
            dist.all_reduce(sums_dev)
            sums = sums_dev.cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip).item()
        finite = math.isfinite(grad_norm) and math.isfinite(sums[0].item())
        if finite:
            self.optimizer.step()
            self.consecutive_nonfinite = 0
        else:
            self.optimizer.zero_grad(set_to_none=False)
            self.consecutive_nonfinite += 1
            log.warning("non-finite update skipped (loss %s, grad norm %s); %d in a row", sums[0].item(),
                        grad_norm, self.consecutive_nonfinite)
            if self.consecutive_nonfinite >= self.cfg.max_nonfinite_updates:
                raise NonFiniteError(
                    f"{self.consecutive_nonfinite} updates in a row had a non-finite loss or gradient "
                    f"(last: loss={sums[0].item()}, grad_norm={grad_norm}); stopping "
                    f"(learner.max_nonfinite_updates={self.cfg.max_nonfinite_updates}). The weights are those of "
                    f"the last finite update; the latest checkpoint is intact. Lower optim.lr or inspect the batch.")
        names = ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/entropy")
        metrics = {name: value for name, value in zip(names, sums.tolist())}
        metrics["actor/grad_norm"] = grad_norm
        metrics["actor/nonfinite"] = float(not finite)
        return metrics

    # -- weights and state ------------------------------------------------------------------------

    def export_hf(self, out_dir: str | Path | None, tokenizer, dtype: str = "float32") -> Path | None:
        """Write the weights as an HF directory (config.json, safetensors, tokenizer) atomically:
        into `<out_dir>.tmp`, then renamed. Rank 0 writes; every rank must call (it is a barrier),
        and the other ranks may pass None."""
        out = Path(out_dir) if out_dir is not None else None
        if self.rank == 0:
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            state = None
            if dtype != "float32":
                target = getattr(torch, dtype)
                state = {k: v.detach().to(target) for k, v in self.model.state_dict().items()}
            self.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        if self.world_size > 1:
            dist.barrier()
        return out

    def save_checkpoint(self, ckpt_dir: str | Path, tokenizer) -> None:
        """The weights as `<ckpt_dir>/hf/` (float32) and the optimizer state. Every rank must call."""
        self.export_hf(Path(ckpt_dir) / "hf" if self.rank == 0 else None, tokenizer)
        self.save_state(ckpt_dir)

    def load_checkpoint(self, ckpt_dir: str | Path) -> None:
        """The optimizer state of a checkpoint whose `hf/` the model was built from."""
        self.load_state(ckpt_dir)

    def save_state(self, out_dir: str | Path) -> None:
        """Optimizer and schedule state (the weights go in the HF export). Rank 0 writes."""
        if self.rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "consecutive_nonfinite": self.consecutive_nonfinite}, Path(out_dir) / OPTIMIZER_FILE)

    def load_state(self, in_dir: str | Path) -> None:
        state = torch.load(Path(in_dir) / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.consecutive_nonfinite = state["consecutive_nonfinite"]
