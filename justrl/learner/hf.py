"""The `hf` learner: a transformers causal LM trained with torch, data parallel over torch.distributed.

One training step (`justrl.learner.step.grpo_update`) on every rank, each rank holding the whole
step's sequences (see `justrl.trainer`); gradients are summed over the ranks with an all-reduce
(no DDP, so ranks may run different numbers of micro-batches), clipped, and AdamW steps.

Every rank ends the step with the same weights and optimizer state (plain data parallelism, no
sharding), so rank 0 alone writes checkpoints and weight exports. The master weights and the
optimizer state are float32; `learner.dtype=bfloat16` runs forward and backward under autocast.

Logits are never materialised for a whole row: the final hidden states go through the output
layer `LOGIT_CHUNK_TOKENS` positions at a time, under activation checkpointing where the
vocabulary is large (`CHECKPOINT_LOGIT_ELEMENTS`), so a 32k-token micro-batch of a
152k-vocabulary model needs ~1 GiB of logits instead of ~19 GiB. In a training step they are
computed at the response positions only (the prompt's never enter the loss). The output
layer's GEMM runs in the compute dtype (bf16 on GPUs: a 151936 x 1536 fp32 GEMM without TF32 is
~10x slower) and only the log-softmax is float32.

Attention over a packed row never builds an L x L mask (`justrl.learner.varlen_attention`):
FlashAttention-2 varlen where flash-attn is installed, else causal SDPA per sequence (or over the
sequences padded into a batch, when cheaper).

Gradients are summed over the data-parallel ranks in flat buckets of `GRAD_BUCKET_BYTES` (a few
all-reduces per update instead of one per parameter), and the step's metric sums stay on the device
until the update's single host sync.
"""
from __future__ import annotations

import math
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from justrl.grpo import Sequence, entropy_from_logits, token_logprobs
import justrl.learner.varlen_attention as varlen_attention
from justrl.learner.packing import MicroBatch
from justrl.learner.step import (LOGIT_CHUNK_TOKENS, NonFiniteCounter, UpdateSettings, chunked_logprobs_entropy,
                                 constant_with_warmup, grpo_update)

OPTIMIZER_FILE = "optimizer.pt"
# Above this many logits per chunk (vocabulary x LOGIT_CHUNK_TOKENS) they are recomputed in the
# backward pass instead of kept (the 1.5B models' 152k vocabulary: yes; the tiny model's 1k: no).
CHECKPOINT_LOGIT_ELEMENTS = 64 * 2**20
# Gradient all-reduce bucket (torch DDP's default bucket is 25 MiB).
GRAD_BUCKET_BYTES = 25 * 2**20


def _logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-prob of `targets` and entropy, for `hidden` `[N, H]`: the logits are
    computed in `dtype` (the compute dtype), the log-softmax in float32."""
    logits = (hidden.to(dtype) @ weight.to(dtype).t()).float()
    return token_logprobs(logits, targets, temperature), entropy_from_logits(logits, temperature)


def _all_reduce_bucketed(tensors: list[torch.Tensor], bucket_bytes: int) -> None:
    """Sum `tensors` over the ranks in place, copied into flat buckets of about `bucket_bytes`
    per dtype (one collective per bucket; the idea is torch DDP's gradient bucketing)."""
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        nonlocal bucket, size
        if bucket:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        bucket, size = [], 0

    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or size + t.numel() * t.element_size() > bucket_bytes):
            flush()
        bucket.append(t)
        size += t.numel() * t.element_size()
    flush()


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
        self.update_settings = UpdateSettings.from_config(learner, algorithm, mini_batch_size)
        self.nonfinite = NonFiniteCounter(learner.max_nonfinite_updates)
        self.temperature = temperature
        self.autocast_dtype = torch.bfloat16 if learner.dtype == "bfloat16" else None
        self.compute_dtype = self.autocast_dtype or torch.float32
        attention = varlen_attention.implementation(self.compute_dtype)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32,
                                                          attn_implementation=attention).to(self.device)
        self.bounds_device = varlen_attention.bounds_device(attention, self.device)
        if learner.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        self.model.train()  # Qwen2 has no dropout; train() only matters for gradient checkpointing
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                           eps=optim.eps, weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, constant_with_warmup(optim.warmup_steps))
        self.grad_clip = optim.grad_clip

    # -- forward ------------------------------------------------------------------------------

    def train_step(self, sequences: list[Sequence]) -> dict[str, float]:
        """One GRPO step (`justrl.learner.step.grpo_update`) on this learner."""
        return grpo_update(self, sequences, self.update_settings, self.nonfinite)

    # -- the update's backend (justrl.learner.step.Backend) ----------------------------------------

    def forward(self, mb: MicroBatch, need_entropy: bool, response_only: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies `[1, L]` of a packed micro-batch (each sequence attends to itself
        only: the sequence boundaries, where the position ids restart at 0, go to the varlen
        attention as `cu_seq_lens_q`). With `response_only` (a training step), the output layer,
        the log-softmax and the entropy skip the positions of mask 0 (they hold 0)."""
        input_ids, position_ids = mb.input_ids.to(self.device), mb.position_ids.to(self.device)
        targets = mb.targets.to(self.device)
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.autocast_dtype is not None):
            hidden = self.model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                      **varlen_attention.varlen_kwargs(mb.position_ids, self.bounds_device)).last_hidden_state[0]
        weight = self.model.get_output_embeddings().weight
        targets = targets[0]
        where = None
        if response_only:  # only the response positions (mask 1) enter the loss and the metrics
            where = torch.nonzero(mb.mask[0]).flatten().to(self.device)
            hidden, targets = hidden[where], targets[where]
        # Checkpointing the chunk saves its logits' memory at the price of a second output-layer
        # GEMM in the backward pass: only worth it where the logits are big (152k vocabulary).
        remat = torch.is_grad_enabled() and LOGIT_CHUNK_TOKENS * weight.shape[0] > CHECKPOINT_LOGIT_ELEMENTS
        logprobs, entropies = chunked_logprobs_entropy(
            lambda h, t: _logprobs_and_entropy(h, weight, t, self.temperature, self.compute_dtype),
            hidden, targets, need_entropy, remat)
        if where is not None:  # back to the row's positions; the prompt's hold 0 (mask 0)
            length = mb.input_ids.shape[1]
            logprobs = logprobs.new_zeros(length).index_copy(0, where, logprobs)
            entropies = entropies.new_zeros(length).index_copy(0, where, entropies)
        return logprobs[None], entropies[None]

    def data_parallel(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def advance_schedule(self) -> None:
        with warnings.catch_warnings():
            # a step whose updates were all skipped (non-finite) still advances the schedule
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()

    def reduce_and_step(self, sums: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:  # a rank with no sequences in this mini-batch still joins the all-reduce
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        sums = sums.to(self.device)
        if self.world_size > 1:
            # the loss is already divided by the global token count: sum
            _all_reduce_bucketed([p.grad for p in params], GRAD_BUCKET_BYTES)
            dist.all_reduce(sums)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        sums = sums.cpu()  # the update's one host sync (with the norm's below)
        grad_norm = norm.item()
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
                        "consecutive_nonfinite": self.nonfinite.consecutive}, Path(out_dir) / OPTIMIZER_FILE)

    def load_state(self, in_dir: str | Path) -> None:
        state = torch.load(Path(in_dir) / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.nonfinite.consecutive = state["consecutive_nonfinite"]
