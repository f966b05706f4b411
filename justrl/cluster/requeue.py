"""Requeue a Slurm job that cannot go on where it is, and tell a lost node from an error.

Two callers:
- the trainer's job when every rollout engine is lost (`justrl.cluster.slurm.run_in_allocation`);
- `slurm/train.sbatch` after the learner's step failed: `python -m justrl.cluster.requeue --status N
  <overrides>` asks whether a node of the job failed. If one did, the job is requeued (at most
  `cluster.max_requeues` times, counted by Slurm's SLURM_RESTART_COUNT) and the next start
  resumes in the same run directory from the latest complete checkpoint. If none did (a Python
  error, a bad config), it is not requeued: requeueing would fail the same way again.

A node counts as failed when Slurm says so (`sinfo`'s state: down, fail, or `*`, not responding)
or when it does not run a one-task step of the job (`srun --overlap -w <node> true`), which sees a
node whose slurmd is gone long before the controller does (SlurmdTimeout, 300 s by default).
A failed probe is a trigger, not proof: the requeue waits (up to SlurmdTimeout + 60 s) for the
controller to set the node down, and requeues only then (requeued while the node was only "not
responding", the job kept it, and Slurm 22.05 then refused the restarted job's first step on the
emulated cluster: "node offset invalid" in its GPU count). So a probe that fails
for another reason does not requeue a job that would fail the same way, and the scheduler does
not start the requeued job on the failed node again (a running job cannot exclude a node itself:
`scontrol update ExcNodeList` is refused for it).

When the failed node is the batch host (it runs the batch script and rank 0), the script dies
with it and nothing here runs; with --no-kill Slurm 22.05 then keeps the job RUNNING on the other
nodes. justrl.cluster.batch_host_watch, a step on each other node, requeues it then.

No torch import: this runs in the batch script, after the learner has gone.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 60
"""A node that does not run `true` in a step within this time is lost (slurmd's MessageTimeout
is 10 s by default; a live but busy node answers in about a second)."""


def node_states(nodes: list[str]) -> dict[str, str]:
    """Slurm's state of each node (`sinfo -N`, e.g. "mixed", "down*", "idle*"; `*`: not responding)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%N|%T|%E"], capture_output=True,
                         text=True, timeout=60)
    states = {}
    for line in out.stdout.splitlines():
        name, state, reason = (line.split("|", 2) + ["", ""])[:3]
        states[name] = state + (f" ({reason})" if reason and reason != "none" else "")
    return states


def state_says_failed(state: str) -> bool:
    word = state.split(" ")[0].lower()
    return word.endswith("*") or word.rstrip("*~#!%$@^-") in ("down", "fail", "failing", "unknown")


def state_says_down(state: str) -> bool:
    """Slurm has set the node down (not only "not responding", `*`): with --no-kill it has then
    removed the node from the job and killed the job's steps there."""
    return state.split(" ")[0].lower().rstrip("*~#!%$@^-") in ("down", "fail", "failing")


def step_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of a small srun step of the job (the probe): not the batch
    script's or the task's SLURM_* settings (its --gpus-per-node, --cpus-per-task): srun would merge
    them into the step's request (Slurm 22.05 refused "--gres=none" beside them). SLURM_CONF stays:
    it says which cluster srun talks to."""
    return {k: v for k, v in env.items()
            if k == "SLURM_CONF" or not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}


def probe(node: str, job: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if `node` runs a one-task step of `job`; else what went wrong (one line)."""
    cmd = ["srun", f"--jobid={job}", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "--mem=0",
           "--cpu-bind=none", "--gres=none", "--kill-on-bad-exit=1", "true"]
    env = step_env()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return f"a one-task step did not finish within {timeout_s:.0f} s"
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return f"a one-task step failed (exit {result.returncode}): {lines[-1] if lines else 'no message'}"


def lost_nodes(nodes: list[str], job: str, states: Callable[[list[str]], dict[str, str]] = node_states,
               probe_node: Callable[[str, str], str | None] = probe) -> dict[str, str]:
    """The nodes of the job that failed: node -> why."""
    known = states(nodes)
    lost = {n: f"Slurm state {known[n]}" for n in nodes if n in known and state_says_failed(known[n])}
    for node in nodes:
        if node not in lost and (why := probe_node(node, job)) is not None:
            lost[node] = why
    return lost


