"""Which answer forms each verifier accepts: `dapo` (training), `lenient` (veRL's math-verify
reward) and the evaluation grader (the authors' `grade_answer_verl`).

Every expectation below is the verdict of the reference itself, obtained by running the authors'
`evals/utils.py` (thunlp/JustRL, pylatexenc 2.10, sympy 1.14) and veRL's
`verl/utils/reward_score/math_verify.py` (math-verify 0.9.0) on the same response, 2026-11-22.
Each row is one form in both directions where it matters: the form, and the plain answer it
stands for. The README's table of forms is this one.
"""
import pytest

from justrl.eval.grading import grade
from justrl.reward import score

PAD = "We think hard. " * 30  # reasoning text before the ending; keeps dapo's 100-char window honest

# (ending of the response, ground truth, dapo, lenient, grader)
FORMS = [
    # the wrong answers: no verifier accepts them; the right answer in the same form passes
    (r"\boxed{(-1,-9),(4+2 \sqrt{2}, 8),(4-2 \sqrt{9}, 8)}", r"(-1,-9),(4+2 \sqrt{2}, 8),(4-2 \sqrt{2}, 8)", False, False, False),
    (r"\boxed{(-1, -9), (4+2\sqrt{2}, 8), (4-2\sqrt{2}, 8)}", r"(-1,-9),(4+2 \sqrt{2}, 8),(4-2 \sqrt{2}, 8)", False, True, True),
    (r"\boxed{(-\infty, 2) \cup (7, \infty)}", r"(-\infty, 2) \cup (3, \infty)", False, False, False),
    (r"\boxed{(-\infty,2)\cup(3,\infty)}", r"(-\infty, 2) \cup (3, \infty)", False, True, True),
    (r"\boxed{-1./1}", "-1./3", False, False, False),
    (r"\boxed{-1./3}", "-1./3", True, True, True),
    # box commands the grader's extraction does not read
    (r"\fbox{36}", "36", False, False, False),
    (r"\boxed{36}", "36", True, True, True),
    (r"so \boxed 197", r"\boxed{197}", False, True, False),
    (r"so \boxed 197", "197", False, True, False),
    (r"\boxed{197}", r"\boxed{197}", False, True, True),  # boxed ground truth (AIME24's files)
    (r"\boxed  {18}", "18", False, False, False),
    (r"\boxed {18}", "18", False, False, False),
    (r"\boxed{18}", "18", True, True, True),
    (r"\boxed{3", "3", False, False, False),  # cut off before the brace closes
    (r"\boxed{}", "0", False, False, False),
    ("the answer is 27", "27", False, True, False),  # no box: only math-verify finds an answer
    # fractions: the grader wants them reduced, and an integer answer for an integer
    (r"\boxed{2/4}", r"\frac{1}{2}", False, True, False),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", False, True, False),
    (r"\boxed{1/2}", r"\frac{1}{2}", False, True, True),
    (r"\boxed{0.5}", r"\frac{1}{2}", False, True, True),
    (r"\boxed{\dfrac12}", r"\frac{1}{2}", False, True, True),
    (r"\boxed{\frac{7}{1}}", "7", False, True, False),
    (r"\boxed{7.0}", "7", False, True, True),
    (r"\boxed{0.3333333}", r"\frac{1}{3}", False, True, False),
    (r"\boxed{\frac{1}{3}}", "0.33", False, False, False),
    # text inside the box
    (r"\boxed{\text{Answer: }x=5}", "5", False, True, False),
    (r"\boxed{x=5}", "5", False, True, True),
    (r"\boxed{\text{5}}", "5", False, True, True),
    (r"\boxed{B}", r"\text{(B)}", False, True, True),
    (r"\boxed{(B)}", r"\text{(B)}", False, True, True),
    # trailing periods and full-width digits: the grader's float() reads "12." and "１２"
    (r"\boxed{12.}", "12", False, False, True),
    (r"\boxed{\frac{1}{2}.}", r"\frac{1}{2}", False, True, False),
    (r"\boxed{\sqrt{2}.}", r"\sqrt{2}", False, False, False),
    (r"\boxed{(1,2).}", "(1,2)", False, False, False),
    ("\\boxed{１２}", "12", False, False, True),
    ("\\boxed{１２３}", "123", False, False, True),
    ("\\boxed{\\frac{１}{２}}", r"\frac{1}{2}", False, False, False),
    ("\\boxed{３\\sqrt{2}}", r"3\sqrt{2}", False, False, False),
    # units, degrees, percent, money, thousands
    (r"\boxed{5\text{ cm}}", "5", False, True, True),
    (r"\boxed{90^\circ}", "90", False, True, True),
    (r"\boxed{50\%}", "50", False, False, True),
    (r"\boxed{\$18.90}", "18.90", False, True, True),
    (r"\boxed{1,000}", "1000", False, True, True),
    # tuples and intervals: order and brackets count
    (r"\boxed{(2,1)}", "(1,2)", False, False, False),
    (r"\boxed{[0,1)}", "(0,1]", False, False, False),
    (r"\boxed{(0,1]}", "(0,1]", True, True, True),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True, True, True),
    # equivalent expressions
    (r"\boxed{\dfrac{13}{32}}", r"\frac{13}{32}", False, True, True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{1}{2}\sqrt{3}", False, True, True),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", False, True, True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", False, True, True),
    (r"\boxed{4i+3}", "3+4i", False, True, True),
    (r"\boxed{2^{98}}", "2^{99}", False, False, False),
    (r"\boxed{43}", "42", False, False, False),
]


@pytest.mark.parametrize("ending, truth, dapo, lenient, grader", FORMS)
def test_each_verifier_gives_its_references_verdict(ending, truth, dapo, lenient, grader):
    response = PAD + ending
    assert (score(response, truth, "dapo") > 0) == dapo
    assert (score(response, truth, "lenient") > 0) == lenient
    assert grade(response, truth) == grader


def test_a_box_far_from_the_end_counts_for_lenient_and_grader_only():
    # veRL's wrapper and the authors' grader read the whole response; dapo reads the last 100 chars
    response = PAD + "So the answer is \\boxed{\\frac{3}{4}}. " + "Let me double check that. " * 200
    assert len(response) > 5000
    assert score(response, "\\frac{3}{4}", "dapo") == -1.0
    assert score(response, "\\frac{3}{4}", "lenient") == 1.0
    assert grade(response, "\\frac{3}{4}")
    assert score(response, "\\frac{3}{5}", "lenient") == -1.0 and not grade(response, "\\frac{3}{5}")


def test_a_20k_character_response_and_two_boxes():
    response = "Step: $x_{1} = 3$. " * 1100 + "It is \\boxed{13}."
    assert len(response) > 20000
    assert grade(response, "13") and not grade(response, "12")
    assert score(response, "13", "lenient") == 1.0 and score(response, "12", "lenient") == -1.0
    # two boxes: the grader takes the last; math-verify takes both as the set {12, 13}, which is
    # neither answer (veRL's verdict too)
    two = response[:-len("It is \\boxed{13}.")] + "First \\boxed{12}, but wait, it is \\boxed{13}."
    assert grade(two, "13") and not grade(two, "12")
    assert score(two, "13", "lenient") == -1.0 and score(two, "12", "lenient") == -1.0
    assert score(two, "\\{12, 13\\}", "lenient") == 1.0
