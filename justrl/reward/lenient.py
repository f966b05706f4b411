"""The `lenient` verifier of the paper's ablation: veRL's math-verify reward, +1 / -1.

The paper names the ablation, not its code; the JustRL training tree (a veRL fork) and veRL itself
ship one math-verify reward, `verl/utils/reward_score/math_verify.py`, and this module behaves as it
does (written from what it does, on the same math-verify library):

- the ground truth is wrapped in `\\boxed{...}` (always, even one that is already boxed) and parsed
  with LaTeX extraction only; a ground truth that yields nothing scores like a wrong answer;
- the whole response is parsed (no tail cut: a box 5,000 characters before the end counts) with
  plain-expression and LaTeX extraction, math-verify's own priorities deciding which candidate
  (last `\\boxed{}`, "final answer is", the last $...$, ...) is the answer;
- `verify(gold, answer)` with math-verify's defaults (6 decimal places); any error, or a parse or
  comparison that runs past math-verify's time limits, scores -1 (veRL's 0);
- like math-verify's `math_metric`, which veRL calls, both parsed sides are turned into strings
  (for its log) under a 2 s limit: an error there (an integer of more than 4,300 digits) also
  scores -1, a timeout there does not.

Time limits. math-verify's own limits (5 s per parse, 5 s per comparison) use SIGALRM, which only
works in a process's main thread; there they are on, as in veRL, so the verdict is veRL's. In
any other thread `lenient_score` cannot set them and refuses (ValueError); justrl.reward.score
then runs the call in a worker process it can kill, and ScorerPool workers call this in their own
main thread with the pool's kill as a second limit.
"""
from __future__ import annotations

import threading

# math-verify's defaults, named: veRL leaves them as they are.
PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5
STR_TIMEOUT_S = 2  # math_metric's limit on turning the parsed answers into strings
FLOAT_ROUNDING = 6


def in_main_thread() -> bool:
    """True where math-verify's signal-based time limits work."""
    return threading.current_thread() is threading.main_thread()


def lenient_score(response: str, ground_truth: str) -> float:
    """+1.0 if math-verify finds the response's answer equivalent to `ground_truth`, else -1.0.

    Must run in the main thread (math-verify's timeouts use signals): raises ValueError otherwise.
    """
    if not in_main_thread():
        raise ValueError("lenient_score must run in the main thread (math-verify's time limits use SIGALRM); "
                         "call justrl.reward.score, which uses a worker process elsewhere")
    # heavy imports (sympy, antlr): only where they are used
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException
    from math_verify.utils import timeout

    try:
        answer = parse(response, (ExprExtractionConfig(), LatexExtractionConfig()), parsing_timeout=PARSE_TIMEOUT_S)
        gold = parse("\\boxed{" + ground_truth + "}", (LatexExtractionConfig(),), parsing_timeout=PARSE_TIMEOUT_S)
        if not gold:
            return -1.0
        try:
            timeout(STR_TIMEOUT_S)(lambda: [str(x) for x in gold + answer])()
        except TimeoutException:
            pass
        ok = verify(gold, answer, FLOAT_ROUNDING, timeout_seconds=VERIFY_TIMEOUT_S)
    except (Exception, TimeoutException):  # veRL: anything that goes wrong scores 0
        return -1.0
    return 1.0 if ok else -1.0
