"""justrl on a real Slurm (the single-node one slurm/setup_local_slurm.sh starts): the project's
environment in a job, `sbatch slurm/train.sbatch` with the tiny CPU configuration, and the
two-ablation Hydra multirun through hydra-submitit-launcher with each knob acting. Pre-emption
(USR1, requeue, resume) and `python -m justrl.launch cluster=slurm` (one job through submitit)
run on the emulated two-node cluster (tests/test_cluster_emulated.py).

Skipped where no Slurm is running, except in CI, where .ci/run starts one and a missing Slurm is a
failure.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from justrl.tb import read_scalars

pytestmark = pytest.mark.slow


def _slurm_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm():
    if not _slurm_up():
        if os.environ.get("CI"):
            pytest.fail("no Slurm running in CI: .ci/run should have started it (slurm/setup_local_slurm.sh)")
        pytest.skip("no Slurm running here: start one with `bash slurm/setup_local_slurm.sh`")


REPO = Path(__file__).resolve().parents[1]


def _job_info(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def _wait_for(job_id: str, timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job_id])
        pytest.fail(f"job {job_id} still queued or running after {timeout_s}s")
    return _job_info(job_id).split("JobState=", 1)[1].split()[0]


def test_sbatch_job_composes_the_config_in_the_project_env(slurm, tmp_path):
    code = "import justrl.config as c; print('VERIFIER', c.compose(['ablation=lenient']).reward.verifier)"
    out = tmp_path / "job.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-c1", "-J", "justrl-env-check", f"--chdir={tmp_path}", f"--output={out}",
         "--wrap", f"{sys.executable} -c \"{code}\""],
        check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
    assert _wait_for(job_id) == "COMPLETED", out.read_text() if out.exists() else "no output"
    assert "VERIFIER lenient" in out.read_text()


def _sbatch_train(tmp_path: Path, *overrides: str) -> str:
    """Submit slurm/train.sbatch on one CPU node, as the README shows, with the tiny experiment,
    from `tmp_path` (the submit directory: the default run directory is under it)."""
    env = dict(os.environ, JUSTRL_PYTHON=sys.executable)
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "-J", "justrl-test",
         f"--output={tmp_path / 'slurm.out'}", str(REPO / "slurm" / "train.sbatch"), "experiment=tiny",
         *overrides],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip().split(";")[0]


def _job_log(tmp_path: Path) -> str:
    log = tmp_path / "slurm.out"
    return log.read_text(errors="replace")[-5000:] if log.exists() else "(no job output)"


def test_sbatch_train_that_fails_with_an_error_is_not_requeued_and_says_why(slurm, tmp_path):
    """A learner that fails with an error (here a training file that does not exist), not a lost
    node: train.sbatch asks `python -m justrl.cluster.requeue`, which probes the job's node (it answers)
    and does not requeue; the job fails with the learner's status and its log names the cause in
    one line before any traceback."""
    missing = tmp_path / "no-such-problems.parquet"
    job_id = _sbatch_train(tmp_path, f"data.train_path={missing}", "cluster.preflight=false", "trainer.val_every=0")
    state = _wait_for(job_id, timeout_s=300)
    text = _job_log(tmp_path)
    assert state == "FAILED", text
    assert "justrl: learner exit status 1" in text
    assert f"no node of job {job_id} failed" in text and "not requeued" in text, text
    cause = next((line for line in text.splitlines() if line.startswith("justrl: ") and str(missing) in line), None)
    assert cause is not None, text
    assert "Traceback" not in text.split(cause)[0]  # the cause comes first
    assert "Restarts=0" in _job_info(job_id)


def test_sbatch_train_on_a_cpu_node(slurm, tiny_model_dir, tmp_path):
    """`sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 slurm/train.sbatch experiment=tiny`, as
    the script's header shows it: the CPU branch (no learner GPUs) trains to the end and its last
    checkpoint loads in transformers. (Pre-emption, requeue and resume of the same script, and the
    multi-node placement, run on the emulated cluster: tests/test_cluster_emulated.py.)
    The run directory is the default, named after the run (not the job), so submitting the same
    command again finds the finished run there instead of starting over."""
    steps = 2
    args = (f"model.path={tiny_model_dir}", f"trainer.total_steps={steps}", "trainer.val_every=0")
    job_id = _sbatch_train(tmp_path, *args)
    assert _wait_for(job_id, timeout_s=500) == "COMPLETED", _job_log(tmp_path)
    log = (tmp_path / "slurm.out").read_text(errors="replace")
    assert f"justrl: job {job_id} (restart 0) on " in log and "1 node(s) x 0 GPU(s); learner 1 node(s) x 1 task(s)" in log
    assert log.rstrip().endswith("learner exit status 0")

    run = tmp_path / "outputs" / "justrl-tiny-none"
    assert not (run / "RUNNING").exists()  # the run's lock is gone with the job
    second = _sbatch_train(tmp_path, *args)  # the same command again: same directory, nothing to redo
    assert _wait_for(second, timeout_s=300) == "COMPLETED", _job_log(tmp_path)
    assert f"{run}/checkpoints/step_{steps:06d} already holds step {steps} of trainer.total_steps={steps}" \
        in (run / "train.log").read_text(), _job_log(tmp_path)
    assert [s for s, _ in read_scalars(run)["reward/mean"]] == list(range(1, steps + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{steps:06d}"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = run / "checkpoints" / f"step_{steps:06d}" / "hf"
    AutoModelForCausalLM.from_pretrained(hf)
    AutoTokenizer.from_pretrained(hf)
    # the job composed cluster=slurm with the allocation's shape
    config = (run / "config.yaml").read_text()
    assert "name: slurm" in config and "gpus_per_node: 0" in config and "learner_gpus: 0" in config


SWEEP_STEPS = 10


def _late(scalars: dict, tag: str, last: int = 3) -> float:
    """Mean of `tag` over the last `last` steps (NaN ratios left out)."""
    values = [v for _, v in scalars[tag][-last:] if v == v]
    return sum(values) / len(values)


def test_multirun_of_the_two_ablations_through_submitit(slurm, tiny_model_dir, tmp_path):
    """The README's sweep on the local Slurm, and each knob acting on experiment=tiny's task: the
    two runs draw the same first batch (same weights, same seeds); a few steps later the length
    penalty has shortened the responses (against the lenient run, which has no penalty), and the
    lenient run keeps the non-strict answers that the other run's strict verifier trains away."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "justrl.launch", "-m", "experiment=tiny", "cluster=slurm", "cluster.nodes=1",
         "cluster.gpus_per_node=0", "cluster.learner_gpus=0", "cluster.cpus_per_task=1",
         "cluster.exclusive=false",  # the two 1-CPU jobs side by side on the 2-CPU node
         f"model.path={tiny_model_dir}", f"trainer.total_steps={SWEEP_STEPS}", f"trainer.save_every={SWEEP_STEPS}",
         "trainer.val_every=0",
         # experiment=tiny's own settings (benchmarks/tiny_ablations.py runs the same three for 40 steps;
         # its figures are in the README)
         "ablation=length_penalty,lenient", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = {p.name: p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert set(runs) == {"0-length_penalty", "1-lenient"}
    # one Slurm array job, one task per ablation: <array id>_0 and <array id>_1
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert [t.split("_")[1] for t in tasks] == ["0", "1"]

    penalty = read_scalars(runs["0-length_penalty"])
    lenient = read_scalars(runs["1-lenient"])
    # TensorBoard on the sweep directory shows each run under its ablation's name
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    assert sorted(EventMultiplexer().AddRunsFromDirectory(str(sweep)).Runs()) == ["0-length_penalty", "1-lenient"]
    steps = list(range(1, SWEEP_STEPS + 1))
    assert [s for s, _ in penalty["reward/mean"]] == steps == [s for s, _ in lenient["reward/mean"]]
    # the length-penalty run logs the penalty, and its reward is the verifier's plus the penalty
    assert penalty["reward/overlong_penalty"][0][1] < -0.05
    for (_, mean), (_, acc), (_, pen) in zip(penalty["reward/mean"], penalty["reward/accuracy"],
                                             penalty["reward/overlong_penalty"]):
        assert mean == pytest.approx(2 * acc - 1 + pen, abs=1e-6)
    assert "reward/overlong_penalty" not in lenient
    # the same first batch in both runs: same weights and seeds, so the same responses; the
    # verifiers already disagree on some of them (the non-strict surface forms)
    for tag in ("response_length/mean", "reward/verifier_disagreement", "reward/strict_format"):
        assert penalty[tag][0][1] == pytest.approx(lenient[tag][0][1]), tag
    assert penalty["reward/verifier_disagreement"][0][1] > 0.05
    # ...then each knob acts. The penalty shortens the responses (the lenient run, without it, is
    # the control); the lenient verifier leaves the non-strict forms in place, which the strict
    # verifier of the other run trains away, so the two verifiers go on disagreeing more there.
    assert _late(penalty, "response_length/mean") < 0.8 * _late(lenient, "response_length/mean")
    assert _late(penalty, "response_length/mean") < 0.8 * penalty["response_length/mean"][0][1]
    assert _late(lenient, "reward/strict_format") < _late(penalty, "reward/strict_format") - 0.1
    assert _late(lenient, "reward/verifier_disagreement") > _late(penalty, "reward/verifier_disagreement")
    for name, verifier, overlong in (("0-length_penalty", "dapo", "on (buffer 4"), ("1-lenient", "lenient", "off")):
        log = (runs[name] / "train.log").read_text()
        assert f"reward: verifier {verifier}; overlong penalty {overlong}" in log
        ablation, job = name.split("-", 1)[1], name.split("-", 1)[0]
        assert f"run_name: justrl-tiny-{ablation}-{job}" in (runs[name] / "config.yaml").read_text()

    # and the sweep plots side by side
    plot = subprocess.run([sys.executable, str(REPO / "tools" / "plot_runs.py"), str(sweep), "--out",
                           str(tmp_path / "sweep.png")], capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr
    assert f"0-length_penalty: actor/entropy {SWEEP_STEPS} points" in plot.stdout and "1-lenient:" in plot.stdout
    assert f"reward/strict_format {SWEEP_STEPS} points" in plot.stdout
