"""A Megatron-core GPTModel with a Qwen2 model's architecture, from its HF config.json.

GQA (num_query_groups = KV heads), QKV bias, no other bias, RoPE with the config's theta, SwiGLU
(gated linear unit with SiLU), RMSNorm with the config's eps, tied or untied output layer as the
config says, vocabulary padded for tensor parallelism. Needs megatron.core.parallel_state to be
initialised (TP size as wanted); builds on a CPU (`use_cpu_initialization`), but Megatron's
forward needs CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from justrl.learner.mcore_adapter import Qwen2Shape, padded_vocab_size


def transformer_config(shape: Qwen2Shape, tp: int = 1, params_dtype: torch.dtype = torch.float32,
                       on_cpu: bool = True, initialize: bool = True, recompute: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads, kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn_hidden_size,
        add_qkv_bias=True, add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", layernorm_epsilon=shape.rms_norm_eps, tensor_model_parallel_size=tp,
        params_dtype=params_dtype, use_cpu_initialization=on_cpu, perform_initialization=initialize,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        recompute_granularity="full" if recompute else None, recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


def build_gpt_model(shape: Qwen2Shape, tp: int = 1, **config_kwargs):
    """The GPTModel (local layer spec: plain torch modules, no Transformer Engine)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(transformer_config(shape, tp, **config_kwargs), get_gpt_layer_local_spec(),
                    vocab_size=padded_vocab_size(shape.vocab_size, tp), max_sequence_length=shape.max_position_embeddings,
                    position_embedding_type="rope", rotary_base=int(shape.rope_theta),
                    share_embeddings_and_output_weights=shape.tie_word_embeddings)
