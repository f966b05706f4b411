"""learner=megatron on a CPU: Megatron-core's own GPTModel, DDP, distributed optimizer and
distributed checkpointing, over gloo (justrl.learner.megatron.cpu keeps its tensors on the CPU).

Reference: the `hf` learner on the same tiny model and batch. Float32 on both sides, so the
figures are tight; the bf16 comparison is in test_megatron_gpu.py.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from justrl.learner.packing import build_micro_batch
from test_learner import DP_OPTIM, make_batch, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def megatron_cfg(tp: int, *overrides):
    cfg = tiny_cfg("learner=megatron", "learner.tensor_parallel_size=1", "rollout.n=4",
                   "algorithm.prompts_per_step=4", "algorithm.mini_batch_prompts=2", "optim.warmup_steps=0",
                   *DP_OPTIM, *overrides)
    # the launcher runs one learner rank on a CPU machine; these tests start several themselves
    cfg.learner.tensor_parallel_size = tp
    return cfg


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _spawn(fn, world: int, *args) -> None:
    from justrl.cluster.placement import free_port

    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world)


# -- vocabulary-parallel log-probs and entropy -----------------------------------------------------

def _reference_logprobs_entropy(logits, targets, vocab_size, temperature):
    from justrl.grpo import entropy_from_logits, token_logprobs

    real = logits[:, :vocab_size]
    return token_logprobs(real, targets, temperature), entropy_from_logits(real, temperature)


def _vocab_worker(rank, world, port, out):
    from justrl.learner.megatron.vocab_parallel import vocab_parallel_logprobs_entropy

    _init(rank, world, port)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2 * 16, generator=g) * 3
    targets = torch.tensor([0, 5, 15, 16, 29, 3])  # both halves, the last real id (29 of 30)
    local = logits[:, rank * 16:(rank + 1) * 16].clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_entropy(local, targets, rank * 16, vocab_size=30, temperature=0.7,
                                              group=dist.group.WORLD)
    (lp.sum() + 0.5 * ent.sum()).backward()
    torch.save({"lp": lp.detach(), "ent": ent.detach(), "grad": local.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_vocab_parallel_logprobs_and_entropy_equal_the_gathered_ones(tmp_path):
    """Two ranks with 16 columns each, 2 of them padding: the values and the gradient of every
    column equal those of the full, unpadded logits."""
    _spawn(_vocab_worker, 2, str(tmp_path / "vp"))
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 32, generator=g) * 3).requires_grad_(True)
    targets = torch.tensor([0, 5, 15, 16, 29, 3])
    lp, ent = _reference_logprobs_entropy(logits, targets, 30, 0.7)
    (lp.sum() + 0.5 * ent.sum()).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"vp.{rank}")
        torch.testing.assert_close(got["lp"], lp.detach(), rtol=0, atol=1e-6)
        # float32 entropy (~0.6) and its gradient: the order of the sum over 32 columns alone moves it by up to ~2e-6 on
        # some CPUs (seen on an AVX-512 VM, 2026-11-22)
        torch.testing.assert_close(got["ent"], ent.detach(), rtol=0, atol=4e-6)
        torch.testing.assert_close(got["grad"], logits.grad[:, rank * 16:(rank + 1) * 16], rtol=0, atol=4e-6)
    assert torch.all(logits.grad[:, 30:] == 0)


# -- the learner against the hf learner -------------------------------------------------------------

def _step_worker(rank, world, port, tp, model_dir, out):
    from justrl.learner import build_learner

    _init(rank, world, port)
    learner = build_learner(megatron_cfg(tp), model_dir)
    with torch.no_grad():
        logprobs, entropy = learner.forward(build_micro_batch(make_batch()), need_entropy=True)
    metrics = learner.train_step(make_batch())
    state = learner.gather_hf_state()
    torch.save(learner.hf_state_on_every_rank(), f"{out}.rank{rank}")  # what the ipc sync hands over
    marked = sorted(n for n, p in learner.gpt.named_parameters() if getattr(p, "sequence_parallel", False))
    if rank == 0:
        torch.save({"logprobs": logprobs, "entropy": entropy, "metrics": metrics, "weights": state,
                    "sequence_parallel": learner.sequence_parallel, "sp_marked": marked}, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gqa_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer with a random Qwen2 model that TP=2 can split (2 KV heads, 4
    query heads) and an untied output layer (the tiny model's is tied): both cases are covered."""
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("gqa") / "model"
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").unlink()
    config = Qwen2Config.from_pretrained(tiny_model_dir)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 32
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


