"""The run's fault totals across starts and the end-of-run summary, on real TensorBoard event
files written by justrl's writer and read back with TensorBoard's reader."""
from __future__ import annotations

import re

from justrl.run_summary import RunFaults, summary
from justrl.tb import EVENT_FILE_NAME, ScalarLog, read_scalars


def test_fault_totals_carry_over_starts_and_count_the_steps_redone(tmp_path):
    # first start: steps 1-5 logged, one engine restarted at step 4; the checkpoint was step 3
    faults = RunFaults()
    tb = ScalarLog(tmp_path)
    for step in range(1, 6):
        totals = faults.totals(restarts_here=int(step >= 4), hung_here=0)
        tb.scalars(step, {"reward/mean": 0.1 * step, **totals.scalars()})
        if step == 3:
            saved = totals.state()  # what the checkpoint of step 3 holds
    tb.close()
    # second start, from step 3's checkpoint: the file had reached step 5; a hung engine now
    tb = ScalarLog(tmp_path, resume_step=3)
    assert tb.last_step_before == 5
    faults = RunFaults.from_state(saved)
    faults.resumed(3, tb.last_step_before, requeued=True)  # a requeued Slurm job's start
    assert faults == RunFaults(engine_restarts=0, hung_engines=0, engines_lost=0, resumes=1, steps_redone=2,
                               requeues=1)
    for step in range(4, 7):
        tb.scalars(step, {"reward/mean": 0.1 * step, **faults.totals(restarts_here=1, hung_here=1).scalars()})
    tb.close()

    scalars = read_scalars(tmp_path / EVENT_FILE_NAME)
    assert [s for s, _ in scalars["reward/mean"]] == [1, 2, 3, 4, 5, 6]  # each step once
    assert scalars["faults/engine_restarts"][-1] == (6, 1.0)  # the first start's restart was after step 3
    assert scalars["faults/resumes"][-1] == (6, 1.0) and scalars["faults/steps_redone"][-1] == (6, 2.0)
    assert scalars["faults/requeues"] == [(s, float(s > 3)) for s in range(1, 7)]


def test_a_fresh_writer_reports_no_previous_step(tmp_path):
    assert ScalarLog(tmp_path).last_step_before is None
    assert RunFaults.from_state(None) == RunFaults()
    faults = RunFaults()
    faults.resumed(50, None)  # a checkpoint without an event file: nothing to redo
    assert faults.steps_redone == 0 and faults.resumes == 1 and faults.requeues == 0  # resubmitted, not requeued


def test_the_summary_names_steps_validation_faults_and_where_things_are(tmp_path):
    run = tmp_path / "justrl-tiny-none"
    tb = ScalarLog(run)
    tb.scalars(0, {"val/AIME24/accuracy": 0.25, "val/AMC23/accuracy": 0.5, "val/AMC23/accuracy_grader": 0.4})
    for step in (1, 2):
        tb.scalars(step, {"reward/mean": 0.0, **RunFaults(3, 1, 1, 2, 7, requeues=1).scalars()})
    tb.scalars(2, {"val/AIME24/accuracy": 0.3125, "val/AMC23/accuracy": 0.625})
    tb.close()
    text = summary(read_scalars(run / EVENT_FILE_NAME), run, 2, run / "checkpoints" / "step_000002")
    lines = text.splitlines()
    assert lines[0] == "justrl: run justrl-tiny-none finished: step 2/2"
    assert re.search(r"AIME24 +0 +0\.250 +2 +0\.312", text) and re.search(r"AMC23 +0 +0\.500 +2 +0\.625", text)
    assert "accuracy_grader" not in text  # one score per benchmark: reward.val_verifier's
    for what, n in (("engine restarts \\(died or hung\\)", 3), ("engines declared hung", 1),
                    ("engines dropped \\(restarts failed\\)", 1), ("Slurm requeues of the job", 1),
                    ("resumes from a checkpoint", 2), ("steps trained again after a resume", 7)):
        assert re.search(rf"{what} +{n}$", text, re.M), what
    assert f"checkpoints {run / 'checkpoints' / 'step_000002'}" in text
    assert f"tensorboard --logdir {tmp_path}" in text
    stopped = summary(read_scalars(run / EVENT_FILE_NAME), run, 10, None, stopped="signal 10")
    assert stopped.splitlines()[0] == ("justrl: run justrl-tiny-none stopped at step 2/10 (signal 10); "
                                       "relaunch the same command to resume")


def test_faults_json_keeps_what_a_start_did_after_its_last_checkpoint(tmp_path):
    """A start that loses every engine after its checkpoint (then is requeued) logs no step more:
    its restarts and drops are in <run>/faults.json, and the next start begins from there."""
    import json

    import pytest

    from justrl.run_summary import FAULTS_FILE
    from justrl.step_log import StepLog

    class Fleet:  # the counters StepLog reads from the rollout fleet (restarts, hung, lost)
        restarts, hung, lost = 0, 0, {}

    path = tmp_path / FAULTS_FILE
    fleet = Fleet()
    first = StepLog(tmp_path, "run", 0, 4, {"total_tokens": 0}, resumed=False, fleet=fleet, faults_path=path)
    checkpoint_counters = dict(first.counters, faults=first.count_faults().state())  # the checkpoint of step 0
    fleet.restarts, fleet.lost = 4, {"engine1": "gone", "engine2": "gone"}  # then the node is lost
    first.count_faults()
    first.close()
    assert json.loads(path.read_text())["engines_lost"] == 2 and json.loads(path.read_text())["engine_restarts"] == 4
    second = StepLog(tmp_path, "run", 0, 4, dict(checkpoint_counters), resumed=True, fleet=Fleet(), faults_path=path)
    totals = second.count_faults()
    second.close()
    assert (totals.engine_restarts, totals.engines_lost, totals.resumes) == (4, 2, 1)
    path.unlink()  # a checkpoint from before the file: its own totals
    third = StepLog(tmp_path, "run", 0, 4, dict(checkpoint_counters), resumed=True, fleet=Fleet(), faults_path=path)
    assert (third.faults.engine_restarts, third.faults.resumes) == (0, 1)
    third.close()
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: unreadable fault totals"):
        StepLog(tmp_path, "run", 0, 4, checkpoint_counters, resumed=True, fleet=Fleet(), faults_path=path)
