"""CPU step time of the tiny experiment with rollout.max_policy_lag=0 (the recipe) and 1 (one-step
overlap), from the runs' own event files.

Each run is `python -m justrl.launch experiment=tiny` (one vLLM CPU engine, the hf learner) for
`--steps` steps without validation; the figure is the median `perf/time_step` over the steps after
the first two, and the medians of `perf/learner_wait_s` and `perf/engine_idle_fraction`. The runs
alternate (`--repeats` pairs). On 2 shared cores the engine and the learner compete for the same
CPU, so the overlap can hide at most what the cores leave idle; on GPUs the pools are separate.

    .venv/bin/python benchmarks/overlap.py [--steps 12] [--repeats 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from justrl.tb import read_scalars

REPO = Path(__file__).resolve().parents[1]


def run(lag: int, steps: int, out: Path, model: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "justrl.launch", "experiment=tiny", f"trainer.output_dir={out}",
           f"model.path={model}", f"trainer.total_steps={steps}", "trainer.val_every=0",
           f"trainer.save_every={steps}", f"rollout.max_policy_lag={lag}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    scalars = read_scalars(out)
    after = lambda tag: [v for s, v in scalars[tag] if s > 2]  # noqa: E731
    return {tag: statistics.median(after(tag)) for tag in
            ("perf/time_step", "perf/time_rollout", "perf/time_train", "perf/learner_wait_s",
             "perf/engine_idle_fraction")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="justrl_overlap_"))
    from justrl.model.tiny import make_tiny_model

    model = make_tiny_model(work / "model")
    results = {0: [], 1: []}
    for r in range(args.repeats):
        for lag in (0, 1):
            results[lag].append(run(lag, args.steps, work / f"lag{lag}_{r}", model))
            print(f"lag {lag}: " + "  ".join(f"{k}={v:.3f}" for k, v in results[lag][-1].items()),
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    step = {lag: statistics.median(x["perf/time_step"] for x in results[lag]) for lag in (0, 1)}
    print(f"median step time: lag 0 {step[0]:.2f} s, lag 1 {step[1]:.2f} s, ratio {step[0] / step[1]:.2f}x")


if __name__ == "__main__":
    main()
