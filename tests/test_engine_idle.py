"""Engines that leave the learner's CPU alone: a frozen CPU engine uses no CPU while the learner
trains, and thaws to serve the same samples; its thread settings come from justrl, not from the
user's OMP_NUM_THREADS. One real vLLM engine (CPU build), about 40 s."""
import json
import os
import time
from pathlib import Path

import pytest

from justrl.rollout.guard import group_members
from justrl.rollout.launch import LOG_PREFIX, SERVER_MODULE
from justrl.rollout.engine import HTTP_KEEP_ALIVE_S, EngineSpec, EngineProcess, engine_cpu_shares, engine_thread_env
from justrl.rollout.client import SamplingSettings
from justrl.rollout.fleet import RolloutFleet

# A learner's step on the tiny model: the time over which the frozen engine's CPU is measured.
TRAIN_PHASE_S = 3.0


def test_cpu_shares_are_disjoint_and_cover_the_cores():
    assert engine_cpu_shares(1, [0, 1]) == [(0, 1)]
    assert engine_cpu_shares(2, [0, 1, 2, 3, 4]) == [(0, 1), (2, 3, 4)]
    assert engine_cpu_shares(3, [4, 5]) == [(4,), (5,), (4,)]  # more engines than cores: round-robin
    spec = EngineSpec(max_model_len=64, dtype="float32", seed=0)
    # the worker gets the share less one core (the server's and scheduler's), as vLLM's auto binding
    assert engine_thread_env(EngineSpec(64, "float32", 0, cpu_ids=(0, 1, 2))) == {
        "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "0,1"}
    assert engine_thread_env(EngineSpec(64, "float32", 0, cpu_ids=(3,))) == {
        "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "3"}
    assert engine_thread_env(spec) == {"OMP_NUM_THREADS": "1"}
    assert engine_thread_env(EngineSpec(64, "bfloat16", 0, gpu_ids=(0,))) == {}  # vLLM chooses on GPUs


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


@pytest.mark.slow
def test_frozen_engine_uses_no_cpu_while_the_learner_trains(random_tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "16")  # as a cluster's login shell often exports
    cpus = engine_cpu_shares(1)[0]
    spec = EngineSpec(max_model_len=256, dtype="float32", seed=0, gpu_memory_utilization=0.3, startup_timeout_s=300,
                      request_timeout_s=300, cpu_ids=cpus)
    engine = EngineProcess("engine0", spec, tmp_path / "engine0.log")
    fleet = RolloutFleet([engine], random_tiny_model_dir, max_restarts=0)
    settings = SamplingSettings(n=4, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16)
    prompts = [[1, 5, 6, 7], [1, 8, 9]]
    fleet.start()
    try:
        members = [pid for pid in group_members(engine.process.pid) if pid != engine.process.pid]
        # API server and engine core (its worker inside it: justrl.rollout.vllm_cpu_server for a one-core
        # share; a process of its own and multiprocessing's resource tracker for more cores)
        assert len(members) >= 2
        # justrl's thread settings reach every engine process, whatever the user exported
        expected_bind = ",".join(map(str, cpus[:-1] if len(cpus) > 1 else cpus))
        for pid in members:
            env = _environ(pid)
            assert env.get("VLLM_CPU_OMP_THREADS_BIND") == expected_bind, pid
            assert env.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE") == str(HTTP_KEEP_ALIVE_S), pid
            # no torch.compile in a CPU engine (the weight check's prompt log-probs compiled a
            # kernel with inductor: 20 s of a fresh machine's first step)
            assert env.get("TORCHDYNAMO_DISABLE") == "1", pid
            assert env.get("OMP_NUM_THREADS") in ("1", str(len(expected_bind.split(",")))), (pid, env.get(
                "OMP_NUM_THREADS"))
        # a one-core worker share runs inside the engine core (justrl.rollout.vllm_cpu_server)
        report = json.loads(next(line for line in engine.log_path.read_text().splitlines()
                                 if line.startswith(LOG_PREFIX))[len(LOG_PREFIX):])
        one_core = len(expected_bind.split(",")) == 1
        assert report["server"] == ("justrl.rollout.vllm_cpu_server" if one_core else SERVER_MODULE)
        # the guard (justrl.rollout.auth) holds on this server module too: the secret reaches every
        # engine process through its environment, and a request without it is refused
        import requests

        assert all(_environ(pid).get("JUSTRL_ENGINE_SECRET") == engine.secret for pid in members)
        bare = requests.Session()
        bare.trust_env = False
        assert bare.get(f"{engine.client.url}/health", timeout=30).status_code == 401
        assert engine.client.healthy()
        first = fleet.generate(prompts, settings, seeds=[1, 2])

        # the training phase: right after a request, when vLLM's worker would spin on its queue
        fleet.freeze()
        before = engine.process_tree_cpu_seconds()
        time.sleep(TRAIN_PHASE_S)
        frozen_cpu = engine.process_tree_cpu_seconds() - before
        states = {Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] for pid in members}
        fleet.thaw()
        print(f"engine CPU while frozen: {frozen_cpu:.3f} s over {TRAIN_PHASE_S} s")
        assert states == {"T"}  # every engine process stopped; the guard is not
        assert frozen_cpu <= 0.02
        assert engine.client.healthy()
        # thawed, it serves again, the same seeded samples
        assert fleet.generate(prompts, settings, seeds=[1, 2]) == first
        # and a frozen engine still stops cleanly
        fleet.freeze()
    finally:
        fleet.stop()
    assert not any(os.path.exists(f"/proc/{pid}") and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
                   .split()[0] != "Z" for pid in members)
