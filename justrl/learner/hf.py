"""The `hf` learner: a transformers causal LM trained with torch, data parallel over torch.distributed.

One training step (`justrl.learner.step.PolicyStep`) on every rank, each rank holding the whole
step's sequences (see `justrl.trainer`); gradients are summed over the ranks with an all-reduce
(no DDP, so ranks may run different numbers of micro-batches), clipped, and AdamW steps.

Every rank ends the step with the same weights and optimizer state (plain data parallelism, no
sharding), so rank 0 alone writes checkpoints and weight exports. The master weights and the
optimizer state are float32; `learner.dtype=bfloat16` runs forward and backward under autocast.

Logits are never materialised for a whole row: the final hidden states go through the output
layer `LOGIT_CHUNK_TOKENS` positions at a time, under activation checkpointing, so a 32k-token
micro-batch of a 152k-vocabulary model needs ~1 GiB of logits instead of ~19 GiB.
"""
from __future__ import annotations

import math
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from justrl.grpo import entropy_from_logits, token_logprobs
from justrl.learner.packing import MicroBatch
from justrl.learner.step import PolicyStep, constant_with_warmup

# Positions whose logits are computed at once (2048 x 151936 float32 logits = 1.2 GiB).
LOGIT_CHUNK_TOKENS = 2048
OPTIMIZER_FILE = "optimizer.pt"


def _logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-prob of `targets` and entropy, for `hidden` `[N, H]`, in float32."""
    logits = hidden.float() @ weight.float().t()
    return token_logprobs(logits, targets, temperature), entropy_from_logits(logits, temperature)


class HFLearner(PolicyStep):
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

    # -- the step's hooks (justrl.learner.step.PolicyStep) -----------------------------------------

    def _data_parallel(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def _current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _advance_schedule(self) -> None:
        with warnings.catch_warnings():
            # a step whose updates were all skipped (non-finite) still advances the schedule
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()

    def _reduce_and_step(self, sums: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
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
        else:
            self.optimizer.zero_grad(set_to_none=False)
        return sums, grad_norm, finite

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
