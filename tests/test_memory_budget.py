"""The colocated GPU's memory budget (justrl.cluster.memory_budget): the terms against docs/megatron.md's
derivation, the recipe's default fitting an 80 GB GPU in both phases, what does not fit named with
the key to change, and the preflight's line."""
import json

from justrl.config import compose
from justrl.cluster.memory_budget import GIB, ModelShape, colocated_budget

# DeepSeek-R1-Distill-Qwen-1.5B's config.json (the fields read)
DEEPSEEK = {"num_hidden_layers": 28, "hidden_size": 1536, "intermediate_size": 8960, "vocab_size": 151936,
            "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": False}


def test_terms_match_the_megatron_derivation():
    shape = ModelShape.from_hf_config(DEEPSEEK)
    assert shape.params == 1_777_088_000  # 1.777B (docs/megatron.md)
    assert shape.activation_bytes_per_token() == 2 * 36_608  # 73.2 KB a token a layer
    tied = ModelShape.from_hf_config({**DEEPSEEK, "tie_word_embeddings": True})
    assert shape.params - tied.params == 151936 * 1536


def test_the_recipe_fits_80_gb_in_both_phases():
    cfg = compose(["cluster=slurm"])
    b = colocated_budget(ModelShape.from_hf_config(DEEPSEEK), cfg.cluster, cfg.rollout, cfg.learner)
    assert b.engine_awake == 0.8 * 80 * GIB
    # 1.777e9 x (2 + 4) + 1.777e9 x 12 / 32 = 11.3e9 B
    assert abs(b.learner_resident - 1.777088e9 * (6 + 12 / 32)) < 1
    # + 28 layers x 73.2 KB x 16,384 tokens (33.6e9) + 2048 x 151,936 x 10 (3.1e9)
    assert abs(b.learner_peak - b.learner_resident - (28 * 73_216 * 16_384 + 2048 * 151_936 * 10)) < 1
    assert b.fits and b.generating / GIB < 80 and b.training / GIB < 50
    # pushing by ipc: the state + the engine's bf16 weights + the learner's bf16 copy (2 x 3.55e9 B)
    assert cfg.rollout.weight_sync == "ipc" and b.engine_weights == b.handover == 1.777088e9 * 2
    assert abs(b.pushing - (b.learner_resident + 2 * 1.777088e9 * 2 + 2.5 * GIB)) < 1 and b.pushing / GIB < 21
    assert b.line().endswith(": fits")
    files = compose(["cluster=slurm", "rollout.weight_sync=files"])
    assert colocated_budget(ModelShape.from_hf_config(DEEPSEEK), files.cluster, files.rollout, files.learner).handover == 0


def test_what_does_not_fit_names_the_key():
    shape = ModelShape.from_hf_config(DEEPSEEK)
    cfg = compose(["cluster=slurm", "rollout.gpu_memory_utilization=0.9"])
    b = colocated_budget(shape, cfg.cluster, cfg.rollout, cfg.learner)
    assert not b.fits and "generating is over: lower rollout.gpu_memory_utilization" in b.line()
    cfg = compose(["cluster=slurm", "learner.micro_batch_tokens=65536"])
    b = colocated_budget(shape, cfg.cluster, cfg.rollout, cfg.learner)
    assert not b.fits and "training is over: lower learner.micro_batch_tokens" in b.line()
    cfg = compose(["cluster=slurm", "learner.micro_batch_tokens=65536", "learner.gradient_checkpointing=true"])
    assert colocated_budget(shape, cfg.cluster, cfg.rollout, cfg.learner).fits  # recomputation keeps layer inputs


def test_preflight_prints_the_budget_when_colocated_on_gpus(tmp_path):
    from justrl.cluster.preflight_report import memory_lines as _memory_lines

    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK))
    cfg = compose(["cluster=slurm", f"model.path={tmp_path}"])
    (line,) = _memory_lines(cfg)
    assert line.startswith("each of the 32 GPUs: one learner rank and its engine's share; memory per GPU")
    assert _memory_lines(compose(["cluster=slurm", "cluster.placement=disaggregated", f"model.path={tmp_path}"])) == []
    (missing,) = _memory_lines(compose(["cluster=slurm", f"model.path={tmp_path / 'nothing'}"]))
    assert "not estimated" in missing
