"""The evaluation grader on cases with exact expectations, both ground-truth styles of the real
benchmark files, and a sympy input that would run for ever (stopped by the pool's timeout)."""
import time

import pytest

from justrl.grading import answers_match, extract_answer, grade, normalize
from justrl.reward import ScorerPool

MATCH = [
    ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\dfrac{13}{32}", "\\frac{13}{32}"), ("2/4", "\\frac12"),
    ("\\frac{2}{4}", "\\frac{1}{2}"), (".5", "0.5"),
    ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("90°", "90"),
    ("5\\text{ cm}", "5"), ("5 \\mbox{ meters}", "5"), ("12\\,\\text{inches}", "12"), ("\\text{(B)}", "(B)"),
    ("50\\%", "50"), ("1,000", "1000"), ("1,000,000", "1000000"), ("1000", "1,000"), ("\\$18.90", "18.90"),
    ("x = 3", "3"), ("y=-2", "-2"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})"), ("(1,2)", "(1, 2)"),
    ("(0, 1]", "(0,1]"), ("[-1, \\infty)", "[-1,\\infty)"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("2^{99}", "2^{99}"),
    ("204", "\\boxed{204}"),  # AIME24 stores its ground truths boxed
]
NO_MATCH = [
    ("3", "4"), ("(1,2)", "(2,1)"), ("(0,1)", "(0,1]"), ("[0,1]", "(0,1)"), ("\\frac{1}{3}", "0.33"),
    ("1,000", "1"), ("2^{98}", "2^{99}"), ("", "0"), ("(1,2,3)", "(1,2)"),
]


@pytest.mark.parametrize("pred,gold", MATCH)
def test_equivalent_answers_match(pred, gold):
    assert answers_match(pred, gold), (normalize(pred), normalize(gold))


@pytest.mark.parametrize("pred,gold", NO_MATCH)
def test_different_answers_do_not_match(pred, gold):
    assert not answers_match(pred, gold), (normalize(pred), normalize(gold))


def test_extraction_takes_the_last_closed_box():
    assert extract_answer("first \\boxed{1} then \\boxed{\\frac{a}{b}} done") == "\\frac{a}{b}"
    assert extract_answer("\\fbox{7}") == "7"
    assert extract_answer("so \\boxed 42$.") == "42"
    assert extract_answer("no box here") is None
    assert extract_answer("broken \\boxed{12") is None
    assert grade("... the answer is \\boxed{\\dfrac{13}{32}}.", "\\frac{13}{32}")
    assert not grade("the answer is 27", "27")  # unboxed answers are not graded


def test_both_ground_truth_styles_of_the_real_files(benchmark_dir):
    from justrl.data import load_benchmark

    aime24 = load_benchmark("AIME24", benchmark_dir)  # veRL form, boxed ground truths
    cmimc = load_benchmark("CMIMC25", benchmark_dir)  # plain form, LaTeX ground truths
    for bench in (aime24, cmimc):
        for p in bench.problems:
            assert grade(f"Thus \\boxed{{{p.answer}}}.", p.raw_answer), (bench.name, p.id, p.raw_answer)
            assert grade(f"Thus \\boxed{{{p.answer}}}.", p.answer)
            assert not grade("Thus \\boxed{-123456789}.", p.raw_answer)


def test_a_never_ending_sympy_comparison_times_out_cleanly():
    with ScorerPool("grader", num_workers=1, timeout_s=8.0) as pool:
        start = time.monotonic()
        scores, stats = pool.score(["9^{9^{9^{9}}}", "4"], ["1", "4"])
        elapsed = time.monotonic() - start
    assert scores == [-1.0, 1.0] and stats.timeouts == 1 and stats.timed_out == [0]
    assert elapsed < 60
