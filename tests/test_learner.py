"""The hf learner: the recipe's schedule, a real update, two-rank data parallelism equal to one
rank, non-finite updates skipped then stopped, and HF exports that transformers loads."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from justrl.config import compose
from justrl.learner import HFLearner, NonFiniteError, build_learner
from justrl.learner.step import constant_with_warmup
from justrl.grpo import Sequence


def tiny_cfg(*overrides):
    return compose(["experiment=tiny", *overrides])


def make_batch(n_prompts: int = 4, n: int = 4, seed: int = 0) -> list[Sequence]:
    """GRPO-shaped sequences: n responses of different lengths per prompt, advantages summing to 0."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for p in range(n_prompts):
        prompt = tuple(torch.randint(3, 1000, (5 + p,), generator=g).tolist())
        advantages = torch.randn(n, generator=g)
        advantages -= advantages.mean()
        for k in range(n):
            response = tuple(torch.randint(3, 1000, (3 + (p * n + k) % 7,), generator=g).tolist())
            seqs.append(Sequence(prompt, response, float(advantages[k])))
    return seqs


def learner_for(model_dir, *overrides) -> HFLearner:
    cfg = tiny_cfg("rollout.n=4", "algorithm.prompts_per_step=4", "algorithm.mini_batch_prompts=2",
                   "optim.warmup_steps=0", *overrides)
    return build_learner(cfg, model_dir)


def weights(learner: HFLearner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


def test_schedule_is_verls_constant_with_warmup():
    f = constant_with_warmup(10)
    assert [f(s) for s in (0, 1, 5, 9, 10, 4000)] == [0.0, 0.1, 0.5, 0.9, 1.0, 1.0]
    assert constant_with_warmup(0)(0) == 1.0


def test_first_step_with_warmup_moves_nothing_then_updates(tiny_model_dir):
    """With warm-up the first step's learning rate is 0 (as in veRL): weights unchanged. The
    second step has lr = lr / warmup and changes them."""
    learner = learner_for(tiny_model_dir, "optim.warmup_steps=2", "optim.lr=1e-3")
    before = weights(learner)
    m1 = learner.train_step(make_batch())
    assert m1["actor/lr"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in weights(learner).items())
    m2 = learner.train_step(make_batch(seed=1))
    assert m2["actor/lr"] == pytest.approx(5e-4)
    changed = weights(learner)
    assert any(not torch.equal(before[k], changed[k]) for k in before)
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/grad_norm",
                "perf/padding_fraction", "perf/micro_batch_fill"):
        assert math.isfinite(m2[key]), key
    # the old log-probs are recomputed with the same weights, so the first mini-batch's ratio is 1:
    # nothing is clipped on the first update of a step, and the entropy of a 1024-token vocabulary
    # is below log(1024)
    assert m1["actor/pg_clipfrac"] == 0.0 and m1["actor/ppo_kl"] == 0.0
    assert 0 < m2["actor/entropy"] < math.log(1024)
    assert m2["actor/skipped_updates"] == 0.0 and m2["perf/padding_fraction"] == 0.0


def test_first_mini_batch_old_logprobs_equal_a_full_recompute(tiny_model_dir, monkeypatch):
    """The step's first mini-batch takes its old log-probs from its own training forward (no
    optimizer step has happened yet) instead of a separate no-grad pass: the same values, so the
    same update. Checked against the full recompute, bit for bit: the weights and every metric."""
    import justrl.learner.step as step

    batch = make_batch(n_prompts=4)
    fast = learner_for(tiny_model_dir, "optim.lr=1e-3")
    m_fast = fast.train_step(batch)

    full = learner_for(tiny_model_dir, "optim.lr=1e-3")
    plain_update = step._mini_batch_update

    def recompute_first(backend, plan, num_tokens, settings):
        for micro in plan:  # what the update did before: old log-probs from a no-grad pass
            if micro.old_logprobs is None:
                backend.model.eval()
                with torch.no_grad():
                    micro.old_logprobs = backend.forward(micro, need_entropy=False, response_only=True)[0]
                backend.model.train()
        return plain_update(backend, plan, num_tokens, settings)

    monkeypatch.setattr(step, "_mini_batch_update", recompute_first)
    m_full = full.train_step(batch)
    assert m_fast == m_full
    assert m_fast["actor/ppo_kl"] != 0.0  # the second mini-batch ran after an update
    a, b = weights(fast), weights(full)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _dp_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    learner = learner_for(model_dir, *DP_OPTIM)
    metrics = learner.train_step(make_batch())
    if rank == 0:
        torch.save({"weights": weights(learner), "metrics": metrics}, out)
    dist.destroy_process_group()


