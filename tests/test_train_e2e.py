"""`python -m justrl.launch experiment=tiny` end to end: real vLLM engine, real learner, real files;
then a run killed with SIGKILL after its first checkpoint, relaunched, ends where the uninterrupted
run ends."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from justrl.tb import EVENT_FILE_NAME, read_scalars

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
REQUIRED_TAGS = [
    "reward/mean", "reward/accuracy", "response_length/mean", "response_length/max", "response_length/clip_ratio",
    "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl", "actor/grad_norm", "actor/lr",
    "val/toy_scratchpad/accuracy", "val/toy_scratchpad/accuracy_grader", "reward/verifier_disagreement", "reward/strict_format",
    "perf/time_rollout", "perf/time_reward", "perf/time_train", "perf/time_sync", "perf/tokens_per_second",
    "perf/total_tokens", "faults/engine_restarts", "faults/hung_engines", "faults/resumes", "faults/steps_redone",
    "faults/engines_lost", "faults/requeues", "rollout/engines_alive",
]


def launch_cmd(run_dir: Path, model_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "justrl.launch", "experiment=tiny", f"trainer.output_dir={run_dir}",
            f"model.path={model_dir}", *overrides]


def run_launch(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    return result


def load_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(hf_dir / "model.safetensors")


STEPS = 4
OVERRIDES = (f"trainer.total_steps={STEPS}", "trainer.save_every=2", "trainer.val_every=2")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A newcomer's first run, uninterrupted: the tiny model is built because it is missing, four
    steps train. Both tests below read it (one launch fewer in CI)."""
    root = tmp_path_factory.mktemp("straight")
    run, model_dir = root / "run", root / "models" / "tiny"
    result = run_launch(launch_cmd(run, model_dir, *OVERRIDES))
    return run, model_dir, result


def test_tiny_run_end_to_end(straight):
    """Everything of the first run lands in the run directory."""
    from transformers import AutoModelForCausalLM

    run, model_dir, result = straight
    assert (model_dir / "config.json").is_file() and (model_dir / "justrl_tiny.json").is_file()
    assert f"{STEPS}/{STEPS}" in result.stderr  # the progress bar reached the end

    assert [p.name for p in run.glob("events.out.tfevents*")] == [EVENT_FILE_NAME]
    # TensorBoard on the directory of runs shows this one under its directory's name
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    runs = EventMultiplexer().AddRunsFromDirectory(str(run.parent))
    assert list(runs.Runs()) == [run.name]
    scalars = read_scalars(run)
    for tag in REQUIRED_TAGS:
        assert tag in scalars, tag
    steps = lambda tag: [s for s, _ in scalars[tag]]  # noqa: E731
    value = lambda tag: [v for _, v in scalars[tag]]  # noqa: E731
    assert steps("reward/mean") == [1, 2, 3, 4]
    assert steps("val/toy_scratchpad/accuracy") == [0, 2, 4]  # before training, every 2 steps (the last one)
    assert all(-1.0 <= v <= 1.0 for v in value("reward/mean"))
    assert all(0.0 <= v <= 1.0 for v in value("reward/accuracy") + value("val/toy_scratchpad/accuracy"))
    # the strict verifier: reward = 2 * accuracy - 1 when there is no length penalty
    for mean, acc in zip(value("reward/mean"), value("reward/accuracy")):
        assert mean == pytest.approx(2 * acc - 1, abs=1e-6)
    assert all(1 <= v <= 64 for v in value("response_length/max"))  # rollout.max_response_length
    assert value("actor/lr") == pytest.approx([0.0, 5e-5, 1e-4, 1e-4])  # lr 1e-4, warm-up over 2 steps
    totals = value("perf/total_tokens")
    assert totals[0] > 0 and totals == sorted(totals) and len(set(totals)) == STEPS
    assert all(v > 0 for v in value("perf/tokens_per_second"))

    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002", "step_000004"]
    for name in ("hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", "optimizer.pt",
                 "trainer_state.pt", "config.yaml", "COMPLETE"):
        assert (ckpts / "step_000004" / name).is_file(), name
    exported = AutoModelForCausalLM.from_pretrained(ckpts / "step_000004" / "hf")
    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    moved = [k for k, v in exported.state_dict().items() if not torch.equal(v, initial.state_dict()[k])]
    assert moved, "four steps with lr > 0 changed no weight"
    assert (run / "engines" / "engine0.log").read_text().count("starting engine0") == 1
    log = (run / "train.log").read_text()
    assert f"step {STEPS}/{STEPS}" in log
    assert all(value(f"faults/{k}") == [0.0] * STEPS for k in ("engine_restarts", "hung_engines", "engines_lost", "resumes",
                                                                "steps_redone"))
    assert value("rollout/engines_alive") == [1.0] * STEPS
    # the end-of-run summary, read back from the event file
    val = scalars["val/toy_scratchpad/accuracy"]
    summary = log.split(f"justrl: run {run.name} finished: step {STEPS}/{STEPS}", 1)[1]
    assert f"steps logged {STEPS} (each once), run directory {run}" in summary
    assert re.search(rf"toy_scratchpad +0 +{val[0][1]:.3f} +{STEPS} +{val[-1][1]:.3f}", summary), summary
    assert re.search(r"resumes from a checkpoint +0", summary) and re.search(r"engine restarts \(died or hung\) +0", summary)
    assert f"checkpoints {ckpts / 'step_000004'}" in summary and f"tensorboard --logdir {run.parent}" in summary
    assert not list((run / "weights").glob("*.tmp"))
    assert len(list((run / "weights").iterdir())) == 1  # only the weights the engine serves are kept


