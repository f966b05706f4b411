"""The Megatron learner's recomputation default (issue 24, defect 8, first half).

The recipe (`cluster=slurm` chooses learner=megatron) must not ask Megatron to recompute the core
attention on GPUs: with Transformer Engine's fused attention that saves no memory and costs one
more attention forward per layer, and Megatron warns about it (megatron/core/transformer/
transformer_config.py ~1224-1229). The arithmetic behind "no recomputation" is in docs/megatron.md,
"Recomputation". These tests build the real TransformerConfig on the CPU, without the TE fusions
(`apply_rope_fusion` needs Transformer Engine installed, transformer_config.py ~1550; they do not
touch recomputation).
"""
import warnings

import pytest
import torch

from justrl.config import compose
from justrl.learner.megatron.adapter import Qwen2Shape
from justrl.learner.megatron.model import SELECTIVE_WITH_FUSED_ATTENTION, recompute_setting, transformer_config

# DeepSeek-R1-Distill-Qwen-1.5B's config.json (the recipe's model; no download here)
QWEN2_1_5B = Qwen2Shape(num_layers=28, hidden_size=1536, num_heads=12, num_kv_heads=2, head_dim=128,
                        ffn_hidden_size=8960, vocab_size=151936, tie_word_embeddings=False, rope_theta=10000.0,
                        rms_norm_eps=1e-6, max_position_embeddings=131072)


def _config_warnings(**kwargs) -> tuple[object, list[str]]:
    import megatron.core.transformer.transformer_config  # noqa: F401  (import-time warnings out of the way)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = transformer_config(QWEN2_1_5B, **kwargs)
    return config, [str(w.message) for w in caught]


def test_recipe_config_recomputes_nothing_and_megatron_does_not_warn():
    cfg = compose(["cluster=slurm"])
    learner = cfg.learner
    assert (learner.name, learner.micro_batch_tokens, learner.tensor_parallel_size) == ("megatron", 16384, 1)
    assert learner.gradient_checkpointing is False
    assert learner.recompute_granularity == "full"  # what turning it on gives
    # what the learner passes on GPUs (the TE spec) ...
    recompute = recompute_setting(learner.gradient_checkpointing, learner.recompute_granularity, spec="te")
    assert recompute is False
    tp = learner.tensor_parallel_size
    config, messages = _config_warnings(tp=tp, params_dtype=torch.bfloat16, recompute=recompute, bf16=True,
                                        per_token_loss=True, sequence_parallel=tp > 1)
    # ... and the TransformerConfig Megatron builds from it
    assert config.recompute_granularity is None and config.recompute_method is None
    assert not any("core_attn" in m for m in messages), messages


def test_the_other_models_and_the_ablations_keep_the_default_config():
    for overrides in (["cluster=slurm", "model=openmath_nemotron_1.5b"], ["cluster=slurm", "ablation=lenient"]):
        learner = compose(overrides).learner
        assert (learner.gradient_checkpointing, learner.recompute_granularity) == (False, "full"), overrides


def test_turning_recomputation_on_gives_full_uniform_without_the_core_attn_warning_config():
    learner = compose(["cluster=slurm", "learner.gradient_checkpointing=true"]).learner
    recompute = recompute_setting(learner.gradient_checkpointing, learner.recompute_granularity, spec="te")
    config, messages = _config_warnings(recompute=recompute, bf16=True, params_dtype=torch.bfloat16)
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "uniform", 1)
    assert not any("core_attn" in m for m in messages), messages


def test_selective_is_refused_with_the_te_spec_and_kept_for_the_local_one_config():
    learner = compose(["cluster=slurm", "learner.gradient_checkpointing=true",
                       "learner.recompute_granularity=selective"]).learner
    with pytest.raises(ValueError, match="learner.recompute_granularity=selective") as e:
        recompute_setting(learner.gradient_checkpointing, learner.recompute_granularity, spec="te")
    assert str(e.value) == SELECTIVE_WITH_FUSED_ATTENTION and "transformer_config.py ~1224" in str(e.value)
    # the local spec (CPU) keeps its L x L attention scores: there selective is worth it
    assert recompute_setting(True, "selective", spec="local") == "selective"
    config, messages = _config_warnings(recompute="selective")
    assert config.recompute_modules == ["core_attn"]
    assert any("core_attn" in m for m in messages)  # Megatron's warning exists, and the check above would see it
