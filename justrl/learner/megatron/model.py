"""A Megatron-core GPTModel with a Qwen2 model's architecture, from its HF config.json.

GQA (num_query_groups = KV heads), QKV bias, no other bias, RoPE with the config's theta, SwiGLU
(gated linear unit with SiLU), RMSNorm with the config's eps, tied or untied output layer as the
config says, vocabulary padded for tensor parallelism. Needs megatron.core.parallel_state to be
initialised (TP size as wanted); builds on a CPU (`use_cpu_initialization`). Megatron's forward
asks for CUDA; `justrl.learner.megatron.cpu` lets it run on a CPU-only torch.

Two layer specs: "local" (plain torch modules: runs anywhere, attention over packed rows through
a block-diagonal mask) and "te" (Transformer Engine: fused kernels and packed `thd` attention
with cu_seqlens, the GPU path; the norms live inside the linear layers, hence the adapter's
`fused_norms`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from justrl.learner.megatron.adapter import Qwen2Shape, padded_vocab_size


def transformer_config(shape: Qwen2Shape, tp: int = 1, params_dtype: torch.dtype = torch.float32,
                       on_cpu: bool = True, initialize: bool = True, recompute: bool | str = False,
                       bf16: bool = False, per_token_loss: bool = False, fusions: bool = False,
                       sequence_parallel: bool = False):
    """Megatron's TransformerConfig for a Qwen2-shaped model.

    `recompute`: False (none), True or "full" (every layer's activations recomputed: least memory,
    one extra forward), "selective" (only the attention core, `recompute_modules=["core_attn"]`:
    worth it only where attention keeps its L x L scores, i.e. the local spec; with Transformer
    Engine's fused attention it saves nothing, see `recompute_setting`). `fusions`: Transformer Engine's fused RoPE, the fused bias-SwiGLU, the fused masked
    softmax and the fused bias-dropout-add (the "te" spec; the local spec on a CPU has no kernels
    for them). `sequence_parallel` (tp > 1; the local spec through
    `SequenceParallelRMSNorm`): norms and residuals split along the sequence instead of replicated; the packed rows must then
    be a multiple of tp tokens, and the caller gathers the final hidden states.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    if recompute is True:
        recompute = "full"
    if recompute not in (False, None, "full", "selective"):
        raise ValueError(f"recompute must be full, selective or off, got {recompute!r}")
    full = recompute == "full"
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads, kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn_hidden_size,
        add_qkv_bias=True, add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", layernorm_epsilon=shape.rms_norm_eps, tensor_model_parallel_size=tp,
        params_dtype=params_dtype, use_cpu_initialization=on_cpu, perform_initialization=initialize,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=fusions, masked_softmax_fusion=fusions,
        persist_layer_norm=False, bias_dropout_fusion=fusions, apply_rope_fusion=fusions,
        sequence_parallel=sequence_parallel,
        recompute_granularity=recompute or None, recompute_method="uniform" if full else None,
        recompute_num_layers=1 if full else None, bf16=bf16,
        # said explicitly: Megatron's own default for recompute_modules is ["core_attn"]
        # (transformer_config.py ~1193), and selective is only ever that here
        recompute_modules=["core_attn"] if recompute == "selective" else [],
        # the loss is already divided by the mini-batch's token count: DDP must sum, not average
        calculate_per_token_loss=per_token_loss,
    )


SELECTIVE_WITH_FUSED_ATTENTION = (
    "learner.recompute_granularity=selective recomputes only the core attention, which Transformer "
    "Engine's fused/flash attention does not store (it keeps q, k, v, the output and the softmax "
    "statistics either way; Megatron warns about exactly this, megatron/core/transformer/"
    "transformer_config.py ~1224-1229): it would cost one more attention forward per layer and save "
    "no memory. Use learner.gradient_checkpointing=false (the default for the 1.5B models at 16k "
    "tokens, docs/megatron.md 'Recomputation') or learner.recompute_granularity=full")


def recompute_setting(gradient_checkpointing: bool, granularity: str, spec: str) -> bool | str:
    """`transformer_config(recompute=...)` from `learner.gradient_checkpointing` and
    `learner.recompute_granularity`, for the layer spec in use ("te" or "local").

    Selective recomputation is refused with the TE spec (its attention is fused: nothing to save,
    see SELECTIVE_WITH_FUSED_ATTENTION); the local spec (CPU) materialises the attention scores, so
    there it saves their L x L memory."""
    if not gradient_checkpointing:
        return False
    if granularity == "selective" and spec == "te":
        raise ValueError(SELECTIVE_WITH_FUSED_ATTENTION)
    if granularity not in ("full", "selective"):
        raise ValueError(f"learner.recompute_granularity must be full or selective, got {granularity!r}")
    return granularity


class SequenceParallelRMSNorm:
    """torch.nn.RMSNorm for Megatron's local spec, usable under sequence parallelism.

    Megatron's `WrappedTorchNorm` (`megatron/core/transformer/torch_norm.py` ~32) refuses
    `sequence_parallel` only because it does not mark its weight: a norm is per token, so it runs
    unchanged on a slice of the sequence, and each TP rank's weight gradient is then the sum over
    its slice only. Marking the weight `sequence_parallel` (as TE's and Apex's norms do) lets
    `finalize_model_grads._allreduce_non_tensor_model_parallel_grads` sum it over the TP group.
    This is what lets TP + SP run on a CPU over gloo, against the hf learner.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def build_gpt_model(shape: Qwen2Shape, tp: int = 1, spec: str = "local", **config_kwargs):
    """The GPTModel with the "local" or the "te" (Transformer Engine) layer spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    config = transformer_config(shape, tp, **config_kwargs)
    if spec == "te":
        layers = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    elif spec == "local":
        # Megatron's local spec with its torch norms replaced by `SequenceParallelRMSNorm` (the
        # same torch.nn.RMSNorm, its weight marked for sequence parallelism), for the layers' two
        # norms and the final one (a block spec: TransformerBlock would pick its own final norm).
        layers = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        layers.submodules.input_layernorm = SequenceParallelRMSNorm
        layers.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
        layers = TransformerBlockSubmodules(layer_specs=[layers] * shape.num_layers, layer_norm=SequenceParallelRMSNorm)
    else:
        raise ValueError(f"unknown layer spec {spec!r} (local or te)")
    return GPTModel(config, layers,
                    vocab_size=padded_vocab_size(shape.vocab_size, tp), max_sequence_length=shape.max_position_embeddings,
                    position_embedding_type="rope", rotary_base=int(shape.rope_theta),
                    share_embeddings_and_output_weights=shape.tie_word_embeddings)


def layer_spec(on_cpu: bool) -> str:
    """"te" on GPUs (required: packed attention needs it), "local" on a CPU."""
    if on_cpu:
        return "local"
    try:
        import transformer_engine  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "learner=megatron on GPUs needs Transformer Engine (pip install transformer-engine[pytorch]) "
            "for packed-sequence attention; without it use learner=hf") from e
    return "te"


def read_shape(model_path: str | Path) -> tuple[dict, Qwen2Shape]:
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json (learner=megatron loads an HF model directory)")
    config = json.loads(config_file.read_text())
    try:
        return config, Qwen2Shape.from_hf_config(config)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{config_file}: {e}") from e


def load_hf_state(model_path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the HF safetensors in `model_path` (one file or an indexed set)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_path}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state
