"""A restarted job waits for slurmctld's resent kills of its last start (justrl.cluster.restart_settle).

The decisions run on sdiag reports: one copied from the emulated cluster while a kill for a lost
node was pending, and the live report of the local Slurm (`bash slurm/setup_local_slurm.sh`). A
kill pending for a node of a requeued job cannot be made on one machine; the emulated colocated
lost-learner test (tests/test_cluster_emulated.py) is where it happened."""
import shutil
import subprocess

import pytest

from justrl.cluster.restart_settle import (FALLBACK_WAIT_S, kills_pending_for, main, pending_rpcs, read_sdiag,
                                           settle)

# sdiag's end in Slurm 22.05's format: the report on the emulated cluster on 2026-12-07 (node emu2 just
# killed) had the last REQUEST_SIGNAL_TASKS line; the two-node and ping lines are added for the cases
PENDING = """Remote Procedure Call statistics by user
\troot            (       0) count:4286   ave_time:505    total_time:2167444

Pending RPC statistics
\tREQUEST_SIGNAL_TASKS                    ( 6004) count:2
\tREQUEST_PING                            ( 1008) count:1

Pending RPCs
\t 1: REQUEST_SIGNAL_TASKS                 emu[1-2]
\t 2: REQUEST_PING                         emu3
\t 3: REQUEST_SIGNAL_TASKS                 emu2
"""
NONE = """Remote Procedure Call statistics by user
\troot            (       0) count:4286   ave_time:505    total_time:2167444

Pending RPC statistics
\tNo pending RPCs
"""


def expand(nodelist: str) -> list[str]:
    return {"emu[1-2]": ["emu1", "emu2"]}.get(nodelist, [nodelist])


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_pending_rpcs_are_read_from_sdiag():
    assert pending_rpcs(PENDING) == [("REQUEST_SIGNAL_TASKS", "emu[1-2]"), ("REQUEST_PING", "emu3"),
                                     ("REQUEST_SIGNAL_TASKS", "emu2")]
    assert pending_rpcs(NONE) == []


def test_only_kills_for_this_jobs_nodes_count():
    # a ping is harmless; emu1's share of the two-node kill counts
    assert kills_pending_for(["emu1", "emu3"], PENDING, expand) == ["REQUEST_SIGNAL_TASKS -> emu1"]
    assert kills_pending_for(["emu3"], PENDING, expand) == []  # the lost node's kills are not this start's concern
    assert kills_pending_for(["emu1"], NONE, expand) == []


def test_settle_waits_until_the_kill_for_a_survivor_is_sent():
    clock, reports = Clock(), iter([PENDING, PENDING, PENDING, NONE])
    line = settle(["emu1", "emu3"], sdiag=lambda: next(reports), expand=expand, sleep=clock.sleep, clock=clock)
    assert clock.now == 15.0  # three polls, 5 s apart
    assert line.startswith("waited 15 s until slurmctld had sent its pending REQUEST_SIGNAL_TASKS -> emu1")


def test_settle_does_not_wait_when_nothing_is_pending_for_its_nodes():
    clock = Clock()
    assert settle(["emu3"], sdiag=lambda: PENDING, expand=expand, sleep=clock.sleep, clock=clock) == \
        "no kill pending in slurmctld for emu3"
    assert clock.now == 0.0


def test_settle_is_bounded_and_says_so():
    clock = Clock()
    line = settle(["emu1"], sdiag=lambda: PENDING, expand=expand, sleep=clock.sleep, clock=clock, max_wait_s=20)
    assert clock.now == 20.0 and line.startswith("still pending after 20 s: REQUEST_SIGNAL_TASKS -> emu1; going on")


def test_without_sdiag_it_waits_one_retry_interval():
    clock = Clock()
    line = settle(["emu1"], sdiag=lambda: None, expand=expand, sleep=clock.sleep, clock=clock)
    assert clock.now == FALLBACK_WAIT_S == 85 and line.startswith("sdiag refused: waited 85 s")


def test_a_first_start_does_not_wait(capsys):
    assert main([], env={"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "nosuchnode[1-2]"}) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(shutil.which("sdiag") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode,
                    reason="no Slurm running here (bash slurm/setup_local_slurm.sh)")
def test_the_local_slurms_sdiag_is_read():
    text = read_sdiag()
    assert text is not None and "Pending RPC statistics" in text
    pending = pending_rpcs(text)
    assert all(kind.isupper() and nodes for kind, nodes in pending)
    assert ("No pending RPCs" in text) == (pending == [])