def requeue_job(reason: str, max_requeues: int, env: Mapping[str, str] = os.environ) -> bool:
    """Ask Slurm to requeue this job (`scontrol requeue`): it is stopped and starts again in the
    same run directory, from its latest checkpoint. Bounded by `max_requeues` (the job's
    SLURM_RESTART_COUNT so far); False, with the reason logged, outside a Slurm job or past the
    bound."""
    job, restarts = env.get("SLURM_JOB_ID"), int(env.get("SLURM_RESTART_COUNT") or 0)
    if not job:
        log.error("%s; not a Slurm job: relaunch the same command to resume from the latest checkpoint", reason)
        return False
    if restarts >= max_requeues:
        log.error("%s; job %s not requeued: it was requeued %d times already (cluster.max_requeues=%d)", reason,
                  job, restarts, max_requeues)
        return False
    log.error("%s; requeueing job %s (restart %d of at most %d): it resumes from the latest checkpoint", reason,
              job, restarts + 1, max_requeues)
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        log.error("`scontrol requeue %s` failed: %s", job, result.stderr.strip()[:500])
        return False
    return True


def wait_until_marked(nodes: list[str], timeout_s: float,
                      states: Callable[[list[str]], dict[str, str]] = node_states, poll_s: float = 5.0,
                      every: bool = False, failed: Callable[[str], bool] = state_says_failed) -> list[str]:
    """The nodes of `nodes` whose Slurm state says `failed`, as soon as one does (`every`: once
    all do), or those that do after `timeout_s`. Not all of them by default: once a node of the job
    is gone, Slurm 22.05 refuses further steps of the resized job on the others too ("Expired or
    invalid job", seen on the emulated cluster), so their probes fail without their being lost."""
    deadline = time.monotonic() + timeout_s
    while True:
        known = states(nodes)
        marked = [n for n in nodes if failed(known.get(n, ""))]
        if (len(marked) == len(nodes) if every else marked) or time.monotonic() > deadline:
            return marked
        time.sleep(poll_s)


def slurmd_timeout_s() -> float:
    """The controller's SlurmdTimeout (after which it marks a silent node down), from `scontrol show config`."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "SlurmdTimeout":
            return float(value.split()[0])
    return 300.0


def after_learner_failure(status: int, max_requeues: int, env: Mapping[str, str] = os.environ,
                          nodes: list[str] | None = None,
                          find_lost: Callable[[list[str], str], dict[str, str]] = lost_nodes,
                          confirmed: Callable[[list[str]], list[str]] | None = None) -> int:
    """What train.sbatch does once the learner's step exited with `status` (not 0, not pre-empted):
    requeue if a node of the job failed, else not. Returns the exit status for the batch script
    (0 once the job is requeued). A node that failed the probe counts once Slurm sets it down
    (`confirmed`: those of the suspects Slurm has set down; default: wait up to SlurmdTimeout + 60 s
    for one's state to say so): a probe that fails for another reason must not requeue a job that
    fails the same way each time."""
    from justrl.cluster.placement import allocation_nodes

    job = env["SLURM_JOB_ID"]
    nodes = allocation_nodes() if nodes is None else nodes
    lost = find_lost(nodes, job)
    if not lost:
        print(f"justrl: the learner failed (exit status {status}) and no node of job {job} failed "
              f"({', '.join(nodes)} answer): not requeued, since it would fail the same way; the cause is the "
              f"first 'justrl: error:' line above", flush=True)
        return status
    what = "; ".join(f"{node}: {why}" for node, why in lost.items())
    print(f"justrl: suspect node(s) of job {job}: {what}; asking Slurm's node state", flush=True)
    if confirmed is None:
        wait_s = slurmd_timeout_s() + 60
        confirmed = lambda nodes: wait_until_marked(nodes, wait_s, failed=state_says_down)  # noqa: E731
    marked = confirmed(list(lost))
    if not marked:
        print(f"justrl: not requeued: Slurm did not set {', '.join(lost)} down within "
              "SlurmdTimeout + 60 s, so the failed probe is not taken for a lost node; "
              "the learner's own error is the first 'justrl: error:' line above", flush=True)
        return status
    print(f"justrl: node(s) {', '.join(marked)} of job {job} failed (Slurm set {'it' if len(marked) == 1 else 'them'} "
          f"down)", flush=True)
    if requeue_job(f"node(s) {', '.join(marked)} of the job failed", max_requeues, env):
        return 0
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--status", type=int, required=True, help="the learner step's exit status")
    parser.add_argument("overrides", nargs="*", help="the run's Hydra overrides (for cluster.max_requeues)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="justrl: %(message)s", stream=sys.stdout)
    from justrl.config import compose_unchecked

    cfg = compose_unchecked(args.overrides)
    return after_learner_failure(args.status, cfg.cluster.max_requeues)


if __name__ == "__main__":
    sys.exit(main())
