"""The `megatron` learner: a Megatron-core GPTModel trained with tensor x data parallelism.

The same step as the `hf` learner (`justrl.learner.hf`), with Megatron-core's parallel pieces:

- the model is `justrl.learner.megatron.model.build_gpt_model` from the HF config.json, loaded from
  the HF safetensors through `justrl.learner.megatron.adapter` (this TP rank's shard only);
- tensor parallelism over `learner.tensor_parallel_size` ranks, data parallelism over the rest;
  every rank of a TP group trains on the same micro-batches (the step is split over DP ranks);
- Megatron's DDP and distributed optimizer: gradients are reduce-scattered (summed: the loss is
  already divided by the mini-batch's token count, hence `calculate_per_token_loss`), each DP rank
  updates its shard of the fp32 master weights and Adam moments, and the bf16 weights are
  gathered back;
- `learner.dtype=bfloat16`: bf16 weights and compute, fp32 master weights and optimizer state;
- `learner.gradient_checkpointing` (off by default: docs/megatron.md, 'Recomputation') with
  `learner.recompute_granularity`: full recomputation of every layer, or selective (local spec only);
- packed micro-batches: Transformer Engine's `thd` attention with cu_seqlens on GPUs; on a CPU
  (tests, the tiny experiment) the local layer spec with a block-diagonal mask (RoPE is relative,
  so a sequence's offset in its row does not change its attention);
- log-probs and entropy from vocabulary-parallel logits (`justrl.learner.megatron.vocab_parallel`), the
  output layer applied `LOGIT_CHUNK_TOKENS` positions at a time under activation checkpointing;
  the step itself (old log-probs, PPO mini-batch updates, GRPO loss, non-finite skips) is
  `justrl.learner.step.grpo_update` over this class's `Backend` methods, as for the `hf` learner.

Differences from the `hf` learner, on purpose: weight exports (for the engines and the merge tool)
hold the model's compute-dtype weights (bf16 under bf16; the fp32 master weights are in the
optimizer's checkpoint); checkpoints are Megatron distributed checkpoints (`save_checkpoint`).
"""
from __future__ import annotations

import contextlib
import math
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from justrl.grpo import Sequence
from justrl.learner.megatron import checkpoint
from justrl.learner.megatron.adapter import hf_to_mcore, mcore_to_hf
from justrl.learner.megatron.cpu import on_cpu_scope
from justrl.learner.megatron.model import (build_gpt_model, layer_spec, load_hf_state, read_shape,
                                           recompute_setting)
from justrl.learner.megatron.vocab_parallel import vocab_parallel_logprobs_entropy
from justrl.learner.packing import MicroBatch
from justrl.learner.step import (NonFiniteCounter, UpdateSettings, chunked_logprobs_entropy, constant_with_warmup,
                                 grpo_update)


