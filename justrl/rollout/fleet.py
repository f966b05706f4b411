"""Rollouts over several vLLM engines (justrl.rollout.engine): `RolloutFleet` sends each prompt's request
to the least-loaded live engine, restarts an engine that died mid-step and retries only the
requests it had outstanding, a bounded number of times, and reloads the weights of all of them.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from justrl.rollout.client import (MAX_IN_FLIGHT_PER_ENGINE, Completion, EngineError, EngineRequestError, SamplingSettings)
from justrl.rollout.dispatch import Dispatch, DispatchRecord
from justrl.rollout.engine import EngineProcess

log = logging.getLogger(__name__)


class AllEnginesLost(EngineError):
    """No rollout engine is left: each one failed its restarts (`RolloutFleet.lost`)."""


class RolloutFleet:
    """The step's rollout engines: dispatches requests to them, reloads weights, restarts the dead.

    `weights_dir` is the directory the engines serve now (the model at start, then each step's
    synced weights); an engine that is restarted comes back serving it.

    Dispatch (`generate`): one request = one prompt's n samples. Requests wait in a queue here and
    each goes to the live engine with the fewest outstanding requests (ties: the lowest index),
    at most `max_requests_per_engine` outstanding per engine. The cap matters: vLLM batches up to
    `--max-num-seqs` sequences and queues the rest inside the engine, where a request can no longer
    move to an engine that frees up first; holding the surplus here lets an engine that drew
    short responses take more, so the engine that draws the long tails does not hold up the step
    with work queued behind them (the "least-loaded worker" idea of veRL's and SGLang's routers).
    When an engine fails, its outstanding requests, and only those, go back to the front of the
    queue and run on another engine or on it once restarted; each prompt keeps its seed, so the
    results do not depend on where or how often a request ran.

    Hung engines: vLLM's `/health` is answered by its API server process, which keeps answering
    200 while the engine core (the process that computes) is stopped or stuck, so liveness is
    judged by progress instead. An engine that holds requests and completes none of them for
    `stall_timeout_s` (counted from its last completed request, or from when it took its first
    request) is declared hung: its outstanding requests go back to the front of the queue at once
    (the other engines take them), and it is killed (its whole process group; for a remote engine
    its srun step) and restarted like an engine that died. The log names the engine, its node and
    what the other engines completed meanwhile. None: no stall check.

    Lost engines: an engine that fails `max_restarts + 1` times in a row (its node is gone: srun
    cannot start a step there; its GPU is broken) is dropped, not fatal: its requests go to the
    others, it is left out of dispatch and weight syncs from then on (`live_engines`), and the
    fleet runs degraded (`lost` names each dropped engine and why; the controller warns every
    step). Only when no engine is left does the fleet raise `AllEnginesLost` (the trainer then
    checkpoints and requeues the job).
    """

    def __init__(self, engines: list[EngineProcess], weights_dir: str | Path, max_restarts: int = 2,
                 max_requests_per_engine: int = MAX_IN_FLIGHT_PER_ENGINE, stall_timeout_s: float | None = None):
        if not engines:
            raise ValueError("a rollout fleet needs at least one engine")
        if max_requests_per_engine < 1:
            raise ValueError(f"max_requests_per_engine must be >= 1, got {max_requests_per_engine}")
        self.engines = engines
        self.weights_dir = Path(weights_dir)
        self.max_restarts = max_restarts
        self.max_requests_per_engine = max_requests_per_engine
        if stall_timeout_s is not None and stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be > 0 or None, got {stall_timeout_s}")
        self.stall_timeout_s = stall_timeout_s
        self.restarts = 0
        self.hung = 0
        """Engines declared hung (no completed request for `stall_timeout_s`), over the fleet's life."""
        self.last_dispatch: DispatchRecord | None = None
        self._failures = [0] * len(engines)
        self.lost: dict[str, str] = {}
        """Engines dropped after their restarts failed: name -> why (the last error's first line)."""
        # Busy time per engine (seconds with at least one outstanding request), for
        # perf/engine_idle_fraction; read by another thread while a generate call runs.
        self._busy_lock = threading.Lock()
        self._busy_total = [0.0] * len(engines)
        self._busy_since: list[float | None] = [None] * len(engines)

    @property
    def live_engines(self) -> list[EngineProcess]:
        """The engines not dropped (`lost`): those dispatch and the weight syncs use."""
        return [e for e in self.engines if e.name not in self.lost]

    def _drop(self, engine: EngineProcess, failures: int, error: Exception) -> None:
        """Leave `engine` out from now on, or raise AllEnginesLost if it was the last one (it is
        counted in `lost` too: the run's fault totals count every engine it lost)."""
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or ["?"]
        # the error's first line, and its last (a start's error ends with the log's tail: srun's cause)
        why = f"{failures} failed start(s) in a row (rollout.max_restarts={self.max_restarts}): " + \
            (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")
        if len(self.live_engines) <= 1:
            earlier = "".join(f"\n{name} was dropped earlier: {why}" for name, why in self.lost.items())
            self.lost[engine.name] = why
            raise AllEnginesLost(f"every rollout engine is lost: {self._give_up(engine, failures, error)}{earlier}")
        self.lost[engine.name] = why
        node = engine.spec.node or "this machine"
        log.warning("%s on %s dropped after %s; the run goes on with %d of %d engines (log %s)", engine.name, node,
                    why, len(self.live_engines), len(self.engines), engine.log_path)
        try:
            engine.stop()
        except Exception as exc:  # noqa: BLE001 - its node may be gone; nothing more to do for it
            log.warning("%s: stopping it failed too: %s", engine.name, exc)

    def start(self) -> None:
        with ThreadPoolExecutor(max_workers=len(self.engines)) as pool:
            list(pool.map(lambda e: e.start(self.weights_dir), self.engines))

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()

    def freeze(self) -> None:
        """The local CPU engines stop using CPU until `thaw` (the learner trains meanwhile)."""
        for engine in self.engines:
            engine.freeze()

    def thaw(self) -> None:
        for engine in self.engines:
            engine.thaw()

    def busy_seconds(self) -> list[float]:
        """Cumulative seconds each engine had at least one request outstanding (ongoing included)."""
        now = time.monotonic()
        with self._busy_lock:
            return [total + (now - since if since is not None else 0.0)
                    for total, since in zip(self._busy_total, self._busy_since)]

    def _set_busy(self, index: int, busy: bool) -> None:
        now = time.monotonic()
        with self._busy_lock:
            since = self._busy_since[index]
            if busy and since is None:
                self._busy_since[index] = now
            elif not busy and since is not None:
                self._busy_total[index] += now - since
                self._busy_since[index] = None

    def _restart(self, engine: EngineProcess, error: Exception) -> None:
        self.restarts += 1
        log.warning("%s failed (%s); restarting it from %s", engine.name, error, self.weights_dir)
        engine.stop()
        engine.start(self.weights_dir)

    def _give_up(self, engine: EngineProcess, failures: int, error: Exception) -> EngineError:
        times = f"{failures} time{'s' if failures > 1 else ''}"
        return EngineError(f"{engine.name} failed {times} in a row; giving up "
                           f"(rollout.max_restarts={self.max_restarts}). Last error: {error}\n"
                           f"log {engine.log_path}:\n{engine.log_tail()}")

    def _on_engine(self, engine: EngineProcess, work):
        """Run `work(client)`; if the engine dies, restart it and retry, `max_restarts` times."""
        for attempt in range(self.max_restarts + 1):
            try:
                if not engine.alive():
                    raise EngineError(f"{engine.name} is not running (exit code "
                                      f"{engine.process.returncode if engine.process else None})")
                return work(engine.client)
            except EngineRequestError:
                raise
            except EngineError as exc:
                if attempt == self.max_restarts:
                    raise self._give_up(engine, attempt + 1, exc) from exc
                self._restart(engine, exc)

    def generate(self, prompts: list[list[int]], settings: SamplingSettings | list[SamplingSettings],
                 seeds: list[int]) -> list[list[Completion]]:
        """`n` completions per prompt; prompt i is sampled with seed `seeds[i]` and
        `settings` (or `settings[i]` when a list is given: per-prompt limits, e.g. benchmarks).

        Requests are dispatched to the least-loaded live engine (see the class docstring). An
        engine that fails is restarted in the background (up to `max_restarts` times in a row; a
        completed request resets its count) while the others go on; only its outstanding requests
        are retried. `last_dispatch` records where every request ran.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        per_prompt = list(settings) if isinstance(settings, (list, tuple)) else [settings] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling settings")
        dispatch = Dispatch(self, prompts, per_prompt, seeds)
        self.last_dispatch = dispatch.record
        return dispatch.run()

    def load_weights(self, weights_dir: str | Path, engines: list[EngineProcess] | None = None) -> None:
        """Every live engine (or those given) reloads its weights from `weights_dir` (in place); one
        that cannot be brought back is dropped (AllEnginesLost when none is left)."""
        self.weights_dir = Path(weights_dir)
        self.each(lambda c: c.load_weights(self.weights_dir), engines)

    def sleep(self, level: int = 1) -> None:
        """Every live engine goes to sleep (colocated, while the learner trains: vLLM's sleep mode
        frees its GPU memory; justrl.rollout.phases)."""
        self.each(lambda c: c.sleep(level))

    def wake(self, tags: tuple[str, ...] = ()) -> None:
        """Every live engine wakes `tags` ("weights", "kv_cache"; none: all). An engine that fails
        to wake, or died asleep, is restarted from `weights_dir` (it comes up awake, serving the
        version the next push replaces) and the wake is retried on it (harmless on an awake one)."""
        self.each(lambda c: c.wake_up(tags))

    def each(self, work, engines: list[EngineProcess] | None = None) -> None:
        """`work(client)` on every live engine (or those given) at once, each restarted and retried
        as `_on_engine` does; one that cannot be brought back is dropped (AllEnginesLost when none
        is left). A refused request (HTTP 4xx) is raised."""
        targets = self.live_engines if engines is None else engines

        def run(engine: EngineProcess) -> EngineError | None:
            try:
                self._on_engine(engine, work)
            except EngineRequestError:
                raise
            except EngineError as exc:
                return exc
            return None

        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            errors = list(pool.map(run, targets))
        for engine, error in zip(targets, errors):
            if error is not None:
                self._drop(engine, self.max_restarts + 1, error)
