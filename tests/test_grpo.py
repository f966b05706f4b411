"""GRPO math on hand-computed numbers, and gradient-accumulation invariance of token-mean."""
import math

import pytest
import torch

from justrl.grpo import entropy_from_logits, group_advantages, masked_mean, policy_loss, token_logprobs


def test_group_advantages_hand_computed():
    # group 0: rewards [1, -1, -1, -1]: mean -0.5, unbiased std = sqrt(3 * 0.25 + 2.25) / sqrt(3) = 1
    # group 1: rewards [1, 1, 1, 1]: all equal -> 0
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, groups)
    eps = 1e-6
    expected = torch.tensor([1.5 / (1 + eps), -0.5 / (1 + eps), -0.5 / (1 + eps), -0.5 / (1 + eps), 0, 0, 0, 0])
    torch.testing.assert_close(adv, expected, rtol=0, atol=2.5e-7)  # 1 ulp at 1.5


def test_group_advantages_interleaved_groups_and_unbiased_std():
    rewards = torch.tensor([0.0, 3.0, 1.0, 5.0, 2.0, 1.0])
    groups = torch.tensor([7, 3, 7, 3, 7, 3])  # group 7: [0, 1, 2]; group 3: [3, 5, 1]
    adv = group_advantages(rewards, groups, eps=0.0)
    # group 7: mean 1, unbiased std 1 -> [-1, 0, 1]; group 3: mean 3, std 2 -> [0, 1, -1]
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 0.0, 1.0, 1.0, -1.0]))


def test_group_advantages_equal_rewards_exactly_zero_even_with_rounding():
    # 0.1 + length penalties: a float32 mean of 8 copies may differ from each copy by an ulp
    rewards = torch.full((8,), -0.7318, dtype=torch.float32)
    assert torch.count_nonzero(group_advantages(rewards, torch.zeros(8, dtype=torch.long))) == 0


def test_group_advantages_single_response_group_follows_reference():
    adv = group_advantages(torch.tensor([1.0, -1.0]), torch.tensor([0, 1]))
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]) / (1 + 1e-6))


