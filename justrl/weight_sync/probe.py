"""The weight check's probe: the same fixed text's per-token log-probs from the learner and from an
engine, compared within a dtype tolerance (justrl.weight_sync.sync runs it after every push)."""
from __future__ import annotations

import math

import torch

from justrl.weight_sync.base import WeightSyncError

# A fixed probe: ordinary math text, so its log-probs are in the model's usual range (a random
# token string has extreme log-probs, where a bf16 rounding moves them most).
PROBE_TEXT = ("Let x be a positive integer such that x^2 + 3x = 40. Then (x + 8)(x - 5) = 0, "
              "so x = 5 and the answer is \\boxed{5}.")
# Mean |log p_engine - log p_learner| per probe token allowed, by the engines' weights dtype. float32:
# both sides compute in float32 (only kernel order differs). bf16/fp16: the engine's weights are
# rounded copies and both sides compute in half precision, which moves a log-prob by ~1e-2.
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 2e-2}


def learner_probe_logprobs(learner, token_ids: list[int]) -> list[float]:
    """Log-probs of tokens 1.. of `token_ids` under the learner's current weights, at temperature 1
    (what vLLM's prompt log-probs are). Every learner rank must call (a Megatron forward is a
    tensor-parallel collective); every rank gets the list. Uses the learner's `forward`, as a step
    computes its old log-probs."""
    from justrl.grpo import Sequence
    from justrl.learner.packing import build_micro_batch

    micro = build_micro_batch([Sequence(tuple(token_ids[:1]), tuple(token_ids[1:]), 0.0)],
                              pad_multiple=getattr(learner, "pad_multiple", 1))
    temperature = learner.temperature
    learner.temperature = 1.0
    was_training = learner.model.training
    learner.model.eval()
    try:
        with torch.no_grad():
            logprobs = learner.forward(micro, need_entropy=False, response_only=True)[0]
    finally:
        learner.temperature = temperature
        learner.model.train(was_training)
    mask = micro.mask[0].bool()
    return logprobs[0].float().cpu()[mask].tolist()


def engine_probe_logprobs(client, token_ids: list[int]) -> list[float]:
    """The same log-probs from a vLLM server: prompt log-probs of the probe (raw model output, no
    sampling processing), one generated token that is thrown away."""
    from justrl.rollout.client import SERVED_MODEL_NAME

    body = client._post("/v1/completions", {
        "model": SERVED_MODEL_NAME, "prompt": [list(token_ids)], "max_tokens": 1, "temperature": 0.0,
        "prompt_logprobs": 0})
    entries = body["choices"][0]["prompt_logprobs"]
    if entries is None or len(entries) != len(token_ids):
        raise WeightSyncError(f"{client.url}: asked for the prompt log-probs of {len(token_ids)} tokens, got "
                              f"{None if entries is None else len(entries)}")
    out = []
    for position, (token, entry) in enumerate(zip(token_ids[1:], entries[1:]), start=1):
        if entry is None or str(token) not in entry:
            raise WeightSyncError(f"{client.url}: no log-prob for probe token {token} at position {position}")
        out.append(float(entry[str(token)]["logprob"]))
    return out


def compare_probe(engine_lp: list[float], learner_lp: list[float]) -> float:
    """Mean absolute difference of two probe log-prob lists (inf when they cannot be compared)."""
    if len(engine_lp) != len(learner_lp) or not engine_lp:
        return math.inf
    return sum(abs(a - b) for a, b in zip(engine_lp, learner_lp)) / len(engine_lp)
