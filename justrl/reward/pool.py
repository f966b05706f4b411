"""Score a batch of responses in worker processes, with a hard per-response timeout.

math-verify runs sympy, and some inputs make sympy run for minutes. A thread cannot be stopped and
a ProcessPoolExecutor cannot cancel a running task, so this pool owns its workers: each handles one
response at a time, and a worker that overruns `timeout_s` is killed and replaced. Its response
scores -1 and is counted in `ScoreStats.timeouts`; the step goes on.

What travels to a worker is what its verifier reads: for `dapo` the last `FIRST_CUT_CHARS` (300)
characters of each response (it looks at no more, as in the reference), for `lenient` the whole
response (veRL's math-verify reward parses all of it), for `grader` the answer the parent extracted.
`dapo` needs no workers and is scored in the calling process: it is string work on at most 300
characters (no regex that can backtrack, no sympy), so it cannot hang, and sending each response
to a worker cost more than scoring it (about 0.2 ms a round trip, 128 of them a step on the
embedded default).

Workers run the verifier in their main thread, so math-verify's own time limits are on there as in
veRL; the pool's kill is the limit for everything else (sympy in the grader, C code a signal cannot
interrupt).
"""
from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from justrl.reward.dapo import FIRST_CUT_CHARS

FAILED_SCORE = -1.0
# How much of each response a verifier reads (None: all of it).
TAIL_CHARS = {"dapo": FIRST_CUT_CHARS, "lenient": None, "grader": None}
# Verifiers scored in the calling process (bounded string work; see the module docstring).
IN_PROCESS = ("dapo",)
# How long a new worker may take to import its verifier (sympy is slow to import) and warm up.
WORKER_START_TIMEOUT_S = 120.0


@dataclass
class ScoreStats:
    """What happened while scoring one batch (beyond the scores)."""

    timeouts: int = 0
    """Responses whose scoring ran past the timeout (scored -1; their worker was killed)."""
    errors: int = 0
    """Responses whose verifier raised or whose worker died (scored -1)."""
    timed_out: list[int] = field(default_factory=list)
    """Batch indices of the timed-out responses."""
    first_error: str | None = None
    """The first error message, for the log."""

    def record_error(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message


def _worker_main(conn: Connection, verifier: str) -> None:
    import signal

    from justrl.reward.verifiers import scorer  # imported here: the child starts fresh (spawn)

    # Slurm and submitit deliver their pre-emption signals to every process of the job; only the
    # training loop acts on them (it checkpoints), a worker must not die of them mid-step.
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    # math-verify logs a warning for each of its own timeouts; the verdict (-1) is what counts here.
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("pylatexenc").setLevel(logging.ERROR)  # the grader's LaTeX-to-text warnings, likewise

    score_fn = scorer(verifier)
    # import math-verify/sympy/pylatexenc before the first deadline (the second call is one the
    # grader can only decide with pylatexenc and sympy)
    score_fn("warm-up \\boxed{1}", "1")
    score_fn("\\sqrt{2}x", "x\\sqrt{2}")
    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, tail, ground_truth = task
        try:
            conn.send((index, float(score_fn(tail, ground_truth)), None))
        except Exception as exc:  # a verifier bug must not take the step down
            conn.send((index, FAILED_SCORE, f"{type(exc).__name__}: {exc}"))


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, verifier: str):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn, verifier), daemon=True)
        self.process.start()
        child_conn.close()
        self.task: int | None = None
        self.deadline = 0.0

    def wait_ready(self) -> None:
        if not self.conn.poll(WORKER_START_TIMEOUT_S) or self.conn.recv() != "ready":
            self.kill()
            raise RuntimeError(f"reward worker did not start within {WORKER_START_TIMEOUT_S}s")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class ScorerPool:
    """A fixed set of scoring processes for one verifier.

        with ScorerPool("lenient", num_workers=2, timeout_s=10) as pool:
            scores, stats = pool.score(responses, ground_truths)
    """

    def __init__(self, verifier: str = "dapo", num_workers: int = 2, timeout_s: float = 10.0):
        from justrl.reward.verifiers import SCORER_NAMES, scorer

        if verifier not in SCORER_NAMES:
            raise ValueError(f"unknown verifier {verifier!r}; choose one of {sorted(SCORER_NAMES)}")
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"need num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}")
        self.verifier = verifier
        self.timeout_s = timeout_s
        self._tail = TAIL_CHARS[verifier]
        self._ctx = mp.get_context("spawn")  # fork would copy the learner's threads and memory
        self._in_process = scorer(verifier) if verifier in IN_PROCESS else None
        self._workers = [] if self._in_process else [self._start_worker() for _ in range(num_workers)]

    def _start_worker(self) -> _Worker:
        worker = _Worker(self._ctx, self.verifier)
        worker.wait_ready()
        return worker

    def score(self, responses: list[str], ground_truths: list[str]) -> tuple[list[float], ScoreStats]:
        """Score `responses[i]` against `ground_truths[i]`; returns (scores, stats)."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        scores = [FAILED_SCORE] * len(responses)
        stats = ScoreStats()
        if self._in_process is not None:
            for i, (response, truth) in enumerate(zip(responses, ground_truths)):
                try:
                    scores[i] = float(self._in_process(response[-self._tail:], truth))
                except Exception as exc:  # as in a worker: a verifier bug must not take the step down
                    stats.record_error(f"{type(exc).__name__}: {exc}")
            return scores, stats
        pending = list(range(len(responses) - 1, -1, -1))  # popped from the end: in order
        busy: dict[Connection, _Worker] = {}

        def fail(worker: _Worker, message: str, timed_out: bool) -> None:
            index = worker.task
            if timed_out:
                stats.timeouts += 1
                stats.timed_out.append(index)
            else:
                stats.record_error(message)
            worker.kill()
            self._workers[self._workers.index(worker)] = self._start_worker()

        while pending or busy:
            for worker in self._workers:
                if worker.task is None and pending:
                    index = pending.pop()
                    worker.task, worker.deadline = index, time.monotonic() + self.timeout_s
                    response, truth = responses[index], ground_truths[index]
                    worker.conn.send((index, response if self._tail is None else response[-self._tail:], truth))
                    busy[worker.conn] = worker
            next_deadline = min(w.deadline for w in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic())):
                worker = busy.pop(conn)
                try:
                    index, value, error = conn.recv()
                except (EOFError, OSError):
                    fail(worker, f"reward worker died (exit code {worker.process.exitcode})", False)
                    continue
                scores[index] = value
                if error is not None:
                    stats.record_error(error)
                worker.task = None
            now = time.monotonic()
            for conn, worker in list(busy.items()):
                if worker.deadline <= now:
                    del busy[conn]
                    fail(worker, "", True)
        return scores, stats

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:  # the worker is already gone
                pass
            worker.process.join(timeout=2)
            worker.kill()
        self._workers = []

    def __enter__(self) -> "ScorerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
