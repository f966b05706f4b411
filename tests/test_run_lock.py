"""One job per run directory (justrl.cluster.run_lock): a live holder is refused by name, a gone one taken
over; with real processes and, where it runs, the real local Slurm's squeue."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from justrl.cluster.run_lock import LOCK_NAME, RunLock, RunLocked, _process_start, check_free, holder_here, slurm_job_state

REPO = Path(__file__).resolve().parents[1]


def _write_lock(run: Path, **holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    base = {"slurm_job": None, "host": socket.gethostname(), "pid": None, "process_start": None, "restart": 0,
            "since": "2026-12-04 10:00:00 UTC"}
    (run / LOCK_NAME).write_text(json.dumps({**base, **holder}))
    return run / LOCK_NAME


@pytest.fixture
def no_slurm_job(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_run_holds_its_directory_and_frees_it(tmp_path, no_slurm_job):
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    held = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["slurm_job"] is None
    assert held["process_start"] == _process_start(os.getpid()) is not None
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_live_local_run_is_refused_by_pid_and_host(tmp_path, no_slurm_job, sleeper):
    path = _write_lock(tmp_path / "run", pid=sleeper.pid, process_start=_process_start(sleeper.pid))
    with pytest.raises(RunLocked, match=rf"in use by process {sleeper.pid} on this host.*stop it first") as err:
        RunLock(tmp_path / "run").acquire()
    assert str(path) in str(err.value)  # which file to delete, once the user knows the run is gone
    with pytest.raises(RunLocked):
        check_free(tmp_path / "run")
    assert json.loads(path.read_text())["pid"] == sleeper.pid  # the holder's lock is left alone


def test_a_gone_local_run_and_a_reused_pid_are_taken_over(tmp_path, no_slurm_job, sleeper, caplog):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(done.stdout)
    _write_lock(tmp_path / "a", pid=gone, process_start="1")
    # a live pid whose start time is not the writer's: the pid was reused by another process
    _write_lock(tmp_path / "b", pid=sleeper.pid, process_start=str(int(_process_start(sleeper.pid)) - 1))
    with caplog.at_level(logging.INFO, logger="justrl"):
        for run in ("a", "b"):
            check_free(tmp_path / run)
            lock = RunLock(tmp_path / run)
            lock.acquire()
            assert json.loads((tmp_path / run / LOCK_NAME).read_text())["pid"] == os.getpid()
            lock.release()
    assert f"taking over its lock: process {gone} on this host is gone" in caplog.text
    assert f"process {sleeper.pid} on this host is gone" in caplog.text


def test_a_local_run_on_another_host_cannot_be_checked_and_is_refused(tmp_path, no_slurm_job):
    _write_lock(tmp_path / "run", host="node-elsewhere", pid=1234, process_start="99")
    with pytest.raises(RunLocked, match=r"process 1234 on host node-elsewhere .*cannot be checked"):
        RunLock(tmp_path / "run").acquire()


def test_release_never_removes_another_jobs_lock(tmp_path, no_slurm_job):
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    path = _write_lock(tmp_path / "run", slurm_job="77", host="other", pid=1)  # someone forced it meanwhile
    lock.release()
    assert json.loads(path.read_text())["slurm_job"] == "77"


def test_slurm_holders_by_their_state(tmp_path, monkeypatch):
    """The same job (a requeue keeps its id) takes over; another job is refused while squeue lists it
    live, taken over once squeue no longer knows it or lists it ended; squeue failing is a refusal."""
    monkeypatch.setenv("SLURM_JOB_ID", "500")
    states = {"400": "RUNNING", "401": "PENDING", "402": "COMPLETED", "403": None}

    def state(job):
        if job == "404":
            raise OSError("squeue -j 404: exit 1: slurm_load_jobs error: Unable to contact slurm controller")
        return states[job]

    for job, free in (("500", True), ("400", False), ("401", False), ("402", True), ("403", True), ("404", False)):
        run = tmp_path / job
        _write_lock(run, slurm_job=job, host="gpu017", pid=1)
        lock = RunLock(run, job_state=state)
        if free:
            lock.acquire()
            assert json.loads((run / LOCK_NAME).read_text())["slurm_job"] == "500"
        else:
            with pytest.raises(RunLocked, match=rf"Slurm job {job} .*on gpu017") as err:
                lock.acquire()
            assert str(run / LOCK_NAME) in str(err.value)
            if job != "404":
                assert f"scancel {job}" in str(err.value)
    assert holder_here()["slurm_job"] == "500"


def _slurm_up() -> bool:
    return shutil.which("sbatch") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _slurm_up(), reason="no Slurm running here (bash slurm/setup_local_slurm.sh starts one)")
def test_a_lock_of_a_real_slurm_job_is_refused_until_the_job_ends(tmp_path, monkeypatch):
    """squeue itself decides: a lock naming a running job of the local Slurm is refused by its id;
    once it is cancelled (or for an id Slurm never had) the lock is taken over."""
    monkeypatch.setenv("SLURM_JOB_ID", "999999998")
    job = subprocess.run(["sbatch", "--parsable", "-c1", "-J", "justrl-lock-holder", "--output=/dev/null",
                          "--wrap", "sleep 120"], check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 60
        while slurm_job_state(job) not in ("RUNNING", "PENDING") and time.monotonic() < deadline:
            time.sleep(0.5)
        _write_lock(tmp_path / "run", slurm_job=job, host="vm", pid=1)
        with pytest.raises(RunLocked, match=rf"Slurm job {job} \((RUNNING|PENDING), on vm"):
            RunLock(tmp_path / "run").acquire()
    finally:
        subprocess.run(["scancel", job])
    deadline = time.monotonic() + 60
    while slurm_job_state(job) not in (None, "CANCELLED", "COMPLETED") and time.monotonic() < deadline:
        time.sleep(0.5)
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    lock.release()
    assert slurm_job_state("999999997") is None  # an id Slurm never had: not live


def test_launch_refuses_a_directory_in_use_naming_its_holder(tmp_path, no_slurm_job, sleeper):
    """`python -m justrl.launch experiment=tiny trainer.output_dir=<in use>` exits at once with the
    holder in one line, and writes nothing into the directory."""
    run = tmp_path / "run"
    _write_lock(run, pid=sleeper.pid, process_start=_process_start(sleeper.pid))
    result = subprocess.run([sys.executable, "-m", "justrl.launch", "experiment=tiny", f"trainer.output_dir={run}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    assert f"justrl: {run} is in use by process {sleeper.pid} on this host" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == [".hydra", LOCK_NAME]  # Hydra's record only