def _init_single_process_group(on_cpu: bool) -> None:
    """Megatron needs torch.distributed even for one rank."""
    from justrl.cluster.placement import free_port

    # an explicit address: a MASTER_PORT inherited from the environment may be taken
    dist.init_process_group("gloo" if on_cpu else "nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=timedelta(minutes=30))


def _block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """`[1, 1, L, L]` bool, True where attention is not allowed: across sequences (a sequence
    starts where its position id is 0) and to later positions."""
    seq = torch.cumsum((position_ids[0] == 0).long(), 0)
    same = seq[:, None] == seq[None, :]
    causal = torch.ones_like(same).tril()
    return ~(same & causal)[None, None]


def _packed_seq_params(position_ids: torch.Tensor, device: torch.device):
    from megatron.core.packed_seq_params import PackedSeqParams

    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist() + [position_ids.shape[1]]
    cu = torch.tensor(starts, dtype=torch.int32, device=device)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


class MegatronLearner:
    """Policy model, distributed optimizer and schedule of the `megatron` backend.

    Same arguments and methods as `justrl.learner.hf.HFLearner`. Call on every rank of the
    job after torch.distributed is initialised (one process: it initialises a group of one).
    """

    @on_cpu_scope
    def __init__(self, model_path: str | Path, learner, optim, algorithm, mini_batch_size: int,
                 temperature: float):
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        self.on_cpu = not torch.cuda.is_available()  # then every public method runs in cpu.cuda_as_cpu()
        if not dist.is_initialized():
            _init_single_process_group(self.on_cpu)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        tp = learner.tensor_parallel_size
        if self.world_size % tp:
            raise ValueError(f"learner.tensor_parallel_size={tp} must divide the {self.world_size} learner ranks")
        self.model_path = Path(model_path)
        self.config, self.shape = read_shape(model_path)
        if not ps.model_parallel_is_initialized():
            # No gloo twins of every group: Megatron uses them only for legacy checkpoint formats
            # (our dp_reshardable one needs none), and on multi-NIC nodes gloo binds to whatever
            # interface the hostname resolves to.
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
        elif ps.get_tensor_model_parallel_world_size() != tp:
            raise RuntimeError(f"Megatron is already initialised with TP={ps.get_tensor_model_parallel_world_size()}")
        self.tp, self.tp_rank, self.tp_group = tp, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if self.on_cpu:
            self.device = torch.device("cpu")
        else:
            self.device = torch.device("cuda", torch.cuda.current_device())
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
        self.update_settings = UpdateSettings.from_config(learner, algorithm, mini_batch_size)
        self.nonfinite = NonFiniteCounter(learner.max_nonfinite_updates)
        self.temperature = temperature
        self.bf16 = learner.dtype == "bfloat16"
        self.spec = layer_spec(self.on_cpu)

        params_dtype = torch.bfloat16 if self.bf16 else torch.float32
        # initialize=True although the weights are overwritten next: Megatron marks a parameter as
        # tensor-parallel (which the gradient norm relies on) only in its initialisation code
        # Sequence parallelism whenever TP > 1, with either spec (the local one through
        # `model.SequenceParallelRMSNorm`, so the CPU runs the GPU's composition): the norms and
        # residuals (replicated under plain TP) are split along the sequence, so a packed row is
        # padded to a multiple of TP (`forward`).
        self.sequence_parallel = tp > 1
        recompute = recompute_setting(learner.gradient_checkpointing, learner.recompute_granularity, self.spec)
        gpt = build_gpt_model(self.shape, tp, spec=self.spec, params_dtype=params_dtype, on_cpu=True,
                              initialize=True, recompute=recompute, bf16=self.bf16, per_token_loss=True,
                              fusions=self.spec == "te", sequence_parallel=self.sequence_parallel)
        if self.sequence_parallel:
            # `forward` gathers the final hidden states along the sequence itself (so the output
            # layer can run in chunks of whole positions); the output layer must not gather again.
            # With `sequence_parallel` off, ColumnParallelLinear.forward would wrap its input in
            # copy_to_tensor_model_parallel_region, whose backward all-reduces the input gradient
            # over TP (megatron/core/tensor_parallel/layers.py ~993-1001, mappings.py ~211); the
            # gather's backward (reduce-scatter, mappings.py ~327-343) would then sum TP copies of
            # the already summed gradient: every gradient below the output layer TP times too big.
            # `disable_grad_reduce` skips that copy, so each rank's input gradient stays its partial
            # sum over its vocabulary shard and the reduce-scatter alone sums them, once.
            gpt.output_layer.sequence_parallel = False
            gpt.output_layer.disable_grad_reduce = True
        unmarked = [n for n, p in gpt.named_parameters()  # every matrix of a Qwen2 model is TP-split
                    if tp > 1 and p.dim() == 2 and not getattr(p, "tensor_model_parallel", False)]
        if unmarked:
            raise RuntimeError(f"Megatron did not mark these weights tensor-parallel: {unmarked[:4]}")
        shard = hf_to_mcore(load_hf_state(model_path), self.shape, tp, fused_norms=self.spec == "te")[self.tp_rank]
        self._load_model_state(gpt, shard)
        gpt = gpt.to(self.device)
        module = Float16Module(gpt.config, gpt) if self.bf16 else gpt
        self.gpt = gpt
        self.model = DistributedDataParallel(
            gpt.config, DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True),
            module)
        self.model.train()
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
                            adam_beta2=optim.betas[1], adam_eps=optim.eps, clip_grad=optim.grad_clip, bf16=self.bf16,
                            params_dtype=params_dtype, use_distributed_optimizer=True),
            [self.model],
            config_overrides={},  # weight decay on every parameter, as torch AdamW in the hf learner
            use_gloo_process_groups=False,  # none created (initialize_model_parallel above)
        )
        self.base_lr = optim.lr
        self.lr_factor = constant_with_warmup(optim.warmup_steps)
        self.schedule_step = 0
        self.set_lr()
        self.adam_steps = 0  # updates taken (Adam's bias correction counts them)

    @staticmethod
    def _load_model_state(gpt, shard: dict[str, torch.Tensor]) -> None:
        own = gpt.state_dict()
        expected = {k for k in own if not k.endswith("_extra_state")}
        if expected != shard.keys():
            raise RuntimeError(f"HF -> Megatron mapping does not match the model: missing "
                               f"{sorted(expected - shard.keys())[:5]}, unexpected {sorted(shard.keys() - expected)[:5]}")
        for key in expected:
            if own[key].shape != shard[key].shape:
                raise RuntimeError(f"{key}: the model has shape {tuple(own[key].shape)}, the mapped weights "
                                   f"{tuple(shard[key].shape)}")
        gpt.load_state_dict({k: v.to(own[k].dtype) for k, v in shard.items()}, strict=False)

    def set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * self.lr_factor(self.schedule_step)

    # -- forward ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _hidden_states_only(self):
        """GPTModel returns its final hidden states (after the final norm) instead of logits: the
        output layer is applied by `forward` in chunks."""
        self.gpt.post_process = False
        try:
            yield
        finally:
            self.gpt.post_process = True

    def _logprobs_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.gpt.shared_embedding_or_output_weight() if self.shape.tie_word_embeddings else None
        logits, _ = self.gpt.output_layer(hidden, weight=weight)  # [c, 1, V_pad / tp]
        vocab_start = self.tp_rank * logits.shape[-1]
        return vocab_parallel_logprobs_entropy(logits[:, 0], targets, vocab_start, self.shape.vocab_size,
                                               self.temperature, self.tp_group if self.tp > 1 else None)

    @on_cpu_scope
    def train_step(self, sequences: list[Sequence]) -> dict[str, float]:
        """One GRPO step (`justrl.learner.step.grpo_update`) on this learner."""
        return grpo_update(self, sequences, self.update_settings, self.nonfinite)

    # -- the update's backend (justrl.learner.step.Backend) ----------------------------------------

    @on_cpu_scope
    def forward(self, mb: MicroBatch, need_entropy: bool, response_only: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies `[1, L]` of a packed micro-batch (every position, whatever
        `response_only`: the vocabulary-parallel output layer runs over whole chunks)."""
        input_ids, position_ids = mb.input_ids.to(self.device), mb.position_ids.to(self.device)
        targets = mb.targets[0].to(self.device)
        length = input_ids.shape[1]
        pad = -length % self.tp if self.sequence_parallel else 0
        if pad:  # a pseudo-sequence of its own (positions restart at 0), cut off the outputs below
            input_ids = torch.cat([input_ids, input_ids.new_zeros(1, pad)], dim=1)
            position_ids = torch.cat([position_ids, torch.arange(pad, device=self.device)[None]], dim=1)
            targets = torch.cat([targets, targets.new_zeros(pad)])
        if self.spec == "te":
            mask, packed = None, _packed_seq_params(position_ids, self.device)
        else:
            mask, packed = _block_causal_mask(position_ids), None
        with self._hidden_states_only():
            hidden = self.model(input_ids, position_ids, mask, packed_seq_params=packed)  # [L, 1, H]
        if self.sequence_parallel:  # [L / tp, 1, H] -> [L, 1, H]; backward: reduce-scatter
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        out_dtype = self.gpt.output_layer.weight.dtype if self.gpt.output_layer.weight is not None \
            else self.gpt.shared_embedding_or_output_weight().dtype
        hidden = hidden.to(out_dtype)
        logprobs, entropies = chunked_logprobs_entropy(self._logprobs_entropy, hidden, targets, need_entropy,
                                                       remat=torch.is_grad_enabled())
        return logprobs[None, :length], entropies[None, :length]

    def data_parallel(self) -> tuple[int, int]:
        """The step is split over the DP ranks; the ranks of a TP group train on the same micro-batches."""
        return self.dp_rank, self.dp

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def advance_schedule(self) -> None:
        self.schedule_step += 1
        self.set_lr()

    def reduce_and_step(self, sums: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        from megatron.core import parallel_state as ps

        if self.sequence_parallel:
            # Under sequence parallelism each TP rank holds the norms' gradient of its slice of the
            # sequence only: sum them over the TP group first (what Megatron's finalize_model_grads does).
            from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

            _allreduce_non_tensor_model_parallel_grads([self.model], self.gpt.config, self.tp_group)
        self.model.finish_grad_sync()  # reduce-scatter (sum) over the data-parallel ranks
        # The metric sums are summed over DP ranks (the TP ranks of a group hold the same values).
        sums_dev = sums.to(self.device)
        if self.dp > 1:
            dist.all_reduce(sums_dev, group=ps.get_data_parallel_group())
        sums = sums_dev.cpu()
        # A NaN/inf anywhere in any rank's gradient buffer (own shard reduced, the rest local)
        # means a non-finite gradient somewhere: skip the update on every rank.
        grads_finite = torch.stack([torch.isfinite(p.main_grad).all() for p in self.model.module.parameters()
                                    if p.requires_grad]).all()
        bad = (~grads_finite).float().reshape(1) + (0.0 if math.isfinite(sums[0].item()) else 1.0)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() != 0:
            return sums, float("nan"), False
        ok, grad_norm, _ = self.optimizer.step()
        self.adam_steps += int(bool(ok))
        return sums, grad_norm, bool(ok) and grad_norm is not None and math.isfinite(grad_norm)

    # -- weights and state ------------------------------------------------------------------------

    @on_cpu_scope
    def gather_hf_state(self) -> dict[str, torch.Tensor] | None:
        """The HF state dict (model dtype) on rank 0, gathered from the TP ranks of DP rank 0;
        None elsewhere. Every rank must call."""
        local = {k: v.detach() for k, v in self.gpt.state_dict().items() if not k.endswith("_extra_state")}
        shards = None
        if self.dp_rank == 0:
            src = dist.get_global_rank(self.tp_group, 0) if self.tp > 1 else self.rank
            shards = [dict() for _ in range(self.tp)]
            for key in sorted(local):
                tensor = local[key].contiguous()
                if self.tp > 1:
                    gathered = [torch.empty_like(tensor) for _ in range(self.tp)] if self.tp_rank == 0 else None
                    dist.gather(tensor, gathered, dst=src, group=self.tp_group)
                else:
                    gathered = [tensor]
                if self.tp_rank == 0:
                    for r in range(self.tp):
                        shards[r][key] = gathered[r].cpu()
        if self.rank != 0:
            return None
        return mcore_to_hf(shards, self.shape, fused_norms=self.spec == "te")

    def hf_state_on_every_rank(self) -> dict[str, torch.Tensor]:
        """The whole HF state dict (model dtype) on every rank, on its own device: each rank's
        tensor-parallel shards all-gathered over its TP group (nothing to gather at TP=1). What the
        ipc weight sync hands to the engine worker on this rank's GPU. Every rank must call."""
        local = {k: v.detach().contiguous() for k, v in self.gpt.state_dict().items()
                 if not k.endswith("_extra_state")}
        shards = [dict() for _ in range(self.tp)]
        for key in sorted(local):
            if self.tp > 1:
                gathered = [torch.empty_like(local[key]) for _ in range(self.tp)]
                dist.all_gather(gathered, local[key], group=self.tp_group)
            else:
                gathered = [local[key]]
            for r in range(self.tp):
                shards[r][key] = gathered[r]
        return mcore_to_hf(shards, self.shape, fused_norms=self.spec == "te")

    @on_cpu_scope
    def export_hf(self, out_dir: str | Path | None, tokenizer, dtype: str = "float32") -> Path | None:
        """Write the weights as an HF directory (config.json, safetensors, tokenizer) atomically.
        Every rank must call; only rank 0 writes (the others may pass None)."""
        from justrl.model.hf_io import write_hf_dir

        state = self.gather_hf_state()
        out = Path(out_dir) if out_dir is not None else None
        if self.rank == 0:
            target = getattr(torch, dtype)
            write_hf_dir(out, {k: v.to(target) for k, v in state.items()}, self.config, tokenizer,
                         extra_from=self.model_path)
        dist.barrier()
        return out

    @on_cpu_scope
    def save_checkpoint(self, ckpt_dir: str | Path, tokenizer) -> None:
        """A Megatron distributed checkpoint (`justrl.learner.megatron.checkpoint.save`). Every rank must call."""
        checkpoint.save(self, ckpt_dir, tokenizer)

    @on_cpu_scope
    def load_checkpoint(self, ckpt_dir: str | Path) -> None:
        """Load what `save_checkpoint` wrote (same TP size; any DP size). Every rank must call."""
        checkpoint.load(self, ckpt_dir)