_references: dict = {}


def hf_reference(model_dir):
    """The hf learner's log-probs, entropies, metrics and weights after one step (cached)."""
    from justrl.learner import build_learner

    if model_dir not in _references:
        torch.set_num_threads(1)
        learner = build_learner(tiny_cfg("rollout.n=4", "algorithm.prompts_per_step=4",
                                         "algorithm.mini_batch_prompts=2", "optim.warmup_steps=0", *DP_OPTIM),
                                model_dir)
        with torch.no_grad():
            logprobs, entropy = learner.forward(build_micro_batch(make_batch()), need_entropy=True)
        metrics = learner.train_step(make_batch())
        weights = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
        _references[model_dir] = {"logprobs": logprobs, "entropy": entropy, "metrics": metrics, "weights": weights}
    return _references[model_dir]


@pytest.mark.parametrize("model,tp,world", [("tiny", 1, 1), ("gqa", 1, 1), ("gqa", 2, 2), ("gqa", 1, 2)],
                         ids=["tied-tp1", "untied-tp1", "untied-tp2-sp", "untied-tp1-dp2"])
def test_one_grpo_step_equals_the_hf_learner(tiny_model_dir, gqa_model_dir, tmp_path, model, tp, world):
    """Same log-probs and entropies (vocabulary-parallel at TP=2), same loss and gradient norm,
    and the same weights after one update with two PPO mini-batches, whatever the TP x DP split,
    with a tied and an untied output layer.

    TP=2 runs with sequence parallelism, as on GPUs (the local spec's norms split along the
    sequence, the final hidden states gathered before the output layer): the gradient norm
    would be ~1.85x the hf learner's if the output layer's input gradient were all-reduced
    before the gather's reduce-scatter (every gradient below the output layer x TP)."""
    model_dir = tiny_model_dir if model == "tiny" else gqa_model_dir
    _spawn(_step_worker, world, tp, str(model_dir), str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt")
    assert got["sequence_parallel"] == (tp > 1)
    if tp > 1:  # every norm of the 2-layer model: its gradient is summed over the TP group
        assert got["sp_marked"] == ["decoder.final_layernorm.weight"] + [
            f"decoder.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "pre_mlp_layernorm")]
    ref = hf_reference(model_dir)
    torch.testing.assert_close(got["logprobs"], ref["logprobs"], rtol=0, atol=2e-5)
    torch.testing.assert_close(got["entropy"], ref["entropy"], rtol=0, atol=2e-5)
    for key in ("actor/pg_loss", "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-5), key
    assert got["metrics"]["actor/grad_norm"] == pytest.approx(ref["metrics"]["actor/grad_norm"], rel=1e-4)
    expected = {k: v for k, v in ref["weights"].items() if k in got["weights"]}
    tied = model == "tiny"
    assert set(ref["weights"]) - set(got["weights"]) == ({"lm_head.weight"} if tied else set())  # HF lists a tied one
    for key, value in expected.items():
        torch.testing.assert_close(got["weights"][key], value, rtol=0, atol=2e-5, msg=key)
    moved = max((ref["weights"][k] - v).abs().max().item() for k, v in got["weights"].items())
    assert moved < 2e-5
    # every rank holds the whole updated model for the ipc weight sync, equal to rank 0's gather
    for rank in range(world):
        everywhere = torch.load(f"{tmp_path / 'out.pt'}.rank{rank}")
        assert list(everywhere) == list(got["weights"])
        for key, value in got["weights"].items():
            assert torch.equal(everywhere[key], value), (rank, key)


def _nonfinite_worker(rank, world, port, model_dir, out):
    from justrl.learner import NonFiniteError, build_learner
    from justrl.grpo import Sequence

    _init(rank, world, port)
    learner = build_learner(megatron_cfg(1, "learner.max_nonfinite_updates=3"), model_dir)
    before = learner.gather_hf_state()
    bad = [Sequence(s.prompt_ids, s.response_ids, float("nan")) for s in make_batch()]
    first = learner.train_step(bad)  # two mini-batches: two skipped updates
    unchanged = all(torch.equal(before[k], v) for k, v in learner.gather_hf_state().items())
    learner.train_step(make_batch())
    reset = learner.nonfinite.consecutive
    learner.train_step(bad)
    try:
        learner.train_step(bad)
        message = None
    except NonFiniteError as e:
        message = str(e)
    torch.save({"first": first, "unchanged": unchanged, "reset": reset, "message": message}, out)
    dist.destroy_process_group()


def test_non_finite_updates_are_skipped_then_stop_the_run(tiny_model_dir, tmp_path):
    """NaN advantages: the update is skipped on every rank (the weights do not move), a finite
    step resets the count, and the third in a row stops the run with the setting's name."""
    _spawn(_nonfinite_worker, 1, str(tiny_model_dir), str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt")
    assert got["first"]["actor/skipped_updates"] == 2.0 and got["unchanged"] and got["reset"] == 0
    assert got["message"] is not None and "3 updates in a row" in got["message"]
    assert "learner.max_nonfinite_updates=3" in got["message"]


# -- checkpoints: resume with another DP size, merge TP shards into HF -------------------------------

def _checkpoint_worker(rank, world, port, tp, model_dir, root, phase):
    from transformers import AutoTokenizer

    from justrl import checkpoint as ckpt
    from justrl.learner import build_learner

    _init(rank, world, port)
    learner = build_learner(megatron_cfg(tp, "optim.warmup_steps=3"), model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if phase == "save":
        learner.train_step(make_batch())
        tmp = ckpt.begin_checkpoint(f"{root}/checkpoints", 1) if rank == 0 else None
        box = [tmp]
        dist.broadcast_object_list(box)
        learner.save_checkpoint(box[0], tokenizer)
        if rank == 0:
            ckpt.finish_checkpoint(f"{root}/checkpoints", 1)
        saved = learner.gather_hf_state()
        learner.train_step(make_batch(seed=5))
    else:
        learner.load_checkpoint(ckpt.latest_checkpoint(f"{root}/checkpoints"))
        saved = None
        learner.train_step(make_batch(seed=5))
    after = learner.gather_hf_state()
    if rank == 0:
        torch.save({"saved": saved, "after": after, "lr": learner.optimizer.param_groups[0]["lr"]},
                   f"{root}/{phase}-{world}.pt")
    dist.destroy_process_group()


def test_checkpoint_resumes_with_another_data_parallel_size(tiny_model_dir, tmp_path):
    """Saved by 2 DP ranks (each holding half of the optimizer state), resumed by 1: the next
    step gives the weights the run that never stopped got, and the schedule goes on."""
    _spawn(_checkpoint_worker, 2, 1, str(tiny_model_dir), str(tmp_path), "save")
    _spawn(_checkpoint_worker, 1, 1, str(tiny_model_dir), str(tmp_path), "resume")
    a, b = torch.load(tmp_path / "save-2.pt"), torch.load(tmp_path / "resume-1.pt")
    for key, value in a["after"].items():
        torch.testing.assert_close(b["after"][key], value, rtol=0, atol=1e-6, msg=key)
    assert a["lr"] == b["lr"] == pytest.approx(1e-3 * 2 / 3)
    step = tmp_path / "checkpoints" / "step_000001"
    assert (step / "megatron" / "metadata.json").is_file() and (step / "hf_config" / "config.json").is_file()
    # the same checkpoint merged (tied output layer: HF ties lm_head to the embedding on load)
    from transformers import AutoModelForCausalLM

    assert _merge(step, tmp_path / "merged").returncode == 0
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert all(torch.equal(state[k], v) for k, v in a["saved"].items())
    assert torch.equal(state["lm_head.weight"], a["saved"]["model.embed_tokens.weight"])


def test_merge_tool_turns_a_tp2_checkpoint_into_hf(gqa_model_dir, tmp_path):
    """A checkpoint written by 2 TP ranks, merged by tools/merge_checkpoint.py: transformers loads
    the result, with exactly the weights the learner held (untied output layer), and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _spawn(_checkpoint_worker, 2, 2, str(gqa_model_dir), str(tmp_path), "save")
    saved = torch.load(tmp_path / "save-2.pt")["saved"]
    step = tmp_path / "checkpoints" / "step_000001"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "merge_checkpoint.py"), str(step),
                             str(tmp_path / "merged")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    state = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert not model.config.tie_word_embeddings and "lm_head.weight" in saved
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").get_vocab() == \
        AutoTokenizer.from_pretrained(gqa_model_dir).get_vocab()


def _merge(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "merge_checkpoint.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_merge_tool_refuses_what_is_not_a_complete_checkpoint(tiny_model_dir, tmp_path):
    from justrl.learner.megatron.checkpoint import NotAMegatronCheckpoint, merge_checkpoint

    # the tool: exit status 2 and the reason, nothing written
    missing = _merge(tmp_path / "nope", tmp_path / "out")
    assert missing.returncode == 2 and "merge_checkpoint: " in missing.stderr
    assert "nope: no such file or directory" in missing.stderr and not (tmp_path / "out").exists()

    def refused(path) -> str:  # what the tool prints, from the function it calls (no process per case)
        with pytest.raises(NotAMegatronCheckpoint) as e:
            merge_checkpoint(path, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return str(e.value)

    (tmp_path / "hfrun" / "hf").mkdir(parents=True)
    assert "a learner=hf checkpoint; its weights are already an HF directory" in refused(tmp_path / "hfrun")
    assert "not a Megatron checkpoint (no megatron/metadata.json)" in refused(tiny_model_dir)

    # an interrupted save: the files of a real checkpoint, without the COMPLETE marker
    _spawn(_checkpoint_worker, 1, 1, str(tiny_model_dir), str(tmp_path / "run"), "save")
    step = tmp_path / "run" / "checkpoints" / "step_000001"
    (step / "COMPLETE").unlink()
    assert "incomplete checkpoint (no COMPLETE marker" in refused(step)
    # a shard file lost
    (step / "COMPLETE").write_text('{"step": 1}\n')
    for shard in (step / "megatron").glob("*.distcp"):
        shard.unlink()
    assert "cannot read the model tensors" in refused(step)


# -- end to end ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_run_with_megatron_resumes_and_its_checkpoint_merges_for_vllm(tiny_model_dir, tmp_path):
    """`python -m justrl.launch experiment=tiny learner=megatron`: 2 steps with a real vLLM engine,
    relaunched to 4 (resumed from the step-2 Megatron checkpoint, engines started from its
    export); the step-4 checkpoint, merged, holds the weights the engines were last given, and a
    vLLM server loads it and generates."""
    from safetensors.torch import load_file

    from justrl.rollout.engine import EngineSpec, EngineProcess
    from justrl.rollout.client import SamplingSettings
    from justrl.rollout.fleet import RolloutFleet
    from justrl.tb import read_scalars

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "justrl.launch", "experiment=tiny", "learner=megatron", f"model.path={tiny_model_dir}",
           f"trainer.output_dir={run}", "trainer.save_every=2", "trainer.val_every=0"]
    for steps in (2, 4):
        result = subprocess.run(cmd + [f"trainer.total_steps={steps}"], cwd=REPO, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
    log = (run / "train.log").read_text()
    assert "resuming from" in log and f"serving {run / 'weights' / 'step_000002'}" in log
    scalars = read_scalars(run)
    assert [s for s, _ in scalars["actor/lr"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["actor/lr"]] == pytest.approx([0.0, 5e-5, 1e-4, 1e-4])
    assert all(v > 0 for _, v in scalars["actor/grad_norm"])

    step4 = run / "checkpoints" / "step_000004"
    assert sorted(p.name for p in step4.iterdir()) == ["COMPLETE", "config.yaml", "hf_config", "megatron",
                                                       "trainer_state.pt"]
    merged = tmp_path / "merged"
    assert _merge(step4, merged).returncode == 0
    served = load_file(run / "weights" / "step_000004" / "model.safetensors")
    state = load_file(merged / "model.safetensors")
    assert state.keys() == served.keys() and all(torch.equal(state[k], served[k]) for k in served)

    spec = EngineSpec(max_model_len=256, dtype="float32", seed=0, gpu_memory_utilization=0.3, startup_timeout_s=300,
                      request_timeout_s=300)
    fleet = RolloutFleet([EngineProcess("engine0", spec, tmp_path / "engine0.log")], merged, max_restarts=0)
    fleet.start()
    try:
        out = fleet.generate([[1, 5, 6, 7]], SamplingSettings(n=2, temperature=1.0, top_p=1.0, top_k=-1,
                                                              max_tokens=8), seeds=[3])
    finally:
        fleet.stop()
    assert len(out) == 1 and len(out[0]) == 2 and all(len(r.token_ids) >= 1 for r in out[0])
