"""justrl's generated arithmetic set for the embedded default (experiment=tiny).

DAPO-style rows in the processed form: a bare problem and an integer answer as a string, e.g.
("What is 17 + 25?", "42"). Deterministic: the same seed gives the same problems, and the train
and validation splits never share a problem.
"""
from __future__ import annotations

import random

from justrl.data.problems import Problem

TOY_SOURCE = "toy"
TRAIN_SIZE = 2000
VAL_SIZE = 64
MAX_OPERAND = 20


def toy_problems(split: str, seed: int = 0) -> list[Problem]:
    """The toy training ("train") or validation ("val") problems: sums and differences of small ints."""
    if split not in ("train", "val"):
        raise ValueError(f"toy split must be 'train' or 'val', got {split!r}")
    rng = random.Random(seed)
    every = [(a, op, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1) for op in "+-"]
    rng.shuffle(every)
    chosen = every[:VAL_SIZE] if split == "val" else every[VAL_SIZE:VAL_SIZE + TRAIN_SIZE]
    return [Problem(f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b), f"{TOY_SOURCE}:{split}:{i}")
            for i, (a, op, b) in enumerate(chosen)]
