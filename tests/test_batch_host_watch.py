"""The batch host watch (justrl.cluster.batch_host_watch): the job is requeued from another node
when its batch host is lost. The decisions from scripted Slurm answers; the Slurm calls against
the local Slurm (`bash slurm/setup_local_slurm.sh`): a real job's facts read back, a real watch
step started in it and stopped. Losing the batch host itself is the emulated cluster's test
(tests/test_cluster_emulated.py::test_sbatch_a_lost_batch_host_is_requeued_by_the_watch)."""
import shutil
import subprocess
import sys
import time

import pytest

from justrl.cluster.batch_host_watch import (job_facts, hostnames, start_batch_host_watch, stop_watch,
                                             watch_batch_host, watch_command)


def _slurm_up() -> bool:
    return shutil.which("sbatch") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


needs_slurm = pytest.mark.skipif(not _slurm_up(), reason="no Slurm running here (bash slurm/setup_local_slurm.sh)")


class Script:
    """Slurm's answers poll by poll (the last one repeats), and what the watch asked for."""

    def __init__(self, polls, requeue_ok=True):
        self.polls, self.i, self.requeue_ok = polls, 0, requeue_ok
        self.requeued, self.cancelled, self.slept = [], [], 0

    def facts(self, job):
        return self.polls[min(self.i, len(self.polls) - 1)][0]

    def states(self, nodes):
        known = self.polls[min(self.i, len(self.polls) - 1)][1]
        return {n: known[n] for n in nodes if n in known}

    def requeue(self, reason, max_requeues, env):
        self.requeued.append((reason, max_requeues, dict(env)))
        return self.requeue_ok and int(env["SLURM_RESTART_COUNT"]) < max_requeues

    def cancel(self, job, reason):
        self.cancelled.append((job, reason))

    def sleep(self, s):
        self.slept += 1
        self.i += 1

    def watch(self, me, max_requeues=3):
        return watch_batch_host("7", me, max_requeues, poll_s=0, facts=self.facts, states=self.states,
                                expand=lambda nl: nl.split(","), requeue=self.requeue, cancel=self.cancel,
                                sleep=self.sleep)


def _job(state="RUNNING", nodes="n1,n2,n3", restarts="0"):
    return {"JobState": state, "BatchHost": "n1", "NodeList": nodes, "Restarts": restarts}


ALL_FINE = {"n1": "allocated", "n2": "allocated", "n3": "allocated"}


def test_the_first_survivor_requeues_once_slurm_sets_the_batch_host_down():
    polls = [(_job(), ALL_FINE),
             (_job(), dict(ALL_FINE, n1="allocated*")),  # only not responding yet: not acted on
             (_job(), dict(ALL_FINE, n1="down* (Not responding)"))]
    first = Script(polls)
    assert first.watch("n2") == "requeued" and first.slept == 2 and not first.cancelled
    [(reason, bound, env)] = first.requeued
    assert bound == 3 and env == {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}
    assert reason.startswith("the batch host n1 of job 7 failed (Slurm state down* (Not responding); still in the job)")
    # n3 leaves it to n2 and ends when the job is no longer running (requeued: PENDING)
    second = Script(polls + [(_job(state="PENDING"), ALL_FINE)])
    assert second.watch("n3") == "job 7 is PENDING" and not second.requeued and not second.cancelled


def test_a_batch_host_removed_from_the_job_is_lost_whatever_its_state_says():
    """With --no-kill Slurm removes the failed node from the job; a node brought back at once is
    idle again, but still not in the job."""
    script = Script([(_job(nodes="n2,n3", restarts="2"), dict(ALL_FINE, n1="idle"))])
    assert script.watch("n2", max_requeues=5) == "requeued"
    assert "removed from the job" in script.requeued[0][0] and script.requeued[0][2]["SLURM_RESTART_COUNT"] == "2"
    # the first survivor is the first node not marked failed: n2 itself failing leaves it to n3
    script = Script([(_job(), dict(ALL_FINE, n1="down", n2="down*"))])
    assert script.watch("n3") == "requeued"


def test_past_the_bound_the_job_is_cancelled_not_left_running_idle():
    script = Script([(_job(restarts="3"), dict(ALL_FINE, n1="down"))])
    assert script.watch("n2", max_requeues=3) == "cancelled"
    assert len(script.requeued) == 1 and script.cancelled[0][0] == "7"
    assert script.cancelled[0][1].startswith("the batch host n1 of job 7 failed")


