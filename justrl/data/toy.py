"""justrl's generated arithmetic set for the embedded default (experiment=tiny).

DAPO-style rows in the processed form: a bare problem and an integer answer as a string, e.g.
("Which number is larger, 7 or 3?", "7"). Every ordered pair of distinct integers in
[0, MAX_OPERAND]. Chosen so that the tiny model can learn it with GRPO in minutes on a CPU: after
its format-only warm start (justrl/tiny_model.py) it answers with one of the two numbers at
random, i.e. half right, and everything above that is learnt. Deterministic: the same seed gives
the same split, and the train and validation splits never share a problem.
"""
from __future__ import annotations

import random

from justrl.data.problems import Problem

TOY_SOURCE = "toy"
MAX_OPERAND = 9
VAL_SIZE = 16


def toy_problems(split: str, seed: int = 0) -> list[Problem]:
    """The toy training ("train", 74 problems) or validation ("val", 16) problems."""
    if split not in ("train", "val"):
        raise ValueError(f"toy split must be 'train' or 'val', got {split!r}")
    every = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1) if a != b]
    random.Random(seed).shuffle(every)
    chosen = every[:VAL_SIZE] if split == "val" else every[VAL_SIZE:]
    return [Problem(f"Which number is larger, {a} or {b}?", str(max(a, b)), f"{TOY_SOURCE}:{split}:{i}")
            for i, (a, b) in enumerate(chosen)]
