"""Requeue the job when its batch host is lost: nothing else of the job's is left to do it.

The batch host runs the batch script (slurm/train.sbatch, or submitit's) and learner rank 0. When
that node fails, the script dies with it, so neither its `python -m justrl.cluster.requeue` nor
rank 0's requeue runs; and with `--no-kill` Slurm removes the node from the job and keeps the
job RUNNING on the others with nothing in it (seen on the emulated cluster, Slurm 22.05: job 40
stayed RUNNING on its second node for minutes until cancelled by hand; slurmctld requeues a job
for a failed node only without --no-kill, job_mgr.c `kill_running_job_by_node_name`).

So rank 0 starts one small step on every other node of the job, `python -m
justrl.cluster.batch_host_watch`: each polls the job (`scontrol show job`) and the nodes' states
(`sinfo`) every WATCH_POLL_S, and once Slurm has set the batch host down, or removed it from the
job, the first surviving node's watch requeues the job (`scontrol requeue`, bounded by
`cluster.max_requeues` through the job's `Restarts` count) and the next start resumes from the
latest complete checkpoint. Past the bound it cancels the job, so that a run which cannot go on
does not hold the allocation idle until its time limit. Each watch ends when the job is no longer
RUNNING (requeued, completed, cancelled: Slurm also ends the step itself then), and rank 0 stops
them when the loop ends.

Waiting for the controller's own verdict (SlurmdTimeout after the node went silent) is the same
rule as `justrl.cluster.requeue`: a node is counted lost only once Slurm says so.

The idea that the survivors act when a member is lost is torchelastic's (torchrun's agents
re-form the worker group among themselves); here the survivors only hand the job back to Slurm.
No torch import: this runs beside the job's tasks.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

from justrl.cluster.requeue import node_states, requeue_job, state_says_down, state_says_failed, step_env

log = logging.getLogger(__name__)

WATCH_POLL_S = 15.0
"""How often each watch asks Slurm (two light calls); the controller itself takes SlurmdTimeout
(300 s by default) to set a silent node down."""


def job_facts(job: str) -> dict[str, str]:
    """`scontrol show job -o <job>` as key -> value (JobState, BatchHost, NodeList, Restarts, StdOut...);
    {} when Slurm no longer knows the job."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def hostnames(nodelist: str) -> list[str]:
    """A Slurm node list ("emu[1-2]") as node names."""
    if not nodelist or nodelist == "(null)":
        return []
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          timeout=60).stdout.split()


def cancel_job(job: str, reason: str) -> None:
    log.error("%s; cancelling job %s: it cannot go on", reason, job)
    subprocess.run(["scancel", job], capture_output=True, text=True, timeout=120)


def watch_batch_host(job: str, me: str, max_requeues: int, poll_s: float = WATCH_POLL_S,
                     facts: Callable[[str], dict[str, str]] = job_facts,
                     states: Callable[[list[str]], dict[str, str]] = node_states,
                     expand: Callable[[str], list[str]] = hostnames,
                     requeue: Callable[[str, int, Mapping[str, str]], bool] = requeue_job,
                     cancel: Callable[[str, str], None] = cancel_job,
                     sleep: Callable[[float], None] = time.sleep) -> str:
    """Watch job `job` from node `me` until it is no longer RUNNING; requeue it (or cancel it, past
    `max_requeues`) once its batch host is down or out of the job. Returns what happened:
    "requeued", "cancelled", or "job N is STATE"."""
    while True:
        info = facts(job)
        state = info.get("JobState", "gone")
        if state != "RUNNING":
            return f"job {job} is {state}"
        batch, nodes = info.get("BatchHost", ""), expand(info.get("NodeList", ""))
        known = states(sorted(set(nodes) | {batch}))
        batch_state = known.get(batch, "")
        if batch and (batch not in nodes or state_says_down(batch_state)):
            survivors = [n for n in nodes if n != batch and not state_says_failed(known.get(n, ""))]
            if survivors and survivors[0] != me:  # that node's watch acts; this one waits for the outcome
                sleep(poll_s)
                continue
            why = f"Slurm state {batch_state}" if batch_state else "no state"
            reason = (f"the batch host {batch} of job {job} failed ({why}; "
                      f"{'removed from the job' if batch not in nodes else 'still in the job'}): the batch "
                      f"script and learner rank 0 went with it (seen from {me})")
            restarts = int(info.get("Restarts") or 0)
            if requeue(reason, max_requeues, {"SLURM_JOB_ID": job, "SLURM_RESTART_COUNT": str(restarts)}):
                return "requeued"
            if restarts >= max_requeues:
                cancel(job, reason)
                return "cancelled"
            # `scontrol requeue` itself failed (logged): ask again at the next poll
        sleep(poll_s)


