#!/usr/bin/env python
"""Draw the paper's training-dynamics figure from the event files of one or more runs.

    python tools/plot_runs.py outputs/sweeps/2026-11-21_10-00-00 --out dynamics.png
    python tools/plot_runs.py outputs/run_a outputs/run_b --smooth 10 --out compare.png

Each argument is a run directory, a directory holding several runs (a sweep), or an event file.
Four panels against the training step, one line per run: policy entropy (`actor/entropy`), mean
reward (`reward/mean`), mean response length (`response_length/mean`), and validation accuracy
(`val/<benchmark>/accuracy`, averaged over the benchmarks a run validates on). Two more when a run
logs them (justrl does since the verifier metrics were added): the strict-format share
(`reward/strict_format`) and the disagreement of the two training verifiers
(`reward/verifier_disagreement`), where the lenient ablation shows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PANELS = [
    ("actor/entropy", "policy entropy"),
    ("reward/mean", "mean reward"),
    ("response_length/mean", "mean response length (tokens)"),
    ("val/*/accuracy", "validation accuracy (mean over benchmarks)"),
]
# Drawn only when at least one run logs them (older runs do not).
OPTIONAL_PANELS = [
    ("reward/strict_format", "strict-format share (dapo accepts / lenient accepts)"),
    ("reward/verifier_disagreement", "dapo vs lenient: share of differing verdicts"),
]


def find_event_files(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("events.out.tfevents*") if p.is_file() and not p.name.endswith(".tmp"))
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {', '.join(map(str, paths))}")
    return files


def run_label(event_file: Path, root: Path | None) -> str:
    run_dir = event_file.parent.parent if event_file.parent.name == "tensorboard" else event_file.parent
    if root is not None:
        try:
            return str(run_dir.relative_to(root)) or run_dir.name
        except ValueError:
            pass
    return run_dir.name


def series(scalars: dict[str, list[tuple[int, float]]], tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `tag`; `val/*/accuracy` averages every benchmark at each step."""
    if tag != "val/*/accuracy":
        points = scalars.get(tag, [])
        return [s for s, _ in points], [v for _, v in points]
    by_step: dict[int, list[float]] = {}
    for name, points in scalars.items():
        if name.startswith("val/") and name.endswith("/accuracy"):
            for step, value in points:
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average; NaNs (a ratio with nothing to divide) are left out of the windows."""
    if window <= 1:
        return values
    out = []
    for i in range(len(values)):
        seen = [v for v in values[max(0, i - window + 1):i + 1] if v == v]
        out.append(sum(seen) / len(seen) if seen else float("nan"))
    return out


def plot_runs(paths: list[Path], out: Path, smooth_window: int = 1):
    """Write the figure to `out`; returns (figure, {run label: {tag: number of points}})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from justrl.tb import read_scalars

    files = find_event_files(paths)
    root = paths[0] if len(paths) == 1 and paths[0].is_dir() else None
    runs = [(run_label(file, root), read_scalars(file)) for file in files]
    panels = PANELS + [p for p in OPTIONAL_PANELS if any(p[0] in scalars for _, scalars in runs)]
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.5 * rows), sharex=True)
    summary = {}
    for index, (label, scalars) in enumerate(runs):
        summary[label] = {}
        for ax, (tag, title) in zip(axes.flat, panels):
            steps, values = series(scalars, tag)
            summary[label][tag] = len(steps)
            if not steps:
                continue
            shown = values if tag == "val/*/accuracy" else smooth(values, smooth_window)
            ax.plot(steps, shown, color=f"C{index % 10}", lw=1.5, marker="o" if len(steps) < 20 else None,
                    ms=3, label=label)
    for ax, (_, title) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    axes[0, 1].legend(fontsize=8, loc="best")
    fig.suptitle("training dynamics" + (f" (moving average over {smooth_window} steps)" if smooth_window > 1 else ""))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return fig, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories, sweep directories or event files")
    parser.add_argument("--out", type=Path, default=Path("training_dynamics.png"), help="PNG to write")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (1: raw)")
    args = parser.parse_args(argv)
    try:
        _, summary = plot_runs(args.paths, args.out, args.smooth)
    except FileNotFoundError as exc:
        print(f"plot_runs: {exc}", file=sys.stderr)
        return 2
    for label, counts in summary.items():
        print(f"{label}: " + ", ".join(f"{tag} {n} points" for tag, n in counts.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
