"""What the colocated placement adds to a step's weight sync, measured on one real vLLM engine (the
CPU build here): the sleep(1), wake(weights) and wake(kv_cache) calls around the reload, against
the reload alone (the disaggregated sync), alternating in one run.

On a CPU these are the calls' own cost (an HTTP round trip, the engine core's scheduler pause or
resume, vLLM's bookkeeping); the CPU worker keeps its memory (CPUWorker.sleep), so the GPU's
copies (weights to host memory and back, the KV pool's unmap and remap) are not in it: the
step-time model (benchmarks/step_time_model.py) adds them as named assumptions and takes the
call cost from here.

    .venv/bin/python benchmarks/colocated_calls.py [--rounds 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from justrl.rollout.engine import EngineProcess, EngineSpec
from justrl.rollout.fleet import RolloutFleet
from justrl.model.tiny import make_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", warm_start_steps=0)
        spec = EngineSpec(max_model_len=256, dtype="float32", seed=0, gpu_memory_utilization=0.3,
                          startup_timeout_s=300, request_timeout_s=300)
        fleet = RolloutFleet([EngineProcess("engine0", spec, Path(tmp) / "engine0.log")], model)
        fleet.start()
        try:
            times: dict[str, list[float]] = {k: [] for k in ("sleep", "wake weights", "reload", "wake kv_cache",
                                                             "reload alone")}

            def timed(name, call):
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)

            for _ in range(args.rounds):  # alternating: colocated round, then disaggregated
                timed("sleep", lambda: fleet.sleep(1))
                timed("wake weights", lambda: fleet.wake(("weights",)))
                timed("reload", lambda: fleet.load_weights(model))
                timed("wake kv_cache", lambda: fleet.wake(("kv_cache",)))
                timed("reload alone", lambda: fleet.load_weights(model))
        finally:
            fleet.stop()
    median = {k: statistics.median(v) for k, v in times.items()}
    colocated = median["sleep"] + median["wake weights"] + median["reload"] + median["wake kv_cache"]
    print(f"one CPU vLLM engine (tiny model), {args.rounds} alternating rounds; load average "
          f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    for name, value in median.items():
        print(f"  {name:14s} median {value * 1000:7.1f} ms   (min {min(times[name]) * 1000:.1f}, "
              f"max {max(times[name]) * 1000:.1f})")
    print(f"colocated sync (sleep + wake + reload + wake) / reload alone: {colocated / median['reload alone']:.2f}x "
          f"({colocated * 1000:.0f} ms vs {median['reload alone'] * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
