#!/usr/bin/env python
"""How long does scoring one recipe step (256 prompts x 8 = 2048 responses) take?

    .venv/bin/python benchmarks/reward_throughput.py [--responses 2048] [--workers 2]

Builds realistic responses (15k characters of reasoning, a boxed answer near the end, a mix of
right, wrong, equivalent-but-different and missing answers), scores them with both verifiers
in-process and through ScorerPool, and prints responses per second next to the budget: scoring
should stay well under the time a step spends generating (minutes on the recipe's cluster).
"""
from __future__ import annotations

import argparse
import platform
import random
import time

from justrl.reward import ScorerPool, score


def make_batch(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    filler = "We consider the cases carefully and simplify the expression step by step. " * 200
    answers = [("42", "42"), ("\\frac{1}{2}", "0.5"), ("17", "71"), ("x = 3", "3"), (None, "8")]
    responses, truths = [], []
    for _ in range(n):
        given, truth = rng.choice(answers)
        tail = f"Therefore the answer is \\boxed{{{given}}}." if given is not None else "I am not sure."
        responses.append(filler[: rng.randint(2000, len(filler))] + tail)
        truths.append(truth)
    return responses, truths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--responses", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    responses, truths = make_batch(args.responses)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"{args.responses} responses, {args.workers} workers")
    for verifier in ("dapo", "lenient"):
        start = time.perf_counter()
        inline = [score(r, t, verifier) for r, t in zip(responses, truths)]
        t_inline = time.perf_counter() - start
        with ScorerPool(verifier, num_workers=args.workers, timeout_s=10) as pool:
            start = time.perf_counter()
            pooled, stats = pool.score(responses, truths)
            t_pool = time.perf_counter() - start
        assert pooled == inline, "pool and in-process scores differ"
        print(f"{verifier:8s} in-process {args.responses / t_inline:9.0f} resp/s ({t_inline:6.2f} s)   "
              f"pool {args.responses / t_pool:9.0f} resp/s ({t_pool:6.2f} s)   "
              f"accuracy {sum(s > 0 for s in pooled) / len(pooled):.3f}   timeouts {stats.timeouts}")


if __name__ == "__main__":
    main()