def test_group_advantages_bad_shapes():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError):
        group_advantages(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def _loss_case(log_ratio: float, advantage: float, **kw):
    new = torch.tensor([[log_ratio]])
    old = torch.zeros(1, 1)
    return policy_loss(new, old, torch.tensor([advantage]), torch.ones(1, 1), **kw)


@pytest.mark.parametrize("ratio, adv, expected_loss, clipped, dual", [
    # inside the trust region: -A * ratio
    (1.1, 1.0, -1.1, 0.0, 0.0),
    (0.9, -1.0, 0.9, 0.0, 0.0),
    # positive advantage above 1 + clip_high: clipped at 1.28
    (1.5, 1.0, -1.28, 1.0, 0.0),
    (1.5, 2.0, -2.56, 1.0, 0.0),
    # positive advantage below 1 - clip_low: the unclipped term is larger, not clipped
    (0.5, 1.0, -0.5, 0.0, 0.0),
    # negative advantage below 1 - clip_low: clipped at 0.8
    (0.5, -1.0, 0.8, 1.0, 0.0),
    # negative advantage above 1 + clip_high: not clipped by PPO (max keeps -A * ratio) ...
    (2.0, -1.0, 2.0, 0.0, 0.0),
    # ... until the dual clip caps it at -A * c = 10
    (20.0, -1.0, 10.0, 0.0, 1.0),
    (20.0, -0.5, 5.0, 0.0, 1.0),
])
def test_policy_loss_hand_computed(ratio, adv, expected_loss, clipped, dual):
    loss, metrics = _loss_case(math.log(ratio), adv)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["actor/pg_clipfrac"].item() == clipped
    assert metrics["actor/pg_clipfrac_lower"].item() == dual
    assert metrics["actor/ppo_kl"].item() == pytest.approx(-math.log(ratio), rel=1e-6)


def test_policy_loss_clip_bounds_are_configurable():
    loss, _ = _loss_case(math.log(1.5), 1.0, clip_high=0.4)
    assert loss.item() == pytest.approx(-1.4, rel=1e-6)
    loss, _ = _loss_case(math.log(0.5), -1.0, clip_low=0.3)
    assert loss.item() == pytest.approx(0.7, rel=1e-6)
    loss, _ = _loss_case(math.log(20.0), -1.0, clip_c=3.0)
    assert loss.item() == pytest.approx(3.0, rel=1e-6)


def test_policy_loss_log_ratio_is_clamped_at_20():
    loss, metrics = _loss_case(50.0, -0.01, clip_c=1e12)
    assert loss.item() == pytest.approx(0.01 * math.exp(20.0), rel=1e-5)
    assert metrics["actor/ppo_kl"].item() == pytest.approx(-20.0)


def test_policy_loss_token_mean_over_mask_and_given_count():
    new = torch.log(torch.tensor([[1.1, 0.9, 5.0], [1.0, 1.0, 1.0]]))
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    # token losses: -1.1, -0.9, (masked), +2.0 -> sum 0.0 over 3 tokens
    loss, _ = policy_loss(new, old, adv, mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    new2 = torch.log(torch.tensor([[1.2, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    loss, metrics = policy_loss(new2, old, adv, mask)                 # (-1.2 - 1.0 + 2.0) / 3
    assert loss.item() == pytest.approx(-0.2 / 3, rel=1e-5)
    loss, metrics = policy_loss(new2, old, adv, mask, num_tokens=10)  # same sum / 10
    assert loss.item() == pytest.approx(-0.02, rel=1e-5)
    assert metrics["actor/pg_loss"].item() == pytest.approx(-0.02, rel=1e-5)
    # per-token advantages [B, T] are accepted too
    loss_bt, _ = policy_loss(new2, old, adv[:, None].expand(2, 3), mask, num_tokens=10)
    assert loss_bt.item() == pytest.approx(-0.02, rel=1e-5)


def test_policy_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="clip_c"):
        _loss_case(0.0, 1.0, clip_c=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        _loss_case(0.0, 1.0, clip_high=-0.1)


def _tiny_policy(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))


def _grads(model, batches, num_tokens):
    model.zero_grad()
    for tokens, old, adv, mask in batches:
        logits = model(tokens[:, :-1])
        logp = token_logprobs(logits, tokens[:, 1:])
        loss, _ = policy_loss(logp, old, adv, mask, num_tokens=num_tokens)
        loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_one_vs_four_micro_batches_same_gradient():
    """Token-mean over the whole mini-batch: accumulation over uneven micro-batches is exact."""
    g = torch.Generator().manual_seed(0)
    batch, length = 8, 12
    tokens = torch.randint(0, 11, (batch, length + 1), generator=g)
    old = -torch.rand(batch, length, generator=g) * 3
    adv = torch.randn(batch, generator=g)
    # uneven response lengths, so a per-micro-batch mean would weight tokens differently
    lengths = torch.tensor([1, 12, 3, 7, 12, 2, 5, 9])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    total = int(mask.sum())
    model = _tiny_policy()
    whole = _grads(model, [(tokens, old, adv, mask)], total)
    micro = [(tokens[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2]) for i in range(0, batch, 2)]
    accumulated = _grads(model, micro, total)
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # and the naive per-micro-batch mean would not have matched (the test can fail)
    naive = _grads(model, [(t, o, a_, m) for t, o, a_, m in micro], None)
    naive = [x / 4 for x in naive]
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(whole, naive))


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e9, -1e9]])
    labels = torch.tensor([2, 0])
    torch.testing.assert_close(token_logprobs(logits, labels), torch.tensor([-math.log(4), math.log(0.75)]))
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.tensor([math.log(4), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]))
    # temperature divides the logits
    torch.testing.assert_close(token_logprobs(logits[:1] * 2, labels[:1], temperature=2.0),
                               torch.tensor([-math.log(4)]))
    # matches log_softmax on random logits
    x = torch.randn(3, 5, 50)
    y = torch.randint(0, 50, (3, 5))
    torch.testing.assert_close(token_logprobs(x, y), torch.log_softmax(x, -1).gather(-1, y[..., None])[..., 0])


def test_masked_mean():
    assert masked_mean(torch.tensor([1.0, 2.0, 30.0]), torch.tensor([1, 1, 0])).item() == 1.5
    assert masked_mean(torch.tensor([1.0]), torch.tensor([0])).item() == 0.0
