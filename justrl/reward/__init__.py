"""Rewards: the recipe's verifiers and the DAPO overlong penalty.

Public API, for scripts:

    from justrl.reward import score, overlong_penalty
    score("... so the answer is \\boxed{42}", "42")               # 1.0  (recipe's strict `dapo`)
    score("... \\boxed{\\frac{1}{2}}", "0.5", verifier="lenient")  # 1.0  (math-verify)
    overlong_penalty(14000, max_length=15360, buffer=4096, factor=1.0)  # -0.668...

For thousands of responses per step, `ScorerPool` scores them in worker processes with a
per-response timeout (see justrl/reward/pool.py).
"""
from __future__ import annotations

from justrl.reward.dapo import dapo_score
from justrl.reward.lenient import lenient_score
from justrl.reward.pool import ScorerPool, ScoreStats

VERIFIERS = {"dapo": dapo_score, "lenient": lenient_score}
# What a ScorerPool can run: the training verifiers, and the evaluation grader (justrl.grading),
# which receives an answer already extracted from the response.
SCORER_NAMES = (*VERIFIERS, "grader")


def scorer(name: str):
    """The (response_or_answer, ground_truth) -> +1/-1 function called `name`."""
    if name == "grader":
        from justrl.grading import grader_score

        return grader_score
    return VERIFIERS[name]


def score(response: str, ground_truth: str, verifier: str = "dapo") -> float:
    """Reward of one response: +1.0 if `verifier` accepts its final answer, else -1.0.

    `verifier` is "dapo" (the recipe: exact match of the last \\boxed{} in the last 100
    characters) or "lenient" (equivalence by math-verify). Runs in this process, with no timeout:
    use ScorerPool for untrusted batches.
    """
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; choose one of {sorted(VERIFIERS)}")
    if not isinstance(response, str) or not isinstance(ground_truth, str):
        raise TypeError(f"response and ground_truth must be str, got {type(response).__name__} "
                        f"and {type(ground_truth).__name__}")
    return VERIFIERS[verifier](response, ground_truth)


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float) -> float:
    """DAPO's soft overlong punishment, added to the reward in the length_penalty ablation.

    0 up to `max_length - buffer` tokens, then falling linearly to `-factor` at `max_length`
    (and beyond, for lengths past it): min(0, -(length - (max_length - buffer)) / buffer * factor).
    """
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length={max_length}], got {buffer}")
    exceed = length - (max_length - buffer)
    return min(-exceed / buffer * factor, 0.0)


__all__ = ["score", "overlong_penalty", "ScorerPool", "ScoreStats", "VERIFIERS", "SCORER_NAMES", "scorer"]
