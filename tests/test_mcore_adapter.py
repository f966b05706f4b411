"""HF <-> Megatron-core for Qwen2 models on CPU: Megatron builds the architecture from config.json
with HF's parameter count, HF -> Megatron -> HF is bitwise identical, TP=2 and TP=4 split then merge
exactly, and the mapped state dict loads into the GPTModel by name and shape."""
import json

import pytest
import torch

from justrl.learner.megatron.adapter import Qwen2Shape, hf_to_mcore, mcore_to_hf, merge_tp, padded_vocab_size

# DeepSeek-R1-Distill-Qwen-1.5B's config.json (the fields that shape the model): untied output layer.
DEEPSEEK_1_5B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                 "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 10000,
                 "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "tie_word_embeddings": False}
# The same shape with the embeddings tied, as in the Qwen2.5-1.5B-based models.
TIED_1_5B = {**DEEPSEEK_1_5B, "tie_word_embeddings": True}
# A small config whose 4 KV heads allow TP = 2 and 4 (the 1.5B models have 2 KV heads: TP <= 2).
GQA4 = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 300,
        "rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 256}


def hf_model(config: dict, tied: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**config, "tie_word_embeddings": tied}))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hf_param_count(config: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_and_tp_split_merge_are_exact(tp, tied):
    shape = Qwen2Shape.from_hf_config({**GQA4, "tie_word_embeddings": tied})
    hf = hf_model(GQA4, tied)
    shards = hf_to_mcore(hf, shape, tp)
    assert len(shards) == tp
    vocab = padded_vocab_size(300, tp)
    assert shards[0]["embedding.word_embeddings.weight"].shape == (vocab // tp, 128)
    assert ("output_layer.weight" in shards[0]) == (not tied)
    back = mcore_to_hf(shards, shape)
    expected = {k: v for k, v in hf.items() if not (tied and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for key, value in expected.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # split at tp, merge, compare with the direct TP=1 conversion
    single = hf_to_mcore(hf, shape, 1)[0]
    merged = merge_tp(shards, shape)
    assert merged.keys() == single.keys() and all(torch.equal(merged[k], single[k]) for k in single)


def test_qkv_fusion_follows_megatron_groups():
    """Query group g's rows are [q heads of g; k_g; v_g]: checked on labelled rows."""
    shape = Qwen2Shape.from_hf_config(GQA4)
    hf = hf_model(GQA4, tied=True)
    a = "model.layers.0.self_attn."
    d, per = 16, 2  # head_dim, query heads per group
    hf[a + "q_proj.bias"] = torch.arange(8 * d, dtype=torch.float32)
    hf[a + "k_proj.bias"] = 1000 + torch.arange(4 * d, dtype=torch.float32)
    hf[a + "v_proj.bias"] = 2000 + torch.arange(4 * d, dtype=torch.float32)
    fused = hf_to_mcore(hf, shape)[0]["decoder.layers.0.self_attention.linear_qkv.bias"]
    group1 = fused[(per + 2) * d:2 * (per + 2) * d]
    assert group1[:per * d].tolist() == list(range(per * d, 2 * per * d))          # q heads 2, 3
    assert group1[per * d:(per + 1) * d].tolist() == [1000.0 + i for i in range(d, 2 * d)]  # k of group 1
    assert group1[(per + 1) * d:].tolist() == [2000.0 + i for i in range(d, 2 * d)]        # v of group 1


def test_tp_must_divide_kv_heads():
    with pytest.raises(ValueError, match="tensor parallel size 4 must divide the KV heads \\(2\\)"):
        hf_to_mcore({}, Qwen2Shape.from_hf_config(DEEPSEEK_1_5B), tp=4)


@pytest.fixture(scope="module")
def megatron_tp1():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from justrl.cluster.placement import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def megatron_param_count(config: dict) -> tuple[int, int]:
    """(parameters of the Megatron model, of which vocabulary padding)."""
    from justrl.learner.megatron.model import build_gpt_model

    shape = Qwen2Shape.from_hf_config(config)
    model = build_gpt_model(shape, params_dtype=torch.bfloat16, initialize=False)
    padding = (padded_vocab_size(shape.vocab_size, 1) - shape.vocab_size) * shape.hidden_size
    total = sum(p.numel() for p in model.parameters())
    del model
    return total, padding * (1 if shape.tie_word_embeddings else 2)


@pytest.mark.slow  # builds two 1.5B models on the CPU (bf16, not initialised)
@pytest.mark.parametrize("config", [DEEPSEEK_1_5B, TIED_1_5B], ids=["deepseek-1.5b-untied", "1.5b-tied"])
def test_megatron_model_has_hf_parameter_count_at_1_5b(megatron_tp1, config):
    total, padding = megatron_param_count(config)
    assert total - padding == hf_param_count(config)
    assert hf_param_count(config) == (1_777_088_000 if not config["tie_word_embeddings"] else 1_543_714_304)


def test_tiny_model_maps_into_megatron_by_name_and_shape(megatron_tp1, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from justrl.learner.megatron.model import build_gpt_model

    config = json.loads((tiny_model_dir / "config.json").read_text())
    shape = Qwen2Shape.from_hf_config(config)
    assert shape.tie_word_embeddings and shape.rope_theta == 10000.0
    model = build_gpt_model(shape)
    total = sum(p.numel() for p in model.parameters())
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert total == sum(v.numel() for k, v in hf.items() if k != "lm_head.weight")  # 1024 = 8 x 128: no padding
    mapped = hf_to_mcore(load_file(tiny_model_dir / "model.safetensors"), shape)[0]
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("_extra_state") for k in result.missing_keys)
    for key, value in mapped.items():
        assert torch.equal(model.state_dict()[key], value), key
