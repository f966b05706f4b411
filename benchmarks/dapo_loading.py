#!/usr/bin/env python
"""How long does reading the original DAPO-Math-17k release (~1.79M rows) take?

    .venv/bin/python benchmarks/dapo_loading.py [--problems 17917] [--repeats 100]

Writes a parquet file with the original release's schema and size (each of ~17.9k problems
repeated ~100 times, wrapped in DAPO's "Answer: $Answer" instruction) to a temporary directory,
then times `load_problems` on it as the recipe reads it (every row kept, data.prompt_form=
as_released: one 32-bit index per row into the distinct problems) and the sampler's first
permutation over all rows, and prints their size and the peak memory.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from justrl.data import PromptSampler, load_problems
from justrl.data.problems import DAPO_PREFIX, DAPO_SUFFIX


def write_release(path: Path, problems: int, repeats: int) -> int:
    texts = [f"{DAPO_PREFIX}\n\nProblem {i}: find the number of integers $n$ with $1 \\le n \\le {i + 10}$ such "
             f"that $n^2 + {i}$ is divisible by $7$. " + "Some more context for the problem. " * 6
             + f"\n\n{DAPO_SUFFIX}" for i in range(problems)]
    answers = [str(i % 97) for i in range(problems)]
    prompt_type = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    with pq.ParquetWriter(path, pa.schema([("prompt", prompt_type), ("reward_model", pa.struct(
            [("ground_truth", pa.string()), ("style", pa.string())]))])) as writer:
        for _ in range(repeats):
            writer.write_table(pa.table({
                "prompt": pa.array([[{"content": t, "role": "user"}] for t in texts], type=prompt_type),
                "reward_model": pa.array([{"ground_truth": a, "style": "rule-lighteval/MATH_v2"} for a in answers]),
            }))
    return problems * repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", type=int, default=17917)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dapo-math-17k.parquet"
        rows = write_release(path, args.problems, args.repeats)
        start = time.perf_counter()
        table = load_problems(str(path))
        elapsed = time.perf_counter() - start
    start = time.perf_counter()
    sampler = PromptSampler(len(table.rows), seed=1)
    permutation_s = time.perf_counter() - start
    held_mib = (table.rows.itemsize * len(table.rows) + sampler._order.element_size() * sampler._order.numel()) / 2**20
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    load = open("/proc/loadavg").read().split()[0]
    print(f"{rows} rows -> {len(table.problems)} distinct problems, {len(table.rows)} rows kept: read in "
          f"{elapsed:.1f} s ({rows / elapsed:,.0f} rows/s); permutation {permutation_s:.2f} s; row indices + "
          f"permutation {held_mib:.1f} MiB; peak RSS {peak_gib:.2f} GiB; load average {load}; {table.report.summary()}")


if __name__ == "__main__":
    main()
