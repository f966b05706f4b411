"""Run a command (a vLLM server) and take it down when the process that started it dies.

    python -m justrl.rollout.guard <watched pid> -- <command...>

A controller killed with SIGKILL runs no cleanup, and a vLLM server started in a session of its
own would outlive it, holding memory and a port. The guard leads the server's process group
(justrl starts it with a new session), checks every second that the watched process is alive,
and when it is not, stops the whole group: SIGTERM, then SIGKILL after `GRACE_S`. A SIGTERM sent
to the group (EngineProcess.stop) reaches the server directly; the guard then waits for the server
to exit before exiting itself, and for the rest of the group (vLLM's engine core and workers,
which may outlive the server by a moment) to be gone too, so that "stopped" means the memory, the
port and the CPU are free again.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 15.0


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group `pgid` (Linux /proc). A process
    whose parent died stays in its group, so this finds vLLM's workers after their server exits."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":  # fields[2]: pgrp, fields[0]: state
                members.append(int(entry))
    return members


def wait_for_group_exit(pgid: int, timeout_s: float, exclude: tuple[int, ...] = ()) -> list[int]:
    """Wait up to `timeout_s` for every process of group `pgid` but `exclude` to exit; returns
    those still alive at the deadline (empty when the group is gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [pid for pid in group_members(pgid) if pid not in exclude]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m justrl.rollout.guard <pid> -- <command...>", file=sys.stderr)
        return 2
    watched, command = int(argv[0]), argv[2:]
    child = subprocess.Popen(command)  # same process group as the guard

    def shutdown(*_) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deadline = time.monotonic() + GRACE_S
        os.killpg(os.getpgrp(), signal.SIGTERM)
        try:
            child.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        left = wait_for_group_exit(os.getpgrp(), max(0.0, deadline - time.monotonic()), exclude=(os.getpid(),))
        if left or child.returncode is None:
            os.killpg(os.getpgrp(), signal.SIGKILL)  # the guard goes too
        sys.exit(child.returncode if child.returncode is not None else 1)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    while child.poll() is None:
        if not _alive(watched):
            shutdown()
        time.sleep(POLL_S)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
