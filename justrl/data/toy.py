"""justrl's generated toy sets for the embedded default (experiment=tiny). Nothing is downloaded.

Two tasks on the same pairs of digits, DAPO-style rows in the processed form (a bare problem, an
integer answer as a string). Every ordered pair of distinct integers in [0, MAX_OPERAND]; the
same seed gives the same split, and the train and validation splits never share a pair.

- "toy": ("Which number is larger, 7 or 3?", "7"), answered with a bare `\\boxed{7}`. Learnt by
  GRPO in a minute or two on a CPU; nothing in it for the paper's ablations to act on (answers of
  ~6 tokens, one surface form).
- "toy_scratchpad" (experiment=tiny's task): ("Think it over: which number is larger, 7 or 3?",
  "7"). The tiny model's warm start (justrl/model/tiny.py) teaches it to answer with a scratchpad
  of guesses whose length it chooses (`7? 3? 3? ` = 3 tokens a guess) and then the answer in one
  of the surface forms below, so that
  * the length penalty has something to shorten: a scratchpad of 0 to MAX_SCRATCHPAD_GUESSES
    guesses puts responses between 6 and 47 tokens, across the overlong buffer of
    experiment=tiny (the penalty starts at 24 of 64 tokens);
  * the strict `dapo` verifier and the `lenient` one disagree: only "strict" is the ground
    truth's exact string; math-verify accepts every form with the right value (and even a bare
    last number, e.g. a scratchpad whose last guess is right). The evaluation grader, which
    validates every run, follows the authors' rules: `7.0`, `\\text{7}` and ` 7 ` count, the
    unreduced `\\frac{14}{2}` does not, and "unboxed" has no answer.
  The scratchpad does not help to answer: on this task a length penalty can only shorten, it
  cannot cost reasoning; what GRPO has to learn is which number to box, and (under `dapo`) to
  write it in the strict form.
"""
from __future__ import annotations

import random

from justrl.data.problems import Problem

TOY_SOURCE = "toy"
SCRATCHPAD_SOURCE = "toy_scratchpad"
TOY_SETS = (TOY_SOURCE, SCRATCHPAD_SOURCE)
MAX_OPERAND = 9
VAL_SIZE = 16
MAX_SCRATCHPAD_GUESSES = 12

_QUESTIONS = {
    TOY_SOURCE: "Which number is larger, {a} or {b}?",
    SCRATCHPAD_SOURCE: "Think it over: which number is larger, {a} or {b}?",
}

# How an integer answer v can be written. Verdicts for the ground truth "7" (tests/test_toy_task.py
# checks them): `dapo` accepts only "strict"; `lenient` (math-verify) all six; the evaluation
# grader "strict", "decimal", "text" and "spaced" (the authors' rules; not the unreduced fraction,
# and "unboxed" has no box, so no answer).
ANSWER_FORMS = {
    "strict": "\\boxed{{{v}}}",                    # \boxed{7}
    "decimal": "\\boxed{{{v}.0}}",                 # \boxed{7.0}
    "fraction": "\\boxed{{\\frac{{{twice}}}{{2}}}}",  # \boxed{\frac{14}{2}}
    "text": "\\boxed{{\\text{{{v}}}}}",            # \boxed{\text{7}}
    "spaced": "\\boxed{{ {v} }}",                  # \boxed{ 7 }
    "unboxed": "The answer is {v}.",               # The answer is 7.
}


def toy_problems(split: str, seed: int = 0, task: str = TOY_SOURCE) -> list[Problem]:
    """The training ("train", 74 problems) or validation ("val", 16) problems of `task`
    ("toy" or "toy_scratchpad"; both use the same split of the pairs)."""
    if split not in ("train", "val"):
        raise ValueError(f"toy split must be 'train' or 'val', got {split!r}")
    if task not in _QUESTIONS:
        raise ValueError(f"unknown toy set {task!r}; choose one of {list(TOY_SETS)}")
    every = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1) if a != b]
    random.Random(seed).shuffle(every)
    chosen = every[:VAL_SIZE] if split == "val" else every[VAL_SIZE:]
    return [Problem(_QUESTIONS[task].format(a=a, b=b), str(max(a, b)), f"{task}:{split}:{i}")
            for i, (a, b) in enumerate(chosen)]


def write_answer(value: int, form: str) -> str:
    """`value` written in one of ANSWER_FORMS, e.g. write_answer(7, "fraction") == "\\boxed{\\frac{14}{2}}"."""
    return ANSWER_FORMS[form].format(v=value, twice=2 * value)


def scratchpad(guesses: list[int]) -> str:
    """The scratchpad of a toy_scratchpad response: "7? 3? 3? " for guesses [7, 3, 3]."""
    return "".join(f"{g}? " for g in guesses)
