"""What rank 0 records of each step: its timings (`StepTimer`), and its metrics, written to the
event file, the train.log and the progress bar (`StepLog`)."""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager

from justrl.run_summary import RunFaults
from justrl.tb import ScalarLog

STEP_LOGGER = "justrl.steps"
step_log = logging.getLogger(STEP_LOGGER)


class StepTimer:
    """The step's wall-clock spans (perf/time_train, perf/time_sync, perf/time_step), the seconds
    the learner waited for rollouts (perf/learner_wait_s: with lag 1 only what the overlap did not
    hide), and the share of the step the engines had nothing to do (perf/engine_idle_fraction,
    from `busy_seconds()`: each engine's seconds with a request outstanding, so far)."""

    def __init__(self, busy_seconds=None):
        self.busy_seconds = busy_seconds
        self._idle_mark = (time.perf_counter(), busy_seconds()) if busy_seconds is not None else None
        self.start()

    def start(self) -> None:
        self.marks = {"start": time.perf_counter()}
        self.learner_wait = 0.0

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    @contextmanager
    def waiting(self):
        """Time spent in the block counts as the learner waiting for rollouts."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.learner_wait += time.perf_counter() - t

    def metrics(self, step_tokens: int) -> dict[str, float]:
        """The step's perf/* figures; call after `mark("trained")` and `mark("synced")`."""
        m = self.marks
        step_s = m["synced"] - m["start"]
        out = {"perf/time_train": m["trained"] - m["update"], "perf/time_sync": m["synced"] - m["trained"],
               "perf/time_step": step_s, "perf/tokens_per_second": step_tokens / step_s,
               "perf/learner_wait_s": self.learner_wait}
        if self.busy_seconds is not None:
            now, busy = time.perf_counter(), self.busy_seconds()
            then, busy_then = self._idle_mark
            window = now - then
            busy_share = sum(b - a for a, b in zip(busy_then, busy)) / (len(busy) * window)
            self._idle_mark = (now, busy)
            out["perf/engine_idle_fraction"] = min(1.0, max(0.0, 1.0 - busy_share))
        return out


class StepLog:
    """Rank 0's record of the run: the event file (justrl.tb), one train.log line per step, the
    progress bar, and the counters a checkpoint keeps (total tokens, the run's faults)."""

    def __init__(self, run_dir, run_name: str, start_step: int, total_steps: int, counters: dict,
                 resumed: bool, fleet, faults_path):
        from tqdm import tqdm

        self.fleet, self.counters, self.faults_path = fleet, counters, faults_path
        self.tb = ScalarLog(run_dir, resume_step=start_step if resumed else None)
        self.faults = RunFaults.load(faults_path, counters.get("faults")) if resumed else RunFaults()
        if resumed:
            # Slurm counts the job's requeues (scontrol's, submitit's); a new job starts at 0
            requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
            self.faults.resumed(start_step, self.tb.last_step_before, requeued)
            last = self.tb.last_step_before
            if last and last > start_step:
                logging.getLogger("justrl").warning(
                    "the run had reached step %d; steps %d-%d since the checkpoint are trained again",
                    last, start_step + 1, last)
        self.total_steps = total_steps
        self.progress = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step", dynamic_ncols=True)

    def count_faults(self) -> RunFaults:
        """The run's fault totals so far (kept in `counters` for the next checkpoint)."""
        fleet = self.fleet
        totals = self.faults.totals(fleet.restarts, fleet.hung, len(fleet.lost))
        self.counters["faults"] = totals.state()
        totals.write(self.faults_path)
        return totals

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        self.tb.scalars(step, metrics)

    def step(self, step: int, step_tokens: int, metrics: dict[str, float]) -> None:
        """Record a finished step: counters, fault totals, the event file, train.log, the bar."""
        self.counters["total_tokens"] += step_tokens
        metrics["perf/total_tokens"] = float(self.counters["total_tokens"])
        metrics.update(self.count_faults().scalars())
        # how many steps older than the learner's the generating weights were
        metrics["rollout/policy_lag"] = float(step - 1 - metrics["rollout/weights_step"])
        self.tb.scalars(step, metrics)
        step_log.info("step %d/%d %s", step, self.total_steps,
                      " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        self.progress.set_postfix(reward=f"{metrics['reward/mean']:+.3f}", acc=f"{metrics['reward/accuracy']:.2f}",
                                  len=f"{metrics['response_length/mean']:.0f}",
                                  ent=f"{metrics['actor/entropy']:.2f}", refresh=False)
        self.progress.update(1)

    def close(self) -> None:
        self.progress.close()
        self.tb.close()