def test_killed_run_resumes_and_matches_an_uninterrupted_one(straight, tmp_path):
    straight_run, model_dir, _ = straight
    resumed = tmp_path / "resumed"
    cmd = launch_cmd(resumed, model_dir, *OVERRIDES)
    with open(tmp_path / "first_attempt.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 400
        while not (resumed / "checkpoints" / "latest").exists():
            assert proc.poll() is None, (tmp_path / "first_attempt.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: controller, engine, reward workers
        proc.wait()
    killed_at = int((resumed / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert killed_at < STEPS, "the first attempt finished before it was killed: test is void"

    run_launch(cmd)
    log = (resumed / "train.log").read_text()
    assert f"resuming from {resumed / 'checkpoints' / f'step_{killed_at:06d}'} (step {killed_at})" in log
    # faults/*: the run's totals across both starts; the steps the kill cost are counted
    before_kill = log.split("resuming from", 1)[0]
    reached = max(int(m) for m in re.findall(rf"step (\d+)/{STEPS} ", before_kill))
    faults = read_scalars(resumed)
    assert faults["faults/resumes"][-1][1] == 1.0
    assert faults["faults/steps_redone"][-1][1] == reached - killed_at
    assert re.search(rf"steps trained again after a resume +{reached - killed_at}\n", log)

    a, b = read_scalars(straight_run), read_scalars(resumed)
    for tag in ("reward/mean", "prompt_length/mean", "response_length/mean", "actor/pg_loss", "actor/lr"):
        assert [s for s, _ in b[tag]] == list(range(1, STEPS + 1)), tag  # each step once, none lost
        assert [v for _, v in b[tag]] == pytest.approx([v for _, v in a[tag]], rel=1e-5, abs=1e-7), tag
    tag = "val/toy_scratchpad/accuracy"  # the evaluation after the resume sees the same weights
    assert b[tag][-1] == pytest.approx(a[tag][-1], rel=1e-5)
    wa = load_weights(straight_run / "checkpoints" / f"step_{STEPS:06d}" / "hf")
    wb = load_weights(resumed / "checkpoints" / f"step_{STEPS:06d}" / "hf")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6, msg=key)


# An engine's own access log, the calls of a colocated step (justrl.rollout.phases) in order.
PHASE_CALLS = {"POST /sleep?level=1 ": "sleep", "POST /wake_up?tags=weights ": "wake weights",
               "POST /collective_rpc ": "reload", "POST /reset_prefix_cache ": "reset cache",
               "POST /wake_up?tags=kv_cache ": "wake kv_cache"}


def phase_calls(engine_log: str) -> list[str]:
    """The sleep, wake and weight-push calls an engine's server logged (uvicorn's access lines), in order."""
    calls = []
    for line in engine_log.splitlines():
        for request, name in PHASE_CALLS.items():
            if f'"{request}HTTP/1.1" 200' in line:
                calls.append(name)
    return calls


def test_colocated_run_sleeps_and_wakes_in_order_and_trains_the_same_weights(straight, tmp_path):
    """cluster.placement=colocated on a CPU: every step the engine is put to sleep after its
    rollouts, woken for the weights, reloaded, woken for the KV cache, in that order (read from
    the engine's own log); vLLM's CPU build does nothing on /sleep (it says so), so the run
    trains exactly the weights of the disaggregated run with the same seeds."""
    straight_run, model_dir, _ = straight
    run = tmp_path / "colocated"
    result = run_launch(launch_cmd(run, model_dir, *OVERRIDES, "cluster.placement=colocated"))
    assert f"{STEPS}/{STEPS}" in result.stderr
    log = (run / "engines" / "engine0.log").read_text()
    step = ["sleep", "wake weights", "reload", "reset cache", "wake kv_cache"]
    assert phase_calls(log) == step * STEPS
    assert "sleep mode is not supported on CPU" in log  # the CPU worker's own word: memory kept
    assert '"sleep_mode": "the CPU build has none' in log  # justrl.rollout.launch dropped --enable-sleep-mode
    assert "--enable-sleep-mode" in log.split("starting engine0", 1)[1].splitlines()[0]  # asked for
    # the straight run made none of these calls, and both trained the same weights
    assert phase_calls((straight_run / "engines" / "engine0.log").read_text()) == ["reload", "reset cache"] * STEPS
    ours = load_weights(run / "checkpoints" / "step_000004" / "hf")
    theirs = load_weights(straight_run / "checkpoints" / "step_000004" / "hf")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
