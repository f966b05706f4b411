"""The `lenient` verifier (veRL's math-verify reward), the time limits of `score`, and the scorer pool
with its per-response timeout. Expected verdicts are veRL's own (run on the same inputs, 2026-11-22);
the table of forms is in tests/test_verifier_forms.py."""
import threading
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


def test_pool_scores_like_score_in_order():
    responses = [PAD + f"\\boxed{{{i % 7}}}" for i in range(60)]
    truths = [str(i % 5) for i in range(60)]
    with ScorerPool("lenient", num_workers=2, timeout_s=30) as pool:
        scores, stats = pool.score(responses, truths)
    assert scores == [score(r, t, "lenient") for r, t in zip(responses, truths)]
    assert stats.timeouts == 0 and stats.errors == 0


# A real input on which sympy runs for minutes without math-verify's limits: it evaluates 9^(9^(9^9)).
HANGING = PAD + "\\boxed{9^{9^{9^{9}}}}"


def test_score_in_the_main_thread_is_bounded_by_math_verifys_own_limits():
    start = time.monotonic()
    assert score(HANGING, "1", "lenient") == -1.0  # veRL's verdict: its comparison times out (5 s)
    assert time.monotonic() - start < 30


def test_score_from_another_thread_runs_in_a_worker_it_kills():
    results = []
    thread = threading.Thread(target=lambda: results.extend([score(HANGING, "1", "lenient", timeout_s=2.0),
                                                              score(PAD + "\\boxed{0.5}", "\\frac{1}{2}", "lenient")]))
    start = time.monotonic()
    thread.start()
    thread.join(timeout=120)
    assert results == [-1.0, 1.0]
    assert time.monotonic() - start < 120  # a worker start (sympy's import), 2 s, a restart


def test_lenient_score_refuses_to_run_without_its_time_limits():
    from justrl.reward.lenient import lenient_score

    errors = []

    def call():
        try:
            lenient_score("\\boxed{1}", "1")
        except ValueError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in errors[0]


def test_pool_reads_the_whole_response_for_lenient():
    far = PAD + "So \\boxed{\\frac{3}{4}}. " + "Checking once more. " * 100  # the box ~2,000 chars from the end
    with ScorerPool("lenient", num_workers=1, timeout_s=30) as pool:
        scores, stats = pool.score([far, far], ["\\frac{3}{4}", "0.75"])
    assert scores == [1.0, 1.0] and stats.errors == 0


def test_pool_times_out_a_hanging_response_and_goes_on():
    responses = [PAD + "\\boxed{1}", HANGING, PAD + "\\boxed{0.5}", PAD + "\\boxed{3}", HANGING, PAD + "\\boxed{2}"]
    truths = ["1", "1", "\\frac{1}{2}", "4", "1", "2"]
    start = time.monotonic()
    # 3 s: below math-verify's own 5 s limit, so the pool's kill is what stops the hanging inputs.
    # One worker: with two, the survivor's answer (math-verify's own -1 at 5 s) can arrive while
    # the pool restarts the other, and is then taken as an answer rather than a timeout.
    with ScorerPool("lenient", num_workers=1, timeout_s=3.0) as pool:
        scores, stats = pool.score(responses, truths)
        # the pool is still usable after it killed the stuck workers
        again, stats2 = pool.score([PAD + "\\boxed{\\frac{2}{4}}"], ["0.5"])
    elapsed = time.monotonic() - start
    assert scores == [1.0, FAILED_SCORE, 1.0, -1.0, FAILED_SCORE, 1.0]
    assert stats.timeouts == 2 and sorted(stats.timed_out) == [1, 4]
    assert stats.errors == 0
    assert again == [1.0] and stats2.timeouts == 0
    assert elapsed < 120  # two 3-second timeouts plus worker restarts, not minutes


def test_pool_rejects_unknown_verifier():
    with pytest.raises(ValueError, match="unknown verifier"):
        ScorerPool("nope")
