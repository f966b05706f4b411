"""Colocated engines on one real vLLM engine (CPU build): the sleep and wake calls and what they
change in vLLM's state (`/is_sleeping`), an engine that dies asleep is restarted by the wake and
serves what it served, and a request sent to an engine left asleep is caught by the stall check.

What the CPU cannot show: vLLM's CPU worker takes /sleep and keeps its memory (CPUWorker.sleep
logs "sleep mode is not supported on CPU"), so the memory release is GPU-only
(tools/gpu_check.py's colocated step). The scheduler's pause is real on the CPU too: a sleeping
engine accepts requests and completes none.
"""
import os
import signal
import time

import pytest

from justrl.rollout.engine import EngineProcess, EngineSpec
from justrl.rollout.client import SamplingSettings
from justrl.rollout.fleet import RolloutFleet

pytestmark = pytest.mark.slow

SPEC = EngineSpec(max_model_len=256, dtype="float32", seed=0, gpu_memory_utilization=0.3, startup_timeout_s=300,
                  request_timeout_s=300)
PROMPTS = [[1, 100 + i, 7] for i in range(4)]
SEEDS = [7000 + 4 * i for i in range(4)]
SETTINGS = SamplingSettings(n=4, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16)


def test_sleep_wake_a_death_asleep_and_a_missed_wake(random_tiny_model_dir, tmp_path, caplog):
    engine = EngineProcess("engine0", SPEC, tmp_path / "engine0.log")
    fleet = RolloutFleet([engine], random_tiny_model_dir, max_restarts=1, stall_timeout_s=20.0)
    fleet.start()
    try:
        first = fleet.generate(PROMPTS, SETTINGS, SEEDS)
        assert not engine.client.is_sleeping()
        t0 = time.perf_counter()
        fleet.sleep(1)
        t1 = time.perf_counter()
        assert engine.client.is_sleeping()
        fleet.wake(("weights",))
        assert engine.client.is_sleeping()  # the KV cache is still released: not fully awake
        t2 = time.perf_counter()
        fleet.wake(("kv_cache",))
        t3 = time.perf_counter()
        assert not engine.client.is_sleeping()
        assert fleet.generate(PROMPTS, SETTINGS, SEEDS) == first
        # calls, not copies, on a CPU: each a round trip and the scheduler's pause or resume
        assert max(t1 - t0, t2 - t1, t3 - t2) < 10.0, (t1 - t0, t2 - t1, t3 - t2)
        assert fleet.restarts == 0

        # dies asleep: the next wake finds it gone, restarts it from fleet.weights_dir and wakes it
        fleet.sleep(1)
        os.killpg(engine.process.pid, signal.SIGKILL)
        fleet.wake(("weights",))
        assert fleet.restarts == 1 and engine.alive()
        fleet.wake(("kv_cache",))
        assert not engine.client.is_sleeping()
        assert fleet.generate(PROMPTS, SETTINGS, SEEDS) == first  # same weights, same seeds

        # left asleep (a missed wake): vLLM holds the requests and completes none; the stall check
        # declares the engine hung, restarts it (awake) and the step completes
        fleet.sleep(1)
        assert fleet.generate(PROMPTS, SETTINGS, SEEDS) == first
        assert fleet.hung == 1 and fleet.restarts == 2 and not engine.client.is_sleeping()
        assert "engine0 on this machine is hung" in caplog.text
    finally:
        fleet.stop()
    log = (tmp_path / "engine0.log").read_text()
    assert log.count('"POST /sleep?level=1 HTTP/1.1" 200') == 3
    assert "sleep mode is not supported on CPU" in log
