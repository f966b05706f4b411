"""Real vLLM (CPU build) rollout engines: token-in/token-out, seeded sampling, in-place weight sync,
a dead engine restarted mid-step, and the guard on every route (justrl.rollout.auth). One engine is
started for the module (about 30 s)."""
import math
import os
import signal
import threading
import time

import pytest
import requests

from justrl.rollout.client import SERVED_MODEL_NAME, EngineError, SamplingSettings
from justrl.rollout.engine import EngineSpec, EngineProcess
from justrl.rollout.fleet import RolloutFleet

pytestmark = pytest.mark.slow

SPEC = EngineSpec(max_model_len=256, dtype="float32", seed=0, gpu_memory_utilization=0.3, startup_timeout_s=300,
                  request_timeout_s=300)
PROMPTS = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def fleet(random_tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("engine_logs")
    fleet = RolloutFleet([EngineProcess("engine0", SPEC, logs / "engine0.log")], random_tiny_model_dir, max_restarts=1)
    fleet.start()
    yield fleet
    fleet.stop()


def sampled_logprobs(engine: EngineProcess, prompt: list[int], max_tokens: int = 8) -> list[float]:
    """Log-probs of sampled tokens, asked of the server directly (the controller does not need them)."""
    body = engine.client.session.post(f"{engine.client.url}/v1/completions", json={
        "model": SERVED_MODEL_NAME, "prompt": [prompt], "max_tokens": max_tokens, "temperature": 1.0, "seed": 1,
        "logprobs": 0, "ignore_eos": True}, timeout=60).json()
    return body["choices"][0]["logprobs"]["token_logprobs"]


def test_token_in_token_out_is_seeded(fleet, random_tiny_model_dir):
    settings = SamplingSettings(n=3, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=12)
    first = fleet.generate(PROMPTS, settings, seeds=[10, 20, 30])
    assert [len(group) for group in first] == [3, 3, 3]
    for group in first:
        for completion in group:
            assert 1 <= len(completion.token_ids) <= 12 and all(0 <= t < 1024 for t in completion.token_ids)
            # the random model almost never emits <|im_end|> (id 2): cut at the limit
            assert completion.truncated == (len(completion.token_ids) == 12)
    assert fleet.generate(PROMPTS, settings, seeds=[10, 20, 30]) == first  # same seeds, same samples
    assert fleet.generate(PROMPTS, settings, seeds=[11, 20, 30])[0] != first[0]
    assert len({c.token_ids for c in first[0]}) == 3  # the n samples of a prompt differ (seed + i)


def _engine_processes(engine: EngineProcess) -> list[int]:
    from justrl.rollout.guard import group_members

    return group_members(engine.process.pid)


def test_every_route_of_the_engine_asks_for_its_secret(fleet):
    """vLLM's real server with justrl's --middleware: every route it has (read from its own
    /openapi.json, with the secret) refuses a request without the secret (401) and with a wrong
    or another engine's (403); with it, the engine serves; the secret is on no command line of
    the engine's processes and not in its log."""
    from justrl.rollout.auth import auth_headers, new_secret

    engine = fleet.engines[0]
    url, secret = engine.client.url, engine.secret
    assert url.startswith("http://127.0.0.1:")  # a local engine listens on loopback only
    bare = requests.Session()
    bare.trust_env = False
    spec = engine.client.session.get(f"{url}/openapi.json", timeout=30)
    assert spec.status_code == 200
    routes = [(method.upper(), path.replace("{response_id}", "x")) for path, methods in spec.json()["paths"].items()
              for method in methods]
    assert len(routes) > 40 and ("POST", "/collective_rpc") in routes and ("POST", "/update_weights") in routes
    routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/metrics")]
    for method, path in routes:
        assert bare.request(method, f"{url}{path}", timeout=30).status_code == 401, (method, path)
        for wrong in ("wrong", new_secret()):
            code = bare.request(method, f"{url}{path}", headers=auth_headers(wrong), timeout=30).status_code
            assert code == 403, (method, path)
    # a wrong secret does not stop or change anything: the engine still serves with the right one
    assert bare.post(f"{url}/collective_rpc", json={"method": "check_health"}, headers=auth_headers(secret),
                     timeout=30).json() == {"results": [None]}
    assert bare.get(f"{url}/is_sleeping", headers=auth_headers(secret), timeout=30).json() == {"is_sleeping": False}
    assert engine.client.healthy()
    settings = SamplingSettings(n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=4)
    assert len(engine.client.complete(PROMPTS[0], settings, seed=3)[0].token_ids) == 4
    pids = _engine_processes(engine)
    assert len(pids) >= 2  # the guard and the server (and its engine core)
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert secret.encode() not in f.read()
    assert secret not in engine.log_path.read_text()
    assert "--middleware justrl.rollout.auth.EngineAuthMiddleware" in engine.log_path.read_text()


def test_weight_sync_reloads_in_place(fleet, random_tiny_model_dir, tmp_path):
    """Zero the output layer (tied to the embeddings in the tiny model): every logit is then 0, so
    every sampled token's log-prob must be exactly -log(vocab) once the engine has the new weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = fleet.engines[0]
    before = sampled_logprobs(engine, PROMPTS[0])
    uniform = -math.log(1024)
    assert max(abs(lp - uniform) for lp in before) > 0.05  # the random model is not uniform
    model = AutoModelForCausalLM.from_pretrained(random_tiny_model_dir)
    model.get_output_embeddings().weight.data.zero_()
    model.save_pretrained(tmp_path / "zeroed")
    AutoTokenizer.from_pretrained(random_tiny_model_dir).save_pretrained(tmp_path / "zeroed")
    pid = engine.process.pid
    fleet.load_weights(tmp_path / "zeroed")
    after = sampled_logprobs(engine, PROMPTS[0])
    assert after == pytest.approx([uniform] * len(after), abs=1e-5)
    assert engine.process.pid == pid  # in place: the server was not restarted
    fleet.load_weights(random_tiny_model_dir)  # and back
    assert sampled_logprobs(engine, PROMPTS[0]) == pytest.approx(before, abs=1e-5)


def test_engine_killed_mid_step_is_restarted_and_the_step_retried(fleet):
    engine = fleet.engines[0]
    settings = SamplingSettings(n=8, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=200)
    prompts = [[1, 100 + i, 7] for i in range(32)]
    seeds = [1000 + 8 * i for i in range(32)]
    expected = fleet.generate(prompts, settings, seeds)
    old_pid, restarts = engine.process.pid, fleet.restarts
    done = threading.Event()
    killed_mid_step = []

    def kill_soon():
        time.sleep(1.0)
        killed_mid_step.append(not done.is_set())
        os.killpg(old_pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    result = fleet.generate(prompts, settings, seeds)
    done.set()
    killer.join()
    assert killed_mid_step == [True], "generation finished before the engine was killed: test is void"
    assert fleet.restarts == restarts + 1 and engine.process.pid != old_pid
    assert result == expected  # the share was regenerated with the same seeds
    assert "starting engine0" in engine.log_path.read_text()


def test_restarts_are_bounded_then_a_clear_error(fleet):
    """With rollout.max_restarts=0 a dead engine is not restarted: the step fails, naming the
    engine, the setting and the engine's log."""
    engine = fleet.engines[0]
    os.killpg(engine.process.pid, signal.SIGKILL)
    engine.process.wait()
    fleet.max_restarts = 0
    settings = SamplingSettings(n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=4)
    with pytest.raises(EngineError, match=r"engine0 failed 1 time in a row; giving up "
                                          r"\(rollout.max_restarts=0\)(.|\n)*engine0.log"):
        fleet.generate(PROMPTS[:1], settings, seeds=[1])
    # the module's last test of the fleet: its engine stays down (the teardown stops what is left)


def test_an_engine_that_cannot_start_fails_with_its_log(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    engine = EngineProcess("engine9", SPEC, tmp_path / "engine9.log")
    fleet = RolloutFleet([engine], broken, max_restarts=1)
    with pytest.raises(EngineError, match=r"engine9 exited with code \d+ while starting \(log: .*engine9.log\)"):
        fleet.start()
    assert not engine.alive()
