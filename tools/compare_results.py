#!/usr/bin/env python
"""Print an evaluation's results next to the paper's published table (avg@N, in percent).

    python tools/compare_results.py outputs/eval/<name>/results.json [--paper deepseek|nemotron]

`--paper` picks the row to compare with: JustRL-DeepSeek-1.5B (default) or JustRL-Nemotron-1.5B.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ["AIME24", "AIME25", "AMC23", "MATH-500", "Minerva", "Olympiad-Bench", "HMMT25", "BRUMO25", "CMIMC25"]
# arXiv 2512.16649, main results table (avg@N).
PAPER = {
    "deepseek": ("JustRL-DeepSeek-1.5B", [52.60, 38.75, 91.02, 91.65, 51.47, 67.99, 21.98, 52.71, 25.63], 54.87),
    "nemotron": ("JustRL-Nemotron-1.5B", [69.69, 62.92, 96.02, 94.15, 30.24, 76.59, 40.63, 66.88, 41.72], 64.32),
}


def compare(results: dict, paper: str) -> str:
    label, values, paper_avg = PAPER[paper]
    ours = results["benchmarks"]
    lines = [f"{'benchmark':<16}{'ours':>9}{label:>24}{'diff':>9}"]
    diffs = []
    for name, theirs in zip(COLUMNS, values):
        if name in ours and ours[name].get("problems"):
            mine = ours[name]["avg"]
            diffs.append(mine - theirs)
            lines.append(f"{name:<16}{mine:>9.2f}{theirs:>24.2f}{mine - theirs:>+9.2f}")
        else:
            lines.append(f"{name:<16}{'-':>9}{theirs:>24.2f}{'':>9}")
    if len(diffs) == len(COLUMNS):
        avg = sum(ours[n]["avg"] for n in COLUMNS) / len(COLUMNS)
        lines.append(f"{'Avg':<16}{avg:>9.2f}{paper_avg:>24.2f}{avg - paper_avg:>+9.2f}")
    else:
        lines.append(f"{'Avg':<16}{'-':>9}{paper_avg:>24.2f}   ({len(diffs)} of 9 benchmarks evaluated)")
    if not results.get("all_nine", False):
        lines.append("note: not the paper's protocol (a subset of problems, benchmarks or samples)")
    if results.get("judge"):
        lines.append(f"note: graded with the rules plus the judge {results['judge']}, as the paper")
    else:
        lines.append("note: rules only, the judge did not run (" + results.get("judge_status", "judge off")
                     + "); the paper's numbers are rules + CompassVerifier-3B on what the rules reject")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results.json written by python -m justrl.eval")
    parser.add_argument("--paper", choices=sorted(PAPER), default="deepseek")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
        print(f"{results['name']} ({results['model']})")
        print(compare(results, args.paper))
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        print(f"compare_results: {args.results}: not a results file ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
