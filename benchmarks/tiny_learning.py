#!/usr/bin/env python
"""Does the embedded default really learn? Run `experiment=tiny` from scratch and time the rise.

    python benchmarks/tiny_learning.py [--steps 150] [--budget-s 600] [--plot docs/tiny_learning.png]

Builds the tiny model into a fresh directory (warm start included), runs
`python -m justrl.launch experiment=tiny` as a newcomer would, reads the run's TensorBoard event
file back, and reports the mean training reward (+1/-1 scale) over time. The target (issue 3):
the reward, averaged over 5 steps, rises by at least 0.5 above its first 5 steps within 10
minutes of wall-clock time from the launch (model build and engine start-up included) on a 2-core
CPU machine. Prints the figures and PASS/FAIL; exits 1 on FAIL.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_RISE = 0.5
WINDOW = 5


def moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (trainer.total_steps)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="the time budget of the target")
    parser.add_argument("--plot", type=Path, default=None, help="write the curve to this PNG")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the model and run go (default: a temp dir)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from justrl.tb import read_scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="justrl-tiny-learning-"))
    run, model = work / "run", work / "models" / "tiny"
    cmd = [sys.executable, "-m", "justrl.launch", "experiment=tiny", f"model.path={model}",
           f"trainer.output_dir={run}", f"trainer.total_steps={args.steps}", "trainer.val_every=25",
           f"trainer.save_every={args.steps}"]
    print("running:", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total_s = time.time() - start

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("reward/mean")
    steps = [e.step for e in events]
    reward = [e.value for e in events]
    elapsed = [e.wall_time - start for e in events]
    smooth = moving_average(reward, WINDOW)
    baseline = sum(reward[:WINDOW]) / WINDOW
    rise = [s - baseline for s in smooth]
    reached = next((i for i, r in enumerate(rise) if i >= WINDOW - 1 and r >= TARGET_RISE), None)
    scalars = read_scalars(run)
    val = scalars.get("val/toy_scratchpad/accuracy_grader", [])

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"run: {len(steps)} steps in {total_s:.0f} s (launch to exit, model build and engine start included)")
    print(f"first step logged at {elapsed[0]:.0f} s; {(elapsed[-1] - elapsed[0]) / max(1, len(steps) - 1):.2f} s/step")
    print(f"reward/mean: first {WINDOW} steps {baseline:+.3f}; last {WINDOW} steps "
          f"{sum(reward[-WINDOW:]) / WINDOW:+.3f}; best {WINDOW}-step average {max(smooth):+.3f}")
    print("val/toy_scratchpad/accuracy_grader:", ", ".join(f"step {s}: {v:.3f}" for s, v in val))
    for mark in (60, 120, 180, 300, 450, 600):
        i = max((k for k, t in enumerate(elapsed) if t <= mark), default=None)
        if i is not None and mark < elapsed[-1] + 60:
            print(f"  at {mark:>3d} s: step {steps[i]:>3d}, {WINDOW}-step reward {smooth[i]:+.3f} (rise {rise[i]:+.3f})")
    if reached is None:
        verdict = f"FAIL: the {WINDOW}-step reward never rose by {TARGET_RISE} (max rise {max(rise):+.3f})"
    else:
        when = elapsed[reached]
        ok = when <= args.budget_s
        verdict = (f"{'PASS' if ok else 'FAIL'}: rise of {rise[reached]:+.3f} reached at step {steps[reached]}, "
                   f"{when:.0f} s after launch (target: +{TARGET_RISE} within {args.budget_s:.0f} s)")
    print(verdict)

    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(elapsed, reward, color="0.75", lw=1, label="reward/mean (per step)")
        ax.plot(elapsed, smooth, color="C0", lw=2, label=f"{WINDOW}-step average")
        ax.axhline(baseline + TARGET_RISE, color="C3", ls="--", lw=1, label=f"start + {TARGET_RISE}")
        ax.axvline(args.budget_s, color="0.4", ls=":", lw=1, label=f"{args.budget_s / 60:.0f} min")
        ax.set_xlabel("seconds since launch (model build and vLLM start-up included)")
        ax.set_ylabel("mean reward (+1 / -1)")
        ax.set_title(f"justrl experiment=tiny on {os.cpu_count()} CPU cores")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return 0 if verdict.startswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