def watch_command(node: str, job: str, max_requeues: int, python: str = sys.executable,
                  log_file: str | None = None) -> list[str]:
    """The srun step of the watch on `node`: one task, no GPU, CPU or memory of the job's taken
    (--overlap, --mem=0, --gres=none), not ended with the step it was started from (--no-kill,
    --kill-on-bad-exit=0). Its lines are appended by the watch itself to `log_file` (the job's
    own log): the step's stdout is not used, since in the emulated runs the lines written there
    never reached the log once the batch host was gone (its srun client runs there; the requeue
    itself happened)."""
    cmd = ["srun", f"--jobid={job}", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "--mem=0",
           "--cpu-bind=none", "--gres=none", "--no-kill", "--kill-on-bad-exit=0", f"--job-name=justrl-watch-{node}",
           "--output=/dev/null", python, "-u", "-m", "justrl.cluster.batch_host_watch", "--job", job,
           "--max-requeues", str(max_requeues)]
    return cmd + (["--log", log_file] if log_file else [])


def start_batch_host_watch(job: str, max_requeues: int, env: Mapping[str, str] = os.environ,
                           facts: Callable[[str], dict[str, str]] = job_facts,
                           expand: Callable[[str], list[str]] = hostnames,
                           popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> list[subprocess.Popen]:
    """One watch step on each node of `job` but its batch host (none on a one-node job)."""
    info = facts(job)
    batch, nodes = info.get("BatchHost", ""), expand(info.get("NodeList", ""))
    stdout = info.get("StdOut") or None
    watches = []
    for node in nodes:
        if node != batch:
            watches.append(popen(watch_command(node, job, max_requeues, log_file=stdout), env=step_env(env),
                                 stdin=subprocess.DEVNULL, start_new_session=True))
    if watches:  # printed: the run's logging is not set up yet when rank 0 starts them
        print(f"justrl: batch host watch: {len(watches)} step(s) on {','.join(n for n in nodes if n != batch)} "
              f"requeue job {job} if its batch host {batch} is lost", flush=True)
    return watches


def stop_watch(watches: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """End the watch steps (the job is ending normally or by an error this node can report)."""
    for proc in watches:
        if proc.poll() is None:
            proc.terminate()  # srun forwards SIGTERM to its task and ends the step
    for proc in watches:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="the Slurm job id to watch")
    parser.add_argument("--max-requeues", type=int, required=True, help="cluster.max_requeues")
    parser.add_argument("--log", help="append the watch's lines to this file (the job's log), else stdout")
    args = parser.parse_args(argv)
    handler = logging.FileHandler(args.log, mode="a") if args.log else logging.StreamHandler(sys.stdout)
    logging.basicConfig(level=logging.INFO, format="justrl: %(message)s", handlers=[handler])
    me = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    log.info("batch host watch on %s: watching job %s", me, args.job)
    log.info("batch host watch on %s: %s", me, watch_batch_host(args.job, me, args.max_requeues))
    return 0


if __name__ == "__main__":
    sys.exit(main())
