"""The toy_scratchpad task (experiment=tiny): its surface forms are judged differently by the two
training verifiers and the evaluation grader, as the ablations need; the warm start's targets have
the promised spread; the trainer's verifier metrics on hand-counted verdicts."""
import random
import re

import pytest

from justrl.data import load_problems, toy_problems
from justrl.data.toy import ANSWER_FORMS, MAX_SCRATCHPAD_GUESSES, scratchpad, write_answer
from justrl.eval.grading import grade
from justrl.reward import score
from justrl.model.tiny import WARM_START_FORM_SHARES, warm_start_target
from justrl.controller import verifier_metrics

# form -> (dapo, lenient) verdicts on the right value: what the two ablations need
VERDICTS = {
    "strict": (True, True),
    "decimal": (False, True),
    "fraction": (False, True),
    "text": (False, True),
    "spaced": (False, True),
    "unboxed": (False, True),
}
# what the evaluation grader (validation of every run) accepts, of the forms whose verdict does
# not hang on its normalisation rules (those follow the authors' grader, justrl/eval/grading.py)
GRADER_ACCEPTS = {"strict": True, "unboxed": False}


def test_toy_scratchpad_problems():
    train, val = toy_problems("train", task="toy_scratchpad"), toy_problems("val", task="toy_scratchpad")
    assert (len(train), len(val)) == (74, 16)
    assert not {p.problem for p in train} & {p.problem for p in val}
    for p in train + val:
        a, b = map(int, re.fullmatch(r"Think it over: which number is larger, (\d) or (\d)\?", p.problem).groups())
        assert a != b and p.answer == str(max(a, b))
    # the same pairs as "toy" in each split, under another question
    plain = toy_problems("val")
    assert [re.findall(r"\d", p.problem) for p in plain] == [re.findall(r"\d", p.problem) for p in val]
    assert load_problems("toy_scratchpad").problems == train
    with pytest.raises(ValueError, match="unknown toy set 'toy_x'"):
        toy_problems("train", task="toy_x")


@pytest.mark.parametrize("form", sorted(ANSWER_FORMS))
@pytest.mark.parametrize("value", [1, 7, 9])  # the answers are 1..9 (the larger of two digits)
def test_each_form_is_judged_as_the_ablations_need(form, value):
    assert set(VERDICTS) == set(ANSWER_FORMS)
    response = scratchpad([3, value, 3]) + write_answer(value, form)
    assert (score(response, str(value)) > 0, score(response, str(value), "lenient") > 0) == VERDICTS[form], response
    if form in GRADER_ACCEPTS:
        assert grade(response, str(value)) == GRADER_ACCEPTS[form]
    # a wrong value is wrong for everyone, whatever its form
    wrong = scratchpad([value]) + write_answer(value + 1, form)
    assert (score(wrong, str(value)), score(wrong, str(value), "lenient"), grade(wrong, str(value))) == (-1, -1, False)


def test_forms_and_scratchpad_text():
    assert write_answer(7, "fraction") == "\\boxed{\\frac{14}{2}}"
    assert write_answer(7, "spaced") == "\\boxed{ 7 }" and write_answer(7, "unboxed") == "The answer is 7."
    assert scratchpad([7, 3, 3]) == "7? 3? 3? " and scratchpad([]) == ""


def test_warm_start_targets_have_the_promised_spread():
    rng = random.Random(0)
    problem = "Think it over: which number is larger, 7 or 3?"
    targets = [warm_start_target(problem, "toy_scratchpad", rng) for _ in range(4000)]
    guesses = [t.count("? ") for t in targets]
    assert min(guesses) == 0 and max(guesses) == MAX_SCRATCHPAD_GUESSES
    assert sum(guesses) / len(guesses) == pytest.approx(MAX_SCRATCHPAD_GUESSES / 2, abs=0.3)
    answers = [t.split("? ")[-1] for t in targets]
    for form, share in WARM_START_FORM_SHARES.items():
        written = {write_answer(7, form), write_answer(3, form)}
        assert sum(a in written for a in answers) / len(answers) == pytest.approx(share, abs=0.03), form
    assert all(re.fullmatch(r"([37]\? )*", t[:len(t) - len(a)]) for t, a in zip(targets, answers))
    assert {warm_start_target("Which number is larger, 7 or 3?", "toy", rng) for _ in range(50)} == {
        "\\boxed{7}", "\\boxed{3}"}


def test_verifier_metrics_counts_by_hand():
    # five responses: both accept, both reject, only lenient (x2), only lenient again
    dapo = [1.0, -1.0, -1.0, -1.0, 1.0]
    lenient = [1.0, -1.0, 1.0, 1.0, 1.0]
    expected = {"reward/accuracy_dapo": 0.4, "reward/accuracy_lenient": 0.8,
                "reward/verifier_disagreement": 0.4, "reward/strict_format": 0.5}
    assert verifier_metrics(dapo, lenient, "dapo") == pytest.approx(expected)
    assert verifier_metrics(lenient, dapo, "lenient") == pytest.approx(expected)  # the run's verifier first
    none_right = verifier_metrics([-1.0, -1.0], [-1.0, -1.0], "dapo")
    assert none_right["reward/verifier_disagreement"] == 0 and none_right["reward/strict_format"] != none_right[
        "reward/strict_format"]  # NaN: no right value to judge the format of
