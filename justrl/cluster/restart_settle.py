"""Before a requeued job's first step: wait until slurmctld holds no undelivered kill for its nodes.

Why. When slurmctld sends a step signal or a job kill to a node and the node does not answer
within MessageTimeout (a slurmd busy tearing down a large dying step, or forwarding to a node that
has just died), the controller's agent queues the message and sends it again about a minute later
(`src/slurmctld/agent.c`: `_queue_agent_retry` keeps the threads that timed out, DSH_NO_RESP, and
`agent_retry` resends after RPC_RETRY_INTERVAL). The message names the step only by job id and
step id. A requeued job keeps its job id and numbers its steps from 0 again, so a resent kill for
the lost start's step 1 (its learner) kills the new start's step 1 if it arrives after that step
began. Seen on the emulated cluster (Slurm 22.05, job 31, 2026-12-07): slurmctld's message to the
survivor emu1 for the failing learner step timed out at 03:37:46; the job was requeued and started
again on emu1 and the spare at 03:38:28; at 03:38:48, 62 s after the timeout, "STEP 31.1 ON emu1
CANCELLED" ended the new learner (SIGCONT, SIGTERM), and the job failed instead of resuming.

So a restarted job (SLURM_RESTART_COUNT > 0) first waits until `sdiag`'s "Pending RPCs" (the
agent's retry list) names none of its nodes for a message that ends a step or a job; a resent
step kill then lands while the new start has no such step yet, and does nothing (a resent kill of
the whole job would end this start whenever it came: then it comes before anything is loaded).
Seen here: the resend came 61 s after "Queue RPC msg_type=6004 ... for retry" in slurmctld's
debug log (6004: REQUEST_SIGNAL_TASKS). Nothing pending: no wait.
Where `sdiag` is refused (PrivateData=usage) it waits a fixed FALLBACK_WAIT_S instead, which
covers one retry interval. At most MAX_WAIT_S; past it the job goes on and says so.

Not covered: a job whose learner is its first step (the submitit path: the stale kill would be for
step 0, which exists from the start); there the wait cannot come before the step.
No torch import: this runs in the batch script before any step.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

from justrl.cluster.batch_host_watch import hostnames

ENDING_RPCS = frozenset({"REQUEST_SIGNAL_TASKS", "REQUEST_TERMINATE_TASKS", "REQUEST_TERMINATE_JOB",
                         "REQUEST_KILL_TIMELIMIT", "REQUEST_KILL_PREEMPTED", "REQUEST_ABORT_JOB"})
"""The node RPCs that end a step or a job (slurm/slurm.h's slurm_msg_type_t names, as sdiag prints them)."""

RETRY_INTERVAL_S = 60
"""slurmctld's agent resends an undelivered node RPC after this long (RPC_RETRY_INTERVAL)."""

FALLBACK_WAIT_S = RETRY_INTERVAL_S + 2 * 10 + 5
"""Without sdiag: one retry interval, plus the default MessageTimeout (10 s) for the original send
and for the resend, plus a margin."""

MAX_WAIT_S = 300
POLL_S = 5.0


def pending_rpcs(sdiag_text: str) -> list[tuple[str, str]]:
    """(message type, node list) of each line under sdiag's "Pending RPCs" heading."""
    pending, inside = [], False
    for line in sdiag_text.splitlines():
        if line.strip() == "Pending RPCs":
            inside = True
            continue
        if inside:
            match = re.match(r"\s*\d+:\s+(\S+)\s+(\S+)\s*$", line)
            if not match:
                if line.strip():
                    break  # the next section
                continue
            pending.append((match.group(1), match.group(2)))
    return pending


def read_sdiag() -> str | None:
    """`sdiag`'s report, or None where it is refused or fails."""
    try:
        out = subprocess.run(["sdiag"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def kills_pending_for(nodes: list[str], sdiag_text: str,
                      expand: Callable[[str], list[str]] = hostnames) -> list[str]:
    """The pending step- or job-ending RPCs that name one of `nodes`, as "TYPE -> node,node"."""
    found = []
    for kind, nodelist in pending_rpcs(sdiag_text):
        if kind in ENDING_RPCS and (hit := sorted(set(expand(nodelist)) & set(nodes))):
            found.append(f"{kind} -> {','.join(hit)}")
    return found


def settle(nodes: list[str], sdiag: Callable[[], str | None] = read_sdiag,
           expand: Callable[[str], list[str]] = hostnames, sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic, max_wait_s: float = MAX_WAIT_S) -> str:
    """Wait until no ending RPC for `nodes` is pending in slurmctld; returns the line to print."""
    start = clock()
    first: list[str] = []
    while True:
        text = sdiag()
        waited = clock() - start
        if text is None:
            sleep(FALLBACK_WAIT_S)
            return (f"sdiag refused: waited {FALLBACK_WAIT_S} s, one retry interval of slurmctld's agent, for a kill "
                    f"of the last start's steps it may resend")
        pending = kills_pending_for(nodes, text, expand)
        if not pending:
            if not first:
                return f"no kill pending in slurmctld for {','.join(nodes)}"
            return (f"waited {waited:.0f} s until slurmctld had sent its pending {'; '.join(first)} (a resent kill "
                    f"names the step by job and step id, which this start reuses)")
        first = first or pending
        if waited >= max_wait_s:
            return (f"still pending after {waited:.0f} s: {'; '.join(pending)}; going on (a step of this start "
                    f"with the same id as the last start's may be killed by it)")
        sleep(POLL_S)


def main(argv: list[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    restart = int(env.get("SLURM_RESTART_COUNT") or 0)
    if restart == 0:
        return 0
    nodes = hostnames(env["SLURM_JOB_NODELIST"])
    print(f"justrl: job {env.get('SLURM_JOB_ID')} restart {restart}: {settle(nodes)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