# Adam's first step is lr * g / (|g| + eps): with the default eps a coordinate whose gradient is
# ~0 moves by +-lr depending on rounding noise. A larger eps makes the update a smooth function of
# the gradient, so equal updates mean equal gradients.
DP_OPTIM = ("optim.lr=1e-3", "optim.eps=1e-3")


def test_two_rank_data_parallel_equals_one_rank(tiny_model_dir, tmp_path):
    from justrl.cluster.placement import free_port

    torch.set_num_threads(1)
    single = learner_for(tiny_model_dir, *DP_OPTIM)
    m_single = single.train_step(make_batch())
    mp.spawn(_dp_worker, args=(2, free_port(), str(tiny_model_dir), str(tmp_path / "dp.pt")), nprocs=2)
    dp = torch.load(tmp_path / "dp.pt")
    for key, value in weights(single).items():
        torch.testing.assert_close(dp["weights"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/pg_clipfrac"):
        assert dp["metrics"][key] == pytest.approx(m_single[key], rel=1e-4, abs=1e-7), key


def test_non_finite_updates_are_skipped_then_stop_the_run(tiny_model_dir):
    learner = learner_for(tiny_model_dir, "learner.max_nonfinite_updates=3", "optim.lr=1e-3")
    before = weights(learner)
    bad = [Sequence(s.prompt_ids, s.response_ids, float("nan")) for s in make_batch()]
    # two mini-batches per step: the first step skips two updates and leaves the weights alone
    metrics = learner.train_step(bad)
    assert metrics["actor/skipped_updates"] == 2.0 and not math.isfinite(metrics["actor/pg_loss"])
    assert all(torch.equal(before[k], v) for k, v in weights(learner).items())
    # a finite update in between resets the count
    learner.train_step(make_batch())
    assert learner.nonfinite.consecutive == 0
    learner.train_step(bad)
    with pytest.raises(NonFiniteError, match=r"3 updates in a row.*learner.max_nonfinite_updates=3"):
        learner.train_step(bad)


def test_export_hf_loads_in_transformers_with_the_same_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner = learner_for(tiny_model_dir, "optim.lr=1e-3")
    learner.train_step(make_batch())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = learner.export_hf(tmp_path / "export", tokenizer)
    assert not (tmp_path / "export.tmp").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for key, value in learner.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    half = learner.export_hf(tmp_path / "bf16", tokenizer, dtype="bfloat16")
    reloaded = AutoModelForCausalLM.from_pretrained(half, dtype=torch.bfloat16)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(reloaded.model.embed_tokens.weight.float(), learner.model.model.embed_tokens.weight,
                               rtol=1e-2, atol=1e-2)


def test_optimizer_state_round_trip(tiny_model_dir, tmp_path):
    """Save after one step, restore into a fresh learner built from the export: the next step
    gives the same weights as the learner that never stopped."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    a = learner_for(tiny_model_dir, "optim.lr=1e-3", "optim.warmup_steps=3")
    a.train_step(make_batch())
    a.export_hf(tmp_path / "hf", tokenizer)
    a.save_state(tmp_path)
    b = learner_for(tmp_path / "hf", "optim.lr=1e-3", "optim.warmup_steps=3")
    b.load_state(tmp_path)
    a.train_step(make_batch(seed=5))
    b.train_step(make_batch(seed=5))
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 / 3)


def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir):
    plain = learner_for(tiny_model_dir, "optim.lr=1e-3", "optim.eps=1e-3", "learner.gradient_checkpointing=false")
    recompute = learner_for(tiny_model_dir, "optim.lr=1e-3", "optim.eps=1e-3", "learner.gradient_checkpointing=true")
    assert recompute.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    m_plain, m_recompute = plain.train_step(make_batch()), recompute.train_step(make_batch())
    assert m_recompute["actor/grad_norm"] == pytest.approx(m_plain["actor/grad_norm"], rel=1e-5)
    for key, value in weights(plain).items():
        torch.testing.assert_close(weights(recompute)[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_varlen_bounds_follow_the_model_device_on_the_flash_path_only():
    """flash-attn's mha_varlen_fwd rejects CPU cu_seqlens (CHECK_DEVICE): on the flash path the
    boundaries go to the model's device ('meta' stands in for the GPU here), on the SDPA path
    they stay on the CPU; the values are the row's sequence starts either way."""
    from justrl.learner import varlen_attention

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    gpu = torch.device("meta")
    flash = varlen_attention.varlen_kwargs(position_ids, varlen_attention.bounds_device("flash_attention_2", gpu))
    sdpa = varlen_attention.varlen_kwargs(position_ids, varlen_attention.bounds_device("justrl_varlen", gpu))
    assert flash["cu_seq_lens_q"].device.type == "meta" and flash["cu_seq_lens_k"].device.type == "meta"
    assert sdpa["cu_seq_lens_q"].device.type == "cpu"
    assert sdpa["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and sdpa["max_length_q"] == 4 == flash["max_length_k"]