def test_a_failed_scontrol_requeue_is_asked_again():
    script = Script([(_job(), dict(ALL_FINE, n1="down"))] * 2 + [(_job(state="COMPLETING"), ALL_FINE)],
                    requeue_ok=False)
    assert script.watch("n2") == "job 7 is COMPLETING" and len(script.requeued) == 2 and not script.cancelled


def test_a_healthy_job_is_watched_until_it_ends_and_nothing_is_done():
    script = Script([(_job(), ALL_FINE)] * 3 + [(_job(state="COMPLETED"), ALL_FINE)])
    assert script.watch("n2") == "job 7 is COMPLETED" and script.slept == 3
    assert not script.requeued and not script.cancelled
    assert Script([({}, {})]).watch("n2") == "job 7 is gone"  # Slurm no longer knows the job


def test_one_watch_step_per_node_but_the_batch_host_without_the_jobs_slurm_settings():
    started = []
    facts = {"JobState": "RUNNING", "BatchHost": "n1", "NodeList": "n1,n2,n3", "StdOut": "/runs/slurm-x-7.out"}
    watches = start_batch_host_watch("7", 4, env={"SLURM_CONF": "/etc/c", "SLURM_NTASKS": "8", "PATH": "/bin"},
                                     facts=lambda job: facts, expand=lambda nl: nl.split(","),
                                     popen=lambda cmd, **kw: started.append((cmd, kw)) or cmd)
    assert [next(a for a in cmd if a.startswith("--nodelist=")) for cmd, _ in started] == \
        ["--nodelist=n2", "--nodelist=n3"] and len(watches) == 2
    for cmd, kw in started:
        assert kw["env"] == {"SLURM_CONF": "/etc/c", "PATH": "/bin"} and kw["start_new_session"]
        # the watch appends to the job's log itself: the step's stdout would go through srun's client on the batch host
        assert "--output=/dev/null" in cmd
        assert cmd[cmd.index("-m") + 1:] == ["justrl.cluster.batch_host_watch", "--job", "7", "--max-requeues", "4",
                                             "--log", "/runs/slurm-x-7.out"]
    one_node = start_batch_host_watch("8", 4, env={}, facts=lambda job: dict(facts, NodeList="n1"),
                                      expand=lambda nl: nl.split(","), popen=lambda cmd, **kw: cmd)
    assert one_node == []


def _job_state(job: str) -> str:
    return job_facts(job).get("JobState", "")


@needs_slurm
def test_the_watch_reads_a_real_job_and_runs_as_a_step_of_it(tmp_path):
    """On the local Slurm: the job's facts parse (RUNNING, its batch host, its node list), the
    watch's srun step (its flags as Slurm 22.05 takes them) runs inside the job beside the batch
    step, appends its start line to the job's log, finds nothing to do, and stop_watch ends it; the in-process watch returns once the job
    is cancelled, without a requeue."""
    out = tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--parsable", "-c1", "-J", "justrl-watch-test", f"--output={out}", "--wrap",
                          "sleep 300"], check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 60
        while _job_state(job) != "RUNNING":
            assert time.monotonic() < deadline, f"job {job} did not start: {job_facts(job)}"
            time.sleep(0.5)
        facts = job_facts(job)
        host = hostnames(facts["NodeList"])
        assert len(host) == 1 and facts["BatchHost"] == host[0] and facts["Restarts"] == "0"
        assert facts["StdOut"] == str(out)
        proc = subprocess.Popen(watch_command(host[0], job, 2, python=sys.executable, log_file=str(out)),
                                stdin=subprocess.DEVNULL, start_new_session=True)
        name = f"justrl-watch-{host[0]}"
        while name not in subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%j"], capture_output=True,
                                         text=True).stdout:
            assert proc.poll() is None, f"the watch step ended at once: {out.read_text()}"
            assert time.monotonic() < deadline + 60, "the watch step never appeared in squeue"
            time.sleep(0.5)
        while f"justrl: batch host watch on {host[0]}: watching job {job}" not in out.read_text():
            assert time.monotonic() < deadline + 90, f"no start line in the job's log: {out.read_text()}"
            time.sleep(0.5)
        stop_watch([proc])
        assert proc.poll() is not None
        polls = []

        def sleep(s):
            polls.append(s)
            subprocess.run(["scancel", job])
            time.sleep(2)

        outcome = watch_batch_host(job, host[0], 2, poll_s=0.1, sleep=sleep,
                                   requeue=lambda *a: pytest.fail(f"requeued a healthy job: {a}"))
        assert outcome in (f"job {job} is CANCELLED", f"job {job} is COMPLETING") and len(polls) >= 1
    finally:
        subprocess.run(["scancel", job])
