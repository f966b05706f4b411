"""A failed learner step: requeue for a lost node, not for an error (justrl.cluster.requeue), against the
local Slurm (`bash slurm/setup_local_slurm.sh`): real sinfo states, real one-task probe steps of a
running job, a real `scontrol requeue` bounded by SLURM_RESTART_COUNT. Losing a node itself
cannot happen on one machine: where a test needs a lost node, it names it and says so."""
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from justrl.cluster.requeue import after_learner_failure, lost_nodes, node_states, probe, requeue_job, state_says_failed


def _slurm_up() -> bool:
    return shutil.which("sbatch") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


needs_slurm = pytest.mark.skipif(not _slurm_up(), reason="no Slurm running here (bash slurm/setup_local_slurm.sh)")


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")


def test_which_slurm_states_mean_a_failed_node():
    # sinfo %T: "*" = not responding; down/fail; drain is an admin's choice, not a failure
    failed = ["down*", "down", "fail", "failing", "idle*", "mixed*", "allocated*", "unknown*", "down~ (Not responding)"]
    fine = ["idle", "mixed", "allocated", "drained", "draining", "completing", "planned", ""]
    assert [state_says_failed(s) for s in failed] == [True] * len(failed)
    assert [state_says_failed(s) for s in fine] == [False] * len(fine)


def test_no_lost_node_means_no_requeue_and_the_status_is_kept(capsys):
    calls = []
    code = after_learner_failure(7, max_requeues=3, env={"SLURM_JOB_ID": "42"}, nodes=["n1", "n2"],
                                 find_lost=lambda nodes, job: calls.append((nodes, job)) or {})
    assert code == 7 and calls == [(["n1", "n2"], "42")]
    out = capsys.readouterr().out
    assert "the learner failed (exit status 7) and no node of job 42 failed (n1, n2 answer): not requeued" in out
    # a failed probe that Slurm does not confirm (its state never says so) does not requeue either
    code = after_learner_failure(7, max_requeues=3, env={"SLURM_JOB_ID": "42"}, nodes=["n1"],
                                 find_lost=lambda nodes, job: {"n1": "a one-task step failed"},
                                 confirmed=lambda nodes: [])
    assert code == 7 and "not requeued: Slurm did not set n1 down" in capsys.readouterr().out


def test_requeue_is_bounded_by_the_restart_count(caplog):
    assert not requeue_job("why", 2, env={})  # not a Slurm job
    assert "not a Slurm job" in caplog.text
    assert not requeue_job("node n2 failed", 2, env={"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"})
    assert "job 42 not requeued: it was requeued 2 times already (cluster.max_requeues=2)" in caplog.text


@needs_slurm
def test_probe_and_states_of_a_running_job_on_the_local_slurm():
    """A live node of a running job answers a one-task step; a node the job does not have does not
    (the stand-in for a node whose slurmd is gone: srun refuses both)."""
    job = subprocess.run(["sbatch", "--parsable", "-c1", "-J", "justrl-probe", "--output=/dev/null", "--wrap",
                          "sleep 120"], check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 60
        while _job_state(job) != "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.5)
        host = subprocess.run(["scontrol", "show", "hostnames", subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True, text=True).stdout.strip()],
            capture_output=True, text=True).stdout.split()[0]
        assert not state_says_failed(node_states([host])[host])
        assert probe(host, job, timeout_s=60) is None
        why = probe("nosuchnode", job, timeout_s=60)
        assert why is not None and why.startswith("a one-task step failed (exit 1)")
        assert lost_nodes([host, "nosuchnode"], job) == {"nosuchnode": why}
    finally:
        subprocess.run(["scancel", job])


@needs_slurm
def test_a_lost_node_requeues_the_job_until_the_bound(tmp_path):
    """A real batch job that reports a lost node (named by the test: one machine cannot lose one)
    is requeued by `scontrol requeue` and runs again with SLURM_RESTART_COUNT=1; there the bound
    (cluster.max_requeues=1) stops it, and it ends with the learner's status."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from justrl.cluster.requeue import after_learner_failure
        print("start", os.environ.get("SLURM_RESTART_COUNT", "0"), flush=True)
        sys.exit(after_learner_failure(3, max_requeues=1, nodes=["n2"], confirmed=lambda nodes: list(nodes),
                                       find_lost=lambda nodes, job: {{"n2": "the test says so"}}))
    """))
    out = tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--parsable", "-c1", "--requeue", "--open-mode=append", f"--output={out}",
                          "-J", "justrl-requeue", "--wrap", f"{sys.executable} {script}"],
                         check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 240  # a requeued job waits for its node to finish the last run
        while time.monotonic() < deadline:
            text = out.read_text() if out.exists() else ""
            if "start 1" in text and _job_state(job) in ("FAILED", "COMPLETED"):
                break
            time.sleep(1)
        text = out.read_text()
        assert "start 0" in text and "start 1" in text, text
        assert "node(s) n2 of job" in text and "requeueing job" in text and "restart 1 of at most 1" in text
        assert f"job {job} not requeued: it was requeued 1 times already (cluster.max_requeues=1)" in text
        assert _job_state(job) == "FAILED"  # exit status 3 of the last run
    finally:
        subprocess.run(["scancel", job])


def test_one_node_marked_by_slurm_is_enough():
    """Once a node of the job is gone, Slurm 22.05 refuses the resized job's steps on the others
    too (their probes fail, seen on the emulated cluster): the node Slurm marks is the lost one."""
    from justrl.cluster.requeue import wait_until_marked

    states = {"a": "down* (Not responding)", "b": "allocated"}
    assert wait_until_marked(["b", "a"], 5, states=lambda nodes: states, poll_s=0) == ["a"]
    assert wait_until_marked(["b"], 0, states=lambda nodes: states, poll_s=0) == []


def test_every_engine_node_lost_waits_for_all_their_marks():
    """After every engine is lost, rank 0 requeues once Slurm has marked every engine node (a job
    requeued before the mark can be given the dead node again): `every` waits for the last mark,
    and gives the marked ones at its bound."""
    from justrl.cluster.requeue import wait_until_marked

    seen = iter([{"a": "down*", "b": "allocated"}, {"a": "down*", "b": "allocated"}, {"a": "down*", "b": "down*"}])
    polls = []

    def states(nodes):
        polls.append(nodes)
        return next(seen)

    assert wait_until_marked(["a", "b"], 30, states=states, poll_s=0, every=True) == ["a", "b"] and len(polls) == 3
    still = {"a": "down*", "b": "allocated"}
    assert wait_until_marked(["a", "b"], 0, states=lambda nodes: still, poll_s=0, every=True) == ["a"]
    # not responding (`*`) is not yet down: Slurm has not removed the node from the job then
    from justrl.cluster.requeue import state_says_down

    late = {"a": "allocated*", "b": "down* (Not responding)"}
    assert wait_until_marked(["a", "b"], 0, states=lambda nodes: late, poll_s=0, failed=state_says_down) == ["b"]
    assert [s for s in ("down*", "down", "fail", "idle*", "mixed*", "allocated") if state_says_down(s)] == \
        ["down*", "down", "fail"]


def test_small_steps_of_the_job_drop_the_batch_scripts_slurm_settings():
    from justrl.cluster.requeue import step_env

    env = step_env({"SLURM_CONF": "/etc/emu.conf", "SLURM_GPUS_PER_NODE": "4", "SBATCH_X": "1", "PATH": "/bin"})
    assert env == {"SLURM_CONF": "/etc/emu.conf", "PATH": "/bin"}
