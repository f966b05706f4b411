"""One GPU's memory when a learner rank and a vLLM engine share it (cluster.placement=colocated):
an estimate from the model's shape and the config, the budget docs/colocated.md writes out and
the preflight prints. Not measured (no GPU here); the terms follow docs/megatron.md.

Three phases, each must fit the GPU:

    generating  engine awake: rollout.gpu_memory_utilization x GPU memory (vLLM reserves exactly
                that at start, weights + activations + KV cache: vllm/v1/worker/utils.py
                request_memory, which also refuses to start with less free)
                + the learner's resident state (weights, gradient buffer, optimizer shard: kept on
                the GPU; its activations were returned by torch.cuda.empty_cache, justrl.rollout.phases)
                + the learner process's CUDA context
    training    the learner's peak (resident state + one micro-batch's activations + one logit
                chunk) + its CUDA context
                + the sleeping engine (level 1: weights offloaded to host memory, KV cache freed;
                what stays is its CUDA context and CUDA-graph pool)
    pushing     the learner's resident state + its CUDA context + the sleeping engine + the
                engine's weights (woken before the push, the KV cache after it: justrl.rollout.phases)
                + with rollout.weight_sync=ipc, the learner's HF-named copy in rollout.dtype that
                the engine worker reads through the IPC handles (justrl/weight_sync/ipc.py); never
                the largest phase for the 1.5B models, kept so that a larger model shows it

Pure arithmetic; the model's shape comes from its HF config.json.
"""
from __future__ import annotations

from dataclasses import dataclass

from justrl.learner.step import LOGIT_CHUNK_TOKENS

