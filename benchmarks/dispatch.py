"""Step time of a skewed length mix on two real vLLM (CPU build) engines: today's contiguous split
(before this change: prompt i of k engines went to engine i * k // len) vs least-loaded dispatch
(`RolloutFleet.generate`).

Why the engines are capped: a GPU engine in the recipe holds more sequences than it can batch
(256 prompts x 8 samples over 16 engines, long responses), so part of its share waits in vLLM's
own queue behind the long responses. `--max-num-seqs 16` (4 requests of n=4) puts the CPU engines
in the same regime; the fleet holds at most that many requests per engine and queues the rest.

The workload: 32 prompts, n=4; a quarter of them may run 8x longer (the random tiny model almost
never stops, so max_tokens is the response length). "clustered": the long prompts come first, so
the contiguous split hands all of them to engine0 (the unlucky draw); "shuffled": a seeded random
order (a typical draw). Both dispatchers run the same requests with the same seeds and must return
identical completions (checked). Runs alternate between the two, `--repeats` times each.

    .venv/bin/python benchmarks/dispatch.py [--repeats 2] [--long 192] [--short 24]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from justrl.rollout.engine import EngineSpec, EngineProcess
from justrl.rollout.client import SamplingSettings
from justrl.rollout.fleet import RolloutFleet
from justrl.model.tiny import make_tiny_model

N = 4
MAX_NUM_SEQS = 16


def contiguous(fleet: RolloutFleet, prompts, settings, seeds):
    """The dispatch this replaces: one contiguous share per engine, all sent at once."""
    k = len(fleet.engines)
    bounds = [len(prompts) * i // k for i in range(k + 1)]

    def share(i):
        lo, hi = bounds[i], bounds[i + 1]
        client = fleet.engines[i].client
        with ThreadPoolExecutor(max_workers=max(1, hi - lo)) as pool:
            return list(pool.map(lambda j: client.complete(prompts[j], settings[j], seeds[j]), range(lo, hi)))

    with ThreadPoolExecutor(max_workers=k) as pool:
        return [c for part in pool.map(share, range(k)) for c in part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--long", type=int, default=192)
    parser.add_argument("--short", type=int, default=24)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="justrl_dispatch_"))
    model = make_tiny_model(work / "model", warm_start_steps=0)
    spec = EngineSpec(max_model_len=512, dtype="float32", seed=0, gpu_memory_utilization=0.3,
                      extra_args=("--max-num-seqs", str(MAX_NUM_SEQS)), startup_timeout_s=600,
                      request_timeout_s=600)
    fleet = RolloutFleet([EngineProcess(f"engine{i}", spec, work / f"engine{i}.log") for i in range(2)], model,
                         max_requests_per_engine=MAX_NUM_SEQS // N)
    t = time.perf_counter()
    fleet.start()
    print(f"2 engines up in {time.perf_counter() - t:.0f} s (load {os.getloadavg()[0]:.1f})")
    prompts = [[1, 100 + i, 7] for i in range(args.prompts)]
    seeds = [9000 + N * i for i in range(args.prompts)]
    is_long = [i < args.prompts // 4 for i in range(args.prompts)]
    orders = {"clustered": is_long, "shuffled": random.Random(0).sample(is_long, len(is_long))}
    try:
        for name, long_flags in orders.items():
            settings = [SamplingSettings(N, 1.0, 1.0, -1, args.long if f else args.short) for f in long_flags]
            times = {"contiguous": [], "least-loaded": []}
            results = {}
            for _ in range(args.repeats):
                for how, run in (("contiguous", contiguous), ("least-loaded", fleet.generate)):
                    t = time.perf_counter()
                    results[how] = run(fleet, prompts, settings, seeds) if how == "contiguous" else \
                        run(prompts, settings, seeds)
                    times[how].append(time.perf_counter() - t)
            assert results["contiguous"] == results["least-loaded"], "dispatchers disagree on the completions"
            old, new = statistics.median(times["contiguous"]), statistics.median(times["least-loaded"])
            placed = fleet.last_dispatch.engine_of
            longs = [sum(1 for e, f in zip(placed, long_flags) if f and e == f"engine{i}") for i in range(2)]
            print(f"{name:9s}: contiguous {old:6.2f} s  least-loaded {new:6.2f} s  ratio {old / new:.2f}x  "
                  f"(runs {[round(x, 2) for x in times['contiguous']]} vs "
                  f"{[round(x, 2) for x in times['least-loaded']]}; long prompts per engine, least-loaded: {longs}; "
                  f"load {os.getloadavg()[0]:.1f})")
    finally:
        fleet.stop()


if __name__ == "__main__":
    main()
