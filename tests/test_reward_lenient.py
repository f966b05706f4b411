"""The `lenient` verifier (math-verify) and the scorer pool with its per-response timeout."""
import random
import time

import pytest

from justrl.reward import ScorerPool, score
from justrl.reward.pool import FAILED_SCORE

PAD = "We think hard. " * 20


@pytest.mark.parametrize("response, truth", [
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{ 42 }", "42"),
    ("\\boxed{\\text{42}}", "42"),
    ("\\boxed{x = 3}", "3"),
    ("$\\frac{3}{4}$ so \\boxed{\\frac{6}{8}}", "\\frac{3}{4}"),
    ("\\boxed{2^{99}}", "2^99"),
    ("\\boxed{204}", "\\boxed{204}"),           # AIME24 stores boxed ground truths
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
])
def test_equivalent_forms_dapo_rejects_lenient_accepts(response, truth):
    response = PAD + response
    if response.endswith(f"\\boxed{{{truth}}}"):
        pytest.fail("test case must be one the strict verifier rejects")
    assert score(response, truth, "dapo") == -1.0
    assert score(response, truth, "lenient") == 1.0


@pytest.mark.parametrize("response, truth", [
    ("\\boxed{0.51}", "\\frac{1}{2}"),
    ("\\boxed{43}", "42"),
    ("no answer at all", "42"),
    ("", "42"),
    ("\\boxed{\\frac{1}{3}}", "0.5"),
])
def test_lenient_rejects_wrong_answers(response, truth):
    assert score(PAD + response, truth, "lenient") == -1.0


def test_lenient_never_below_dapo():
    rng = random.Random(0)
    answers = ["1", "2", "\\frac{1}{2}", "0.5", " 3", "x", "\\pi", "10^{3}"]
    for _ in range(100):
        truth = rng.choice(answers)
        response = PAD + f"\\boxed{{{rng.choice(answers)}}}" + "." * rng.randint(0, 120)
        assert score(response, truth, "lenient") >= score(response, truth, "dapo")


def test_pool_scores_like_score_in_order():
    responses = [PAD + f"\\boxed{{{i % 7}}}" for i in range(60)]
    truths = [str(i % 5) for i in range(60)]
    with ScorerPool("lenient", num_workers=2, timeout_s=30) as pool:
        scores, stats = pool.score(responses, truths)
    assert scores == [score(r, t, "lenient") for r, t in zip(responses, truths)]
    assert stats.timeouts == 0 and stats.errors == 0


# A real input on which math-verify (sympy) runs for minutes: it evaluates 9^(9^(9^9)).
HANGING = PAD + "\\boxed{9^{9^{9^{9}}}}"


def test_pool_times_out_a_hanging_response_and_goes_on():
    responses = [PAD + "\\boxed{1}", HANGING, PAD + "\\boxed{0.5}", PAD + "\\boxed{3}", HANGING, PAD + "\\boxed{2}"]
    truths = ["1", "1", "\\frac{1}{2}", "4", "1", "2"]
    start = time.monotonic()
    # 8 s: far below the minutes a hanging input takes, far above a legit answer on a loaded machine
    with ScorerPool("lenient", num_workers=2, timeout_s=8.0) as pool:
        scores, stats = pool.score(responses, truths)
        # the pool is still usable after it killed the stuck workers
        again, stats2 = pool.score([PAD + "\\boxed{\\frac{2}{4}}"], ["0.5"])
    elapsed = time.monotonic() - start
    assert scores == [1.0, FAILED_SCORE, 1.0, -1.0, FAILED_SCORE, 1.0]
    assert stats.timeouts == 2 and sorted(stats.timed_out) == [1, 4]
    assert stats.errors == 0
    assert again == [1.0] and stats2.timeouts == 0
    assert elapsed < 120  # two 8-second timeouts plus worker restarts, not minutes


def test_pool_rejects_unknown_verifier():
    with pytest.raises(ValueError, match="unknown verifier"):
        ScorerPool("nope")