GIB = 2 ** 30
# Assumptions (not measured here), with their reasons.
CUDA_CONTEXT_BYTES = 1.0 * GIB
"""A process's CUDA context, cuBLAS/TE workspaces and NCCL buffers (~0.5-1 GB on A100/H100)."""
SLEEPING_ENGINE_BYTES = 1.5 * GIB
"""A level-1 sleeping vLLM engine: its CUDA context (~0.5 GB) and CUDA-graph pool, which sleep mode
does not release (only the weights and KV cache allocations are tagged for it)."""
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DEFAULT_GPU_BYTES = 80 * GIB
"""The recipe's GPUs (A800/H100 80 GB: 81,920 MiB) when the node does not say."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    ffn: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelShape":
        return cls(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
                   config["vocab_size"], config["num_attention_heads"],
                   config.get("num_key_value_heads", config["num_attention_heads"]),
                   bool(config.get("tie_word_embeddings", False)))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    @property
    def params(self) -> int:
        """Every parameter: embeddings, attention (q, k, v with biases, o), SwiGLU MLP, norms, and the
        output layer unless tied (1.777e9 for DeepSeek-R1-Distill-Qwen-1.5B)."""
        h, kv = self.hidden, self.kv_dim
        layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * self.ffn + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def activation_bytes_per_token(self) -> int:
        """bf16 activations one layer keeps per token for its backward, no recomputation (the TE
        spec's table in docs/megatron.md: 6 h + 2 kv_dim + 3 ffn elements; 73.2 KB at 1.5B)."""
        return 2 * (6 * self.hidden + 2 * self.kv_dim + 3 * self.ffn)


@dataclass(frozen=True)
class Budget:
    gpu: float
    engine_awake: float
    engine_asleep: float
    learner_resident: float
    learner_peak: float
    context: float
    engine_weights: float = 0.0
    handover: float = 0.0

    @property
    def generating(self) -> float:
        return self.engine_awake + self.learner_resident + self.context

    @property
    def training(self) -> float:
        return self.learner_peak + self.context + self.engine_asleep

    @property
    def pushing(self) -> float:
        return self.learner_resident + self.context + self.engine_asleep + self.engine_weights + self.handover

    @property
    def fits(self) -> bool:
        return max(self.generating, self.training, self.pushing) <= self.gpu

    def line(self) -> str:
        """The preflight's line (GB of the GPU's, each phase)."""
        over = (["generating is over: lower rollout.gpu_memory_utilization"] if self.generating > self.gpu else []) + \
            (["training is over: lower learner.micro_batch_tokens or set learner.gradient_checkpointing=true"]
             if self.training > self.gpu else []) + \
            (["pushing is over: set rollout.weight_sync=files"] if self.pushing > self.gpu else [])
        verdict = "fits" if not over else "DOES NOT FIT: " + "; ".join(over)
        return (f"memory per GPU (colocated, estimate, GiB of {self.gpu / GIB:.0f}): generating {self.generating / GIB:.1f} "
                f"(engine {self.engine_awake / GIB:.1f} + learner state {self.learner_resident / GIB:.1f} + context "
                f"{self.context / GIB:.1f}); training {self.training / GIB:.1f} (learner peak {self.learner_peak / GIB:.1f} "
                f"+ context {self.context / GIB:.1f} + sleeping engine {self.engine_asleep / GIB:.1f}); pushing "
                f"{self.pushing / GIB:.1f} (learner state + context + sleeping engine + its weights "
                f"{self.engine_weights / GIB:.1f} + hand-over copy {self.handover / GIB:.1f}): {verdict}")


def learner_state_bytes(shape: ModelShape, data_parallel: int, tensor_parallel: int = 1,
                        learner: str = "megatron") -> float:
    """The learner's resident state per GPU. Megatron (bf16 training): bf16 weights (2 bytes), the
    fp32 gradient buffer (`grad_reduce_in_fp32`, 4), and the distributed optimizer's shard of the
    fp32 master weights and both Adam moments (12 bytes over the data-parallel ranks). hf (plain
    torch DDP, float32): weights, gradients and both moments on every rank (16 bytes)."""
    per_rank = shape.params / tensor_parallel
    if learner == "hf":
        return per_rank * 16
    return per_rank * (2 + 4) + per_rank * 12 / data_parallel


def learner_peak_bytes(shape: ModelShape, data_parallel: int, micro_batch_tokens: int, recompute: bool,
                       tensor_parallel: int = 1, learner: str = "megatron") -> float:
    """The resident state + one packed micro-batch's activations (every layer's, or with full
    recomputation each layer's input plus one layer's) + one logit chunk in flight (bf16 logits,
    fp32 log-softmax and its gradient: 10 bytes a logit)."""
    per_layer = shape.activation_bytes_per_token() * micro_batch_tokens / tensor_parallel
    kept = (shape.layers * 2 * shape.hidden * micro_batch_tokens + per_layer) if recompute else shape.layers * per_layer
    logits = min(LOGIT_CHUNK_TOKENS, micro_batch_tokens) * shape.vocab * 10 / tensor_parallel
    return learner_state_bytes(shape, data_parallel, tensor_parallel, learner) + kept + logits


def colocated_budget(shape: ModelShape, cluster, rollout, learner, gpu_bytes: float = DEFAULT_GPU_BYTES) -> Budget:
    """The budget of one GPU of a colocated run (`cluster`, `rollout`, `learner`: the config's)."""
    tp = learner.tensor_parallel_size
    dp = max(1, cluster.learner_gpus // tp)
    weights = shape.params * DTYPE_BYTES[rollout.dtype] / rollout.tensor_parallel_size  # an engine worker's shard
    return Budget(engine_weights=weights,
                  handover=shape.params * DTYPE_BYTES[rollout.dtype] if rollout.weight_sync == "ipc" else 0.0,
                  gpu=gpu_bytes, engine_awake=rollout.gpu_memory_utilization * gpu_bytes,
                  engine_asleep=SLEEPING_ENGINE_BYTES,
                  learner_resident=learner_state_bytes(shape, dp, tp, learner.name),
                  learner_peak=learner_peak_bytes(shape, dp, learner.micro_batch_tokens,
                                                  learner.gradient_checkpointing, tp, learner.name),
                  context=CUDA_CONTEXT_BYTES)
