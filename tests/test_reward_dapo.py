"""The recipe's `dapo` verifier: exact expectations, edge cases, and the overlong penalty."""
import random
import string

import pytest

from justrl.reward import overlong_penalty, score
from justrl.reward.dapo import last_boxed_content

PAD = "x" * 500  # reasoning text before the answer


@pytest.mark.parametrize("response, truth, expected", [
    (PAD + "so the answer is \\boxed{42}.", "42", 1.0),
    (PAD + "so the answer is \\boxed{42}.", "43", -1.0),
    # the box must open within the last 100 characters
    ("\\boxed{42}" + "y" * 89, "42", 1.0),      # opens 99 chars from the end... inside
    ("\\boxed{42}" + "y" * 90, "42", 1.0),      # exactly 100 chars long: "\\" is the first kept char
    ("\\boxed{42}" + "y" * 91, "42", -1.0),     # "\\" cut off: "boxed{42}" is no box
    ("\\boxed{42}" + "y" * 150, "42", -1.0),    # further than 100 chars from the end
    # several boxes: the last one counts
    (PAD + "\\boxed{1} then \\boxed{2}", "2", 1.0),
    (PAD + "\\boxed{1} then \\boxed{2}", "1", -1.0),
    # nested braces are balanced
    (PAD + "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    # an unclosed brace: no answer
    (PAD + "\\boxed{\\frac{1}{2}", "\\frac{1}{2}", -1.0),
    (PAD + "\\boxed{42", "42", -1.0),
    # spaces inside the box are not stripped
    (PAD + "\\boxed{ 42 }", "42", -1.0),
    (PAD + "\\boxed{ 42 }", " 42 ", 1.0),
    # equivalent forms are not equal strings
    (PAD + "\\boxed{0.5}", "\\frac{1}{2}", -1.0),
    (PAD + "\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", -1.0),
    (PAD + "\\boxed{42^\\circ}", "42", -1.0),
    (PAD + "\\boxed{\\text{42}}", "42", -1.0),
    (PAD + "$\\boxed{42}$", "42", 1.0),
    # "\\boxed 42" (no brace) and \\fbox are not boxes for the recipe
    (PAD + "\\boxed 42", "42", -1.0),
    (PAD + "\\fbox{42}", "42", -1.0),
    # an empty box matches only an empty ground truth
    (PAD + "\\boxed{}", "", 1.0),
    (PAD + "\\boxed{}", "0", -1.0),
    ("", "42", -1.0),
    ("", "", -1.0),  # no box at all is never correct
    # a box that closes before a later unclosed one: the last opening wins and is unclosed
    (PAD + "\\boxed{42} and \\boxed{4", "42", -1.0),
])
def test_dapo_exact(response, truth, expected):
    assert score(response, truth) == expected


def test_dapo_window_counts_characters_not_tokens():
    answer = "\\boxed{7}"
    for tail in range(0, 200):
        response = PAD + answer + "z" * tail
        expected = 1.0 if len(answer) + tail <= 100 else -1.0
        assert score(response, "7") == expected, tail


def test_dapo_20k_character_response():
    long_reasoning = "".join(random.Random(0).choice(string.ascii_letters + " {}\\") for _ in range(20000))
    assert score(long_reasoning + " final: \\boxed{128}", "128") == 1.0
    assert score(long_reasoning + " final: \\boxed{128}" + "." * 200, "128") == -1.0


def test_dapo_random_garbage_never_crashes():
    rng = random.Random(1)
    alphabet = string.printable + "\\{}" * 10 + "é∑"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        assert score(text, "1") in (1.0, -1.0)


def test_last_boxed_content():
    assert last_boxed_content("a \\boxed{x} b \\boxed{y{z}}") == "y{z}"
    assert last_boxed_content("\\boxed{a}{b}") == "a"
    assert last_boxed_content("no box") is None
    assert last_boxed_content("\\boxed{a") is None


def test_score_rejects_unknown_verifier_and_non_text():
    with pytest.raises(ValueError, match="unknown verifier 'exact'"):
        score("\\boxed{1}", "1", verifier="exact")
    with pytest.raises(TypeError, match="int"):
        score("\\boxed{1}", 1)


@pytest.mark.parametrize("length, expected", [
    (0, 0.0),
    (11264, 0.0),           # max_length - buffer: still free
    (11265, -1 / 4096),
    (13312, -0.5),          # halfway into the buffer
    (15360, -1.0),          # at the limit
    (16384, -1.25),         # past the limit the line goes on
])
def test_overlong_penalty_recipe_values(length, expected):
    assert overlong_penalty(length, max_length=15360, buffer=4096, factor=1.0) == pytest.approx(expected, abs=1e-12)


def test_overlong_penalty_factor_and_bad_buffer():
    assert overlong_penalty(15360, 15360, 4096, 0.5) == -0.5
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(10, 100, 0, 1.0)


def test_the_pool_scores_dapo_in_this_process_like_the_function():
    """`dapo` is bounded string work: the pool starts no worker for it and gives dapo_score's
    verdicts (a worker round trip per response cost more than the scoring)."""
    from justrl.reward import ScorerPool
    from justrl.reward.dapo import dapo_score

    responses = ["so \\boxed{7}", "x" * 400 + "\\boxed{7}", "\\boxed{7}" + "y" * 120, "\\boxed{ 7}", "no box"]
    with ScorerPool("dapo", num_workers=2, timeout_s=1.0) as pool:
        assert pool._workers == []
        scores, stats = pool.score(responses, ["7"] * len(responses))
    assert scores == [dapo_score(r, "7") for r in responses] == [1.0, 1.0, -1.0, -1.0, -1.0]
    assert stats.errors == stats.timeouts == 0
