"""Packing: balanced data-parallel shares, capacity-bounded micro-batches, exact targets and masks,
and packed log-probs equal to one-sequence-at-a-time log-probs."""
import pytest
import torch

from justrl.grpo import Sequence, token_logprobs
from justrl.learner.packing import (build_micro_batch, micro_batch_fill, pack, padding_fraction,
                                    plan_mini_batch, split_for_ranks)


def test_split_for_ranks_balances_tokens_and_covers_everything():
    lengths = [100, 90, 80, 10, 10, 10, 5, 5]
    shares = split_for_ranks(lengths, 2)
    assert sorted(i for s in shares for i in s) == list(range(8))
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert loads == [140, 170]  # longest first, each to the lighter rank
    assert split_for_ranks(lengths, 2) == shares  # deterministic: every rank computes the same
    assert split_for_ranks(lengths, 1) == [list(range(8))]
    assert split_for_ranks([7], 3) == [[0], [], []]


def test_pack_respects_capacity_and_isolates_long_sequences():
    lengths = [60, 50, 40, 30, 20, 10, 150]
    bins = pack(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert [6] in bins  # longer than the capacity: alone
    for b in bins:
        if b != [6]:
            assert sum(lengths[i] for i in b) <= 100
    assert len(bins) == 4  # 150 | 60+40 | 50+30+20 | 10 (first-fit decreasing)


def test_micro_batch_targets_mask_and_positions_are_exact():
    a = Sequence((1, 2, 3), (4, 5), advantage=0.5)
    b = Sequence((6,), (7, 8, 9), advantage=-1.0)
    mb = build_micro_batch([a, b])
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    # logits at j predict token j + 1 of the same sequence; the response tokens are the targets
    assert mb.targets.tolist() == [[2, 3, 4, 5, 0, 7, 8, 9, 0]]
    assert mb.mask.tolist() == [[0, 0, 1, 1, 0, 1, 1, 1, 0]]
    assert mb.mask.sum().item() == len(a.response_ids) + len(b.response_ids)
    assert mb.advantages.tolist() == [[0.5] * 5 + [-1.0] * 4]
    assert mb.num_real_tokens == 9 and padding_fraction([mb]) == 0.0

    padded = build_micro_batch([a, b], pad_multiple=8)
    assert padded.input_ids.shape == (1, 16) and padded.num_real_tokens == 9
    assert padded.mask[0, 9:].sum() == 0 and padded.position_ids[0, 9:].tolist() == list(range(7))
    assert padding_fraction([padded]) == pytest.approx(7 / 16)
    assert micro_batch_fill([mb, padded], capacity=20) == pytest.approx(25 / 40)


def test_plan_mini_batch_gives_each_rank_its_share():
    seqs = [Sequence(tuple(range(1, 4)), tuple(range(10, 10 + k)), float(k)) for k in (5, 1, 7, 2, 3, 4)]
    plans = [plan_mini_batch(seqs, rank, 2, capacity=16) for rank in range(2)]
    masks = [sum(m.mask.sum().item() for m in plan) for plan in plans]
    assert sum(masks) == sum(len(s.response_ids) for s in seqs)
    assert all(m.input_ids.shape[1] <= 16 for plan in plans for m in plan)


def test_packed_logprobs_equal_separate_forwards():
    """Position ids that restart per sequence give block-diagonal attention in transformers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         attn_implementation="sdpa")).eval()
    seqs = [Sequence((1, 2, 3, 4), (5, 6, 7), 1.0), Sequence((8, 9), (10, 11, 12, 13), -1.0),
            Sequence((14,), (15,), 0.0)]
    mb = build_micro_batch(seqs)
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits.float()
        packed = token_logprobs(logits, mb.targets)[mb.mask.bool()]
        separate = []
        for s in seqs:
            ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
            lp = token_logprobs(model(input_ids=ids).logits.float()[:, :-1], ids[:, 1:])
            separate.append(lp[0, len(s.prompt_ids) - 1:])
    torch.testing.assert_close(packed, torch.cat(separate), rtol=0, atol=1e-5)
    # and the packing really matters: with one running position, sequence 2 would attend to sequence 1
    with torch.no_grad():
        leaky = token_logprobs(model(input_ids=mb.input_ids, use_cache=False).logits.float(), mb.targets)[mb.mask.bool()]
    assert (leaky - packed).abs().max() > 1e-3


def _small_qwen2(attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from justrl.learner import varlen_attention

    varlen_attention.register()
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        attn_implementation=attn))


@pytest.mark.parametrize("padded", [False, True])
def test_varlen_attention_equals_the_block_mask_forward_and_backward(monkeypatch, padded):
    """justrl_varlen (per-sequence or padded-batch SDPA, no L x L mask) gives the same logits and
    the same gradients as transformers' sdpa path with the dense block-diagonal mask."""
    from justrl.learner import varlen_attention

    monkeypatch.setattr(varlen_attention, "padded_is_cheaper", lambda lengths: padded)
    seqs = [Sequence((1, 2, 3, 4), (5, 6, 7), 1.0), Sequence((8, 9), (10, 11, 12, 13, 14, 15, 16), -1.0),
            Sequence((14,), (15,), 0.0), Sequence((17, 18, 19), (20, 21, 22, 23, 24), 0.5)]
    mb = build_micro_batch(seqs, pad_multiple=8)
    results = []
    for attn, kwargs in (("sdpa", {}), ("justrl_varlen", varlen_attention.varlen_kwargs(mb.position_ids))):
        model = _small_qwen2(attn)
        logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False, **kwargs).logits
        lp = token_logprobs(logits.float(), mb.targets)
        (lp * mb.mask).sum().backward()
        results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_lp, ref_grads), (lp, grads) = results
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_varlen_attention_never_builds_a_mask(monkeypatch):
    """The L x L mask is never built: the attention function gets attention_mask=None and the
    boundaries as cu_seq_lens_q."""
    from justrl.learner import varlen_attention

    seen = []
    original = varlen_attention.varlen_sdpa_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs["cu_seq_lens_q"].tolist()))
        return original(module, query, key, value, attention_mask, **kwargs)

    model = _small_qwen2("justrl_varlen")
    from transformers import AttentionInterface
    AttentionInterface.register("justrl_varlen", spy)
    try:
        mb = build_micro_batch([Sequence((1, 2), (3,), 0.0), Sequence((4,), (5, 6, 7), 0.0)])
        model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False,
              **varlen_attention.varlen_kwargs(mb.position_ids))
    finally:
        varlen_attention.register()
    assert seen == [(None, [0, 3, 7])] * 2  # both layers


def test_padded_attention_is_chosen_by_cost():
    from justrl.learner.varlen_attention import padded_is_cheaper

    assert padded_is_cheaper([100] * 64)  # many equal short sequences: one call beats 64
    assert not padded_is_cheaper([4000, 50, 50, 50])  # one long one: padding would cost 4 x 4000^2
    assert not padded_is_cheaper([300])
    with pytest.raises(ValueError, match="start at 0"):
        from justrl.learner.varlen_attention import varlen_kwargs
        varlen_kwargs(torch.tensor([[1, 2, 0]]))
