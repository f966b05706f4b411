"""The evaluation grader against the authors' `grade_answer_verl` (thunlp/JustRL, evals/utils.py):
extraction, both normalisations, the sympy guards, tuples; the ground-truth styles of the real
benchmark files; and an input sympy never finishes, stopped by the pool's kill.

Every expected value was produced by running the reference (pylatexenc 2.10, sympy 1.14) on the
same input, 2026-11-22. tests/test_verifier_forms.py holds the table of whole-response forms."""
import time

import pytest

from justrl.eval.grading import answers_match, extract_answer, grade, grader_score, hendrycks_normalize, sympy_normalize
from justrl.reward import ScorerPool


@pytest.mark.parametrize("response, expected", [
    ("a \\boxed{1} b \\boxed{\\frac{a}{b}} c", "\\frac{a}{b}"),  # the last box
    ("\\boxed{\\boxed{3}}", "3"),                                # the last "\boxed" is the inner one
    ("} \\boxed{x} {y}", "x"),
    ("\\boxed{}", ""),
    ("\\boxed 5 then {x}", None),                                # no brace right after \boxed
    ("\\boxed {5}", None),
    ("\\boxed{1} then \\boxed{2", None),                         # the last box never closes
    ("\\fbox{2}", None),
    ("no box here", None),
])
def test_extraction(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("answer, math_form, sympy_form", [
    ("\\text{ (B) }", "(B)", "(b)"),
    (" \\dfrac12 ", "\\frac{1}{2}", "1/2"),
    ("x = \\frac{3}{4}", "\\frac{3}{4}", "x=3/4"),
    ("5 \\text{ cm}", "5", "5"),
    ("\\left( 1, 2 \\right)", "(1,2)", "(1,2)"),
    (".5", "\\frac{1}{2}", ".5"),
    ("10\\%", "10", "10"),
    ("\\sqrt3/2", "\\sqrt{3}/2", "sqrt(3)/2"),
    ("2/4", "\\frac{2}{4}", "2/4"),
    ("\\frac{1}{2}\\text{ m}\\text{ s}", "\\frac{1}{2}\\text{ m}\\text{ s}", "1/2ms"),  # two units: given up
    ("3\\sqrt", "3\\sqrt", "3\\sqrt"),
    ("12.", "12.", "12"),
    ("1,234,567", "1,234,567", "1234567"),
    ("7 3/4", "\\frac{73}{4}", "7+3/4"),
    ("3 \\text{ or } 5", "3", "3,5"),
    ("2\\text{ million}", "2", "2*10^6"),
])
def test_both_normalisations(answer, math_form, sympy_form):
    assert hendrycks_normalize(answer) == math_form
    assert sympy_normalize(answer) == sympy_form


MATCH = [
    ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\dfrac{13}{32}", "\\frac{13}{32}"), ("1/2", "\\frac12"),
    ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("5\\text{ cm}", "5"), ("\\text{(B)}", "(B)"), ("50\\%", "50"),
    ("1,000", "1000"), ("1000", "1,000"), ("\\$18.90", "18.90"), ("x = 3", "3"), ("y=-2", "-2"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})"), ("(1,2)", "(1, 2)"), ("(0, 1]", "(0,1]"),
    ("[-1, \\infty)", "[-1,\\infty)"), ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("2^{99}", "2^{99}"), ("204", "\\boxed{204}"), ("7.0", "7"), ("12.", "12"), ("１２", "12"), ("3 \\text{ or } 5", "3, 5"),
    ("\\text{B}", "b"), ("x^2+2x+1", "(x+1)^2"),
]
NO_MATCH = [
    ("3", "4"), ("(1,2)", "(2,1)"), ("(0,1)", "(0,1]"), ("[0,1]", "(0,1)"), ("\\frac{1}{3}", "0.33"),
    ("1,000", "1"), ("2^{98}", "2^{99}"), ("", "0"), ("(1,2,3)", "(1,2)"),
    ("2/4", "\\frac12"), ("\\frac{2}{4}", "\\frac{1}{2}"), ("\\frac{7}{1}", "7"), ("\\text{Answer: }x=5", "5"),
    ("\\frac{1}{2}.", "\\frac{1}{2}"), ("0.3333333", "\\frac{1}{3}"), ("2^{10}", "1024"),  # "^{": no sympy
    ("(-1,-9),(4+2 \\sqrt{2}, 8),(4-2 \\sqrt{9}, 8)", "(-1,-9),(4+2 \\sqrt{2}, 8),(4-2 \\sqrt{2}, 8)"),
    ("(-\\infty, 2) \\cup (7, \\infty)", "(-\\infty, 2) \\cup (3, \\infty)"), ("-1./1", "-1./3"),
    ("xyz", "zyx"),  # three letters: no sympy
    ("5", "\\boxed 5"),  # a boxed ground truth whose box cannot be read
]


@pytest.mark.parametrize("pred, gold", MATCH)
def test_answers_the_reference_accepts(pred, gold):
    assert answers_match(pred, gold)
    assert grader_score(pred, gold) == 1.0


@pytest.mark.parametrize("pred, gold", NO_MATCH)
def test_answers_the_reference_rejects(pred, gold):
    assert not answers_match(pred, gold)
    assert grader_score(pred, gold) == -1.0


def test_whole_responses():
    assert grade("... the answer is \\boxed{\\dfrac{13}{32}}.", "\\frac{13}{32}")
    assert not grade("the answer is 27", "27")  # unboxed answers are not graded
    assert not grade("\\boxed{27}", "")
    assert grade("\\boxed{197}", "\\boxed{197}") and not grade("\\boxed 197", "\\boxed{197}")


def test_both_ground_truth_styles_of_the_real_files(benchmark_dir):
    from justrl.data import load_benchmark

    aime24 = load_benchmark("AIME24", benchmark_dir)  # veRL form, boxed ground truths
    cmimc = load_benchmark("CMIMC25", benchmark_dir)  # plain form, LaTeX ground truths
    for bench in (aime24, cmimc):
        for p in bench.problems:
            assert grade(f"Thus \\boxed{{{p.answer}}}.", p.raw_answer), (bench.name, p.id, p.raw_answer)
            assert grade(f"Thus \\boxed{{{p.answer}}}.", p.answer)
            assert not grade("Thus \\boxed{-123456789}.", p.raw_answer)


# Passes every guard of the sympy step (no letters, no "^"), then sympy computes (12!)!, a number
# of billions of digits: it does not finish in any reasonable time.
NEVER_ENDING = "(12!)!"


def test_a_never_ending_sympy_comparison_times_out_cleanly():
    with ScorerPool("grader", num_workers=1, timeout_s=8.0) as pool:
        start = time.monotonic()
        scores, stats = pool.score([NEVER_ENDING, "4"], ["\\frac{1}{2}", "4"])
        elapsed = time.monotonic() - start
    assert scores == [-1.0, 1.0] and stats.timeouts == 1 and stats.timed_out == [0]
    assert elapsed < 60
