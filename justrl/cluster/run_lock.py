"""One job per run directory: `<run>/RUNNING`, written when a run starts and removed when it ends.

A run's directory is named after the run (trainer.run_name: model and ablation), so submitting
the same run again continues it. Two jobs writing one directory would interleave checkpoints and
event files, so a start that finds the lock of a job that is still alive refuses, naming it:

    outputs/justrl-deepseek-1.5b-none is in use by Slurm job 4242 (RUNNING, on node gpu017, since
    2026-12-04 13:02:11 UTC); wait for it or `scancel 4242`, or choose another trainer.output_dir

The lock holds who wrote it (Slurm job id, host, pid, the process's start time, when). It is taken
over, with a log line, when its writer is gone:
- the same Slurm job: a requeued job (pre-emption, --time, a lost node) keeps its id;
- a Slurm job that `squeue` no longer lists, or lists in a final state;
- a local run (no Slurm job) on this host whose process is gone (pid and start time, so a reused
  pid is not mistaken for it).
A lock that cannot be checked (a local run on another host, squeue failing) is refused, saying
which file to delete once the user knows its run is gone. Exclusive creation (O_EXCL) keeps two
jobs starting at the same moment from both taking a free directory.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("justrl")

LOCK_NAME = "RUNNING"
# squeue states in which a job may still write (or come back to) the directory; any other state
# (COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, PREEMPTED, OUT_OF_MEMORY, ...) is final.
LIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                         "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"})


class RunLocked(RuntimeError):
    """The run directory is in use by another job (or cannot be shown not to be)."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def holder_here() -> dict:
    """Who this process is, as written into the lock."""
    return {"slurm_job": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": os.getpid(),
            "process_start": _process_start(os.getpid()), "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def slurm_job_state(job_id: str) -> str | None:
    """`squeue`'s state of the job; None when squeue does not know it (it ended and was purged).
    Raises OSError when squeue cannot answer (not installed, controller unreachable)."""
    result = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise OSError(f"squeue -j {job_id}: exit {result.returncode}: {result.stderr.strip()[:300]}")
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else None


@dataclass(frozen=True)
class Verdict:
    free: bool
    why: str


def judge(holder: dict, me: dict, job_state=slurm_job_state) -> Verdict:
    """Whether a lock written by `holder` may be taken over by `me`, and why."""
    job = holder.get("slurm_job")
    if job:
        if job == me.get("slurm_job"):
            return Verdict(True, f"the same Slurm job {job} (requeued or restarted)")
        try:
            state = job_state(job)
        except (OSError, subprocess.SubprocessError) as exc:
            return Verdict(False, f"Slurm job {job} (on {holder.get('host')}, since {holder.get('since')}) "
                                  f"cannot be checked ({exc})")
        if state is None or state.split()[0] not in LIVE_STATES:
            return Verdict(True, f"Slurm job {job} is {'no longer in squeue' if state is None else state}")
        return Verdict(False, f"Slurm job {job} ({state}, on {holder.get('host')}, since {holder.get('since')}); "
                              f"wait for it or `scancel {job}`")
    if holder.get("host") != me["host"]:
        return Verdict(False, f"process {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')}), "
                              f"which cannot be checked from {me['host']}")
    pid = holder.get("pid")
    alive = isinstance(pid, int) and _process_start(pid) is not None and _process_start(pid) == holder.get("process_start")
    if alive:
        return Verdict(False, f"process {pid} on this host (since {holder.get('since')}); stop it first")
    return Verdict(True, f"process {pid} on this host is gone")


class RunLock:
    """`<run>/RUNNING` for the life of one run: `acquire()` at the start, `release()` at the end."""

    def __init__(self, run_dir: Path, job_state=slurm_job_state):
        self.path = Path(run_dir) / LOCK_NAME
        self.job_state = job_state
        self.me: dict | None = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RunLocked(f"{self.path}: unreadable lock ({exc}); delete it if no job uses "
                            f"{self.path.parent}") from exc

    def _create(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True

    def acquire(self) -> None:
        me = holder_here()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create(me):
            holder = self._read()
            verdict = judge(holder, me, self.job_state) if holder else Verdict(True, "an empty lock")
            if not verdict.free:
                raise RunLocked(f"{self.path.parent} is in use by {verdict.why}; or choose another "
                                f"trainer.output_dir (if you know that run is gone, delete {self.path})")
            log.info("run directory %s: taking over its lock: %s", self.path.parent, verdict.why)
            tmp = self.path.with_name(f"{LOCK_NAME}.{me['host']}.{me['pid']}")
            tmp.write_text(json.dumps(me))
            os.replace(tmp, self.path)
        self.me = me

    def release(self) -> None:
        """Remove the lock if it is still this process's (never another job's)."""
        if self.me is not None and self._read() == self.me:
            self.path.unlink(missing_ok=True)
        self.me = None


def check_free(run_dir: Path, job_state=slurm_job_state) -> None:
    """Raise RunLocked if `run_dir` is in use by a live job (the submit side's early check: a
    second submission is refused on the login node instead of failing in the queue)."""
    lock = RunLock(run_dir, job_state)
    holder = lock._read()
    if holder:
        verdict = judge(holder, holder_here(), job_state)
        if not verdict.free:
            raise RunLocked(f"{run_dir} is in use by {verdict.why}; or choose another trainer.output_dir "
                            f"(if you know that run is gone, delete {lock.path})")
