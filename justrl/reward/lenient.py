"""The `lenient` verifier of the paper's ablation: math-verify decides equivalence, +1 / -1.

Equivalent forms count as correct: 0.5 and \\frac{1}{2}, "x = 3" and 3, spacing, \\text{...},
$...$ delimiters, \\dfrac, and whatever else math-verify's LaTeX/sympy comparison accepts.

Choices (the paper names the ablation, not its code):
- The answer is read from the response's last 300 characters, the same first cut the `dapo`
  verifier makes, so one long response cannot make parsing slow; within them math-verify prefers
  the last \\boxed{...}, then other final-answer forms.
- Anything the strict `dapo` verifier accepts, this one accepts too (checked first, without
  sympy): the lenient reward is never below the strict one for the same response.
- A ground truth math-verify cannot parse is compared as a string only.
- math-verify's own signal-based timeouts are switched off (they only work in a main thread);
  the scorer pool enforces a per-response timeout by killing the worker instead.
"""
from __future__ import annotations

from justrl.reward.dapo import FIRST_CUT_CHARS, dapo_score


def _gold_text(ground_truth: str) -> str:
    # Ground truths come bare ("204", "\\frac{13}{32}") or boxed ("\\boxed{204}", as in AIME24).
    return ground_truth if "\\boxed" in ground_truth else f"${ground_truth}$"


def lenient_score(response: str, ground_truth: str) -> float:
    """+1.0 if math-verify finds the response's final answer equivalent to `ground_truth`."""
    if dapo_score(response, ground_truth) > 0:
        return 1.0
    from math_verify import parse, verify  # heavy import (sympy): only where it is used

    gold = parse(_gold_text(ground_truth), parsing_timeout=None)
    if not gold:
        return -1.0
    answer = parse(response[-FIRST_CUT_CHARS:], parsing_timeout=None)
    if not answer:
        return -1.0
    return 1.0 if verify(gold, answer, timeout_seconds=None) else -1.0
