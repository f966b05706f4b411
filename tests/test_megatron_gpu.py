"""learner=megatron on GPUs (bf16, Transformer Engine layers, packed `thd` attention, NCCL):
against the hf learner on the same random Qwen2 model and batch. Skipped, with the reason, on a
machine without a CUDA GPU or without Transformer Engine; the CPU path is test_megatron_learner.py.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from justrl.learner.packing import build_micro_batch
from test_learner import DP_OPTIM, make_batch, tiny_cfg


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the megatron learner's GPU path)"),
    pytest.mark.skipif(not _have_te(), reason="needs Transformer Engine (pip install transformer-engine[pytorch])"),
]

# bf16 weights and compute on both sides: per-token log-probs agree to about 1e-2.
LOGPROB_ATOL = 5e-2
LOGPROB_MEAN_ATOL = 5e-3


def gpu_cfg(*overrides):
    return tiny_cfg("rollout.n=4", "algorithm.prompts_per_step=4", "algorithm.mini_batch_prompts=2",
                    "optim.warmup_steps=0", *DP_OPTIM, "learner.dtype=bfloat16",
                    "learner.gradient_checkpointing=true", "learner.micro_batch_tokens=4096", *overrides)


@pytest.fixture(scope="module")
def qwen2_dir(tiny_model_dir, tmp_path_factory):
    """A random Qwen2 model with GQA (8 heads, 2 KV heads), QKV bias, an untied output layer and
    the tiny tokenizer; bf16 safetensors, as the recipe's models are stored."""
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("qwen2") / "model"
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").unlink()
    config = Qwen2Config.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 512, 1408, 4
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 2, 64
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def _worker(rank, world, port, tp, model_dir, out):
    from justrl.learner import build_learner

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    cfg = gpu_cfg("learner=megatron")
    cfg.learner.tensor_parallel_size = tp
    learner = build_learner(cfg, model_dir)
    with torch.no_grad():
        logprobs, entropy = learner.forward(build_micro_batch(make_batch()), need_entropy=True)
    metrics = learner.train_step(make_batch())
    state = learner.gather_hf_state()
    if rank == 0:
        torch.save({"logprobs": logprobs.cpu(), "entropy": entropy.cpu(), "metrics": metrics,
                    "weights": {k: v.cpu() for k, v in state.items()}}, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def hf_result(qwen2_dir):
    from justrl.learner import build_learner

    learner = build_learner(gpu_cfg(), qwen2_dir)
    before = {k: v.detach().float().cpu().clone() for k, v in learner.model.state_dict().items()}
    with torch.no_grad():
        logprobs, entropy = learner.forward(build_micro_batch(make_batch()), need_entropy=True)
    metrics = learner.train_step(make_batch())
    after = {k: v.detach().float().cpu().clone() for k, v in learner.model.state_dict().items()}
    del learner
    torch.cuda.empty_cache()
    return {"logprobs": logprobs.cpu(), "entropy": entropy.cpu(), "metrics": metrics, "before": before,
            "after": after}


def _compare(got, ref):
    diff = (got["logprobs"] - ref["logprobs"]).abs()
    assert diff.max().item() < LOGPROB_ATOL and diff.mean().item() < LOGPROB_MEAN_ATOL
    assert (got["entropy"] - ref["entropy"]).abs().mean().item() < LOGPROB_MEAN_ATOL
    assert got["metrics"]["actor/pg_loss"] == pytest.approx(ref["metrics"]["actor/pg_loss"], abs=2e-3)
    assert got["metrics"]["actor/grad_norm"] == pytest.approx(ref["metrics"]["actor/grad_norm"], rel=5e-2)
    # "nearly the same new weights": each tensor's update points the same way as the hf
    # learner's (cosine > 0.9) and has nearly the same size. Megatron's exported weights are its
    # bf16 model weights: lr 1e-3 (DP_OPTIM) makes the update large against bf16's rounding.
    for key, after in ref["after"].items():
        if key not in got["weights"]:
            continue
        ours = got["weights"][key].float() - ref["before"][key]
        theirs = after - ref["before"][key]
        if theirs.norm() == 0:
            continue
        cosine = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0).item()
        assert cosine > 0.9, (key, cosine)
        assert ours.norm().item() == pytest.approx(theirs.norm().item(), rel=0.1), key


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_matches_the_hf_learner_in_bf16(qwen2_dir, hf_result, tmp_path, tp):
    """Log-probs and entropies within bf16 tolerance of the hf learner's, the same loss, and
    nearly the same update after one GRPO step (TP=2 where the machine has 2 GPUs)."""
    from justrl.cluster.placement import free_port

    if torch.cuda.device_count() < tp:
        pytest.skip(f"TP={tp} needs {tp} GPUs, this machine has {torch.cuda.device_count()}")
    mp.spawn(_worker, args=(tp, free_port(), tp, str(qwen2_dir), str(tmp_path / "out.pt")), nprocs=tp)
    _compare(torch.load(tmp_path / "out.pt"), hf_result)
