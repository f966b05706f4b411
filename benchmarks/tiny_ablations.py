#!/usr/bin/env python
"""Do the paper's two ablations act on the embedded default? Run the three and compare.

    python benchmarks/tiny_ablations.py [--steps 60] [--slurm] [--plot docs/tiny_ablations.png]

Builds the tiny model once (warm start included), then runs `experiment=tiny` with
`ablation=none,length_penalty,lenient` as one Hydra multirun, as a user would: one after the
other on this machine, or (`--slurm`) as one Slurm array job through hydra-submitit-launcher on a
single CPU node. Reads every run's TensorBoard event file back and prints, per ablation, the
policy entropy, mean response length, mean training reward, strict-format share and verifier
disagreement (each averaged over the last LAST_STEPS steps) and the final validation accuracy (the
evaluation grader, the same for the three runs), with the differences from `none`; then draws the
paper-style figure with tools/plot_runs.py.

The requirement (issue 16): each knob visibly acts. PASS when, over the last LAST_STEPS steps,
the length_penalty run's mean response length is at least 20% below none's and the lenient run's
strict-format share is at least 0.1 below none's; exits 1 otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = ("none", "length_penalty", "lenient")
LAST_STEPS = 5
MIN_LENGTH_DROP = 0.20
MIN_STRICT_GAP = 0.10
COLUMNS = [  # (tag, label, format)
    ("actor/entropy", "entropy", "{:.3f}"),
    ("response_length/mean", "resp. length", "{:.1f}"),
    ("reward/mean", "train reward", "{:+.3f}"),
    ("reward/accuracy_dapo", "train acc (dapo)", "{:.3f}"),
    ("reward/strict_format", "strict format", "{:.3f}"),
    ("reward/verifier_disagreement", "verifier disagr.", "{:.3f}"),
    ("val/toy_scratchpad/accuracy_grader", "val accuracy (grader)", "{:.3f}"),
]


def summarize(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """Per tag: the mean over the last LAST_STEPS steps (NaNs left out); validation: the last value."""
    out = {}
    for tag, _, _ in COLUMNS:
        points = scalars.get(tag, [])
        if tag.startswith("val/"):
            out[tag] = points[-1][1] if points else math.nan
            continue
        tail = [v for _, v in points[-LAST_STEPS:] if not math.isnan(v)]
        out[tag] = sum(tail) / len(tail) if tail else math.nan
    return out


def first_steps(scalars: dict[str, list[tuple[int, float]]], tag: str) -> float:
    values = [v for _, v in scalars.get(tag, [])[:LAST_STEPS] if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="trainer.total_steps (default: experiment=tiny's)")
    parser.add_argument("--slurm", action="store_true", help="submit the three runs to the local Slurm")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "tiny_ablations.png", help="figure to write")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the model and runs go (default: a temp dir)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from justrl.tb import read_scalars
    from justrl.model.tiny import make_tiny_model

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="justrl-tiny-ablations-"))
    model, sweep = work / "models" / "tiny", work / "sweep"
    start = time.time()
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    build_s = time.time() - start
    cmd = [sys.executable, "-m", "justrl.launch", "-m", "experiment=tiny", f"model.path={model}",
           f"ablation={','.join(ABLATIONS)}", f"hydra.sweep.dir={sweep}"]
    if args.steps:
        cmd.append(f"trainer.total_steps={args.steps}")
    if args.slurm:
        cmd += ["cluster=slurm", "cluster.nodes=1", "cluster.gpus_per_node=0", "cluster.learner_gpus=0",
                "cluster.cpus_per_task=2"]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total_s = time.time() - start

    runs = {name: sweep / f"{i}-{name}" for i, name in enumerate(ABLATIONS)}
    scalars = {name: read_scalars(run) for name, run in runs.items()}
    rows = {name: summarize(s) for name, s in scalars.items()}
    steps = len(scalars["none"]["reward/mean"])

    load = os.getloadavg()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"model build {build_s:.0f} s; three runs of {steps} steps, {'Slurm' if args.slurm else 'one after the other'}: "
          f"{total_s:.0f} s from start to the last exit")
    for name, run in runs.items():
        points = read_scalars(run)["reward/mean"]
        log = (run / "train.log").read_text()
        first = log.split(" ", 2)[:2]
        print(f"  {name}: {len(points)} steps; train.log from {' '.join(first)}")
    print(f"\nlast {LAST_STEPS} steps (validation: last value)")
    width = max(len(label) for _, label, _ in COLUMNS) + 2
    print(" " * width + "".join(f"{name:>26}" for name in ABLATIONS))
    for tag, label, fmt in COLUMNS:
        cells = []
        for name in ABLATIONS:
            value = rows[name][tag]
            text = fmt.format(value)
            if name != "none":
                delta = value - rows["none"][tag]
                rel = f" {delta / rows['none'][tag]:+.0%}" if tag == "response_length/mean" else ""
                text += f" ({delta:+.3f}{rel})"
            cells.append(f"{text:>26}")
        print(f"{label:<{width}}" + "".join(cells))
    print(f"\nfirst {LAST_STEPS} steps, for reference: " + "; ".join(
        f"{name}: length {first_steps(scalars[name], 'response_length/mean'):.1f}, strict format "
        f"{first_steps(scalars[name], 'reward/strict_format'):.3f}, entropy {first_steps(scalars[name], 'actor/entropy'):.3f}"
        for name in ABLATIONS))

    none, penalty, lenient = (rows[name] for name in ABLATIONS)
    drop = 1 - penalty["response_length/mean"] / none["response_length/mean"]
    gap = none["reward/strict_format"] - lenient["reward/strict_format"]
    checks = [
        (drop >= MIN_LENGTH_DROP, f"length_penalty: mean response length {drop:.0%} below none's "
                                  f"(needs >= {MIN_LENGTH_DROP:.0%})"),
        (gap >= MIN_STRICT_GAP, f"lenient: strict-format share {gap:+.3f} below none's (needs >= {MIN_STRICT_GAP})"),
    ]
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")

    if args.plot:
        sys.path.insert(0, str(REPO / "tools"))
        from plot_runs import plot_runs

        plot_runs([sweep], args.plot, smooth_window=3)
        print(f"plot: {args.plot}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
