"""One `RolloutFleet.generate` call: the requests of a step (or a validation set) dispatched to the
fleet's engines, with the engines that fail restarted and those that hang declared so.

The dispatcher runs on the caller's thread and owns all of the call's state; worker threads only
make the HTTP requests (and restarts) and post what happened to `messages`:

    ("done", engine, request, (life, completions))    a request completed
    ("error", engine, request, (life, exception))     a request failed
    ("restarted", engine, None, None)                 a restart is done
    ("restart_failed", engine, None, exception)       a restart failed

`life` is the engine's life when the request was sent (bumped each time the engine is marked
failed): a message from an earlier life is ignored, its request having gone back to the queue then.
See justrl.rollout.fleet.RolloutFleet for the dispatch rule, the stall rule and what is dropped.
"""
from __future__ import annotations

import logging
import queue
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from justrl.rollout.client import Completion, EngineError, EngineRequestError, SamplingSettings

log = logging.getLogger("justrl.rollout.fleet")  # the fleet's log: this is its dispatch


@dataclass
class DispatchRecord:
    """Where the requests of one `generate` call ran (request i = prompt i)."""

    attempts: list[list[str]]
    """Engines request i was sent to, in order (more than one: it was retried)."""
    engine_of: list[str | None]
    """The engine whose answer was kept."""
    retried: list[int]
    """Request indices sent back to the queue because their engine failed (with repeats)."""
    failures: list[str]
    """Engine names, once per failure seen (each one restarted)."""
    hung: list[str] = field(default_factory=list)
    """Engine names, once per time one was declared hung (also in `failures`)."""


@dataclass
class EngineSlot:
    """One engine's part of a dispatch."""

    outstanding: set[int] = field(default_factory=set)
    """Requests sent to it and not answered."""
    restarting: bool = False
    life: int = 0
    """Bumped when it is marked failed: answers from an earlier life are ignored."""
    progress_at: float = field(default_factory=time.monotonic)
    """When it last completed a request, or took one while holding none (the stall clock)."""
    completed: int = 0


class Dispatch:
    """The state of one `generate` call, and the loop that runs it (`run`)."""

    def __init__(self, fleet, prompts: list[list[int]], settings: list[SamplingSettings], seeds: list[int]):
        self.fleet, self.engines = fleet, fleet.engines
        self.prompts, self.settings, self.seeds = prompts, settings, seeds
        self.cap = fleet.max_requests_per_engine
        self.results: list[list[Completion] | None] = [None] * len(prompts)
        self.record = DispatchRecord([[] for _ in prompts], [None] * len(prompts), [], [])
        self.waiting = deque(range(len(prompts)))
        self.slots = [EngineSlot() for _ in self.engines]
        self.failures = fleet._failures  # in a row, across calls: a completed request resets it
        self.messages: queue.Queue = queue.Queue()
        self.remaining = len(prompts)
        stall = fleet.stall_timeout_s
        self.poll_s = None if stall is None else min(1.0, stall / 4)
        self.pool = ThreadPoolExecutor(max_workers=self.cap * len(self.engines) + len(self.engines),
                                       thread_name_prefix="justrl-rollout")

    # -- worker threads ----------------------------------------------------------------------------
    def _request(self, e: int, i: int, life: int) -> None:
        try:
            answer = self.engines[e].client.complete(self.prompts[i], self.settings[i], self.seeds[i])
            self.messages.put(("done", e, i, (life, answer)))
        except BaseException as exc:  # noqa: BLE001 - handed to the dispatcher thread
            self.messages.put(("error", e, i, (life, exc)))

    def _restart(self, e: int, error: Exception) -> None:
        try:
            self.fleet._restart(self.engines[e], error)
            self.messages.put(("restarted", e, None, None))
        except BaseException as exc:  # noqa: BLE001
            self.messages.put(("restart_failed", e, None, exc))

    # -- the dispatcher ----------------------------------------------------------------------------
    def run(self) -> list[list[Completion]]:
        try:
            while self.remaining:
                self.send_waiting()
                self.receive()
                self.declare_hung()
        finally:
            for e in range(len(self.engines)):
                self.fleet._set_busy(e, False)
            # On an error, do not wait for requests still running on other engines.
            self.pool.shutdown(wait=not self.remaining, cancel_futures=True)
        self.count_unfinished_restarts()
        return self.results

    def usable(self, e: int) -> bool:
        return not self.slots[e].restarting and self.engines[e].name not in self.fleet.lost

    def send_waiting(self) -> None:
        """Send waiting requests, each to the live engine with the fewest outstanding, while one has room."""
        while self.waiting:
            for e, engine in enumerate(self.engines):
                if self.usable(e) and not engine.alive():
                    self.engine_failed(e, EngineError(
                        f"{engine.name} is not running (exit code "
                        f"{engine.process.returncode if engine.process else None})"))
            room = [e for e in range(len(self.engines)) if self.usable(e) and len(self.slots[e].outstanding) < self.cap]
            if not room:
                return
            e = min(room, key=lambda e: (len(self.slots[e].outstanding), e))
            i, slot = self.waiting.popleft(), self.slots[e]
            if not slot.outstanding:
                slot.progress_at = time.monotonic()
            slot.outstanding.add(i)
            self.record.attempts[i].append(self.engines[e].name)
            self.fleet._set_busy(e, True)
            self.pool.submit(self._request, e, i, slot.life)

    def receive(self) -> None:
        """Apply the next message of the workers (waiting at most `poll_s` for one)."""
        try:
            kind, e, i, payload = self.messages.get(timeout=self.poll_s)
        except queue.Empty:
            return
        slot = self.slots[e]
        if kind in ("done", "error") and payload[0] != slot.life:
            return  # from before the engine was marked failed: the request went back to the queue then
        if kind == "done":
            slot.outstanding.discard(i)
            self.results[i] = payload[1]
            self.record.engine_of[i] = self.engines[e].name
            self.failures[e] = 0
            slot.completed += 1
            slot.progress_at = time.monotonic()
            self.remaining -= 1
        elif kind == "error":
            error = payload[1]
            if isinstance(error, EngineRequestError) or not isinstance(error, EngineError):
                raise error
            self.engine_failed(e, error)
        elif kind == "restarted":
            slot.restarting = False
        else:  # restart_failed: the start itself failed; count it and try again
            if isinstance(payload, EngineRequestError) or not isinstance(payload, EngineError):
                raise payload
            slot.restarting = False
            self.engine_failed(e, payload)
        if not slot.outstanding:
            self.fleet._set_busy(e, False)

    def engine_failed(self, e: int, error: Exception) -> None:
        """Mark engine e down (once per failure), send its outstanding requests back to the front of
        the queue, and restart it, or give up on it."""
        slot = self.slots[e]
        if slot.restarting:
            return
        self.failures[e] += 1
        slot.life += 1
        self.record.failures.append(self.engines[e].name)
        for i in sorted(slot.outstanding, reverse=True):
            self.record.retried.append(i)
            self.waiting.appendleft(i)
        slot.outstanding.clear()
        if self.failures[e] > self.fleet.max_restarts:
            self.fleet._drop(self.engines[e], self.failures[e], error)  # raises AllEnginesLost if it was the last
            return
        slot.restarting = True
        self.pool.submit(self._restart, e, error)

    def declare_hung(self) -> None:
        """Engines that hold requests and have completed none for `stall_timeout_s` are failed."""
        stall = self.fleet.stall_timeout_s
        if stall is None:
            return
        now = time.monotonic()
        for h, slot in enumerate(self.slots):
            if slot.outstanding and self.usable(h) and now - slot.progress_at > stall:
                error = self.hung_error(h, time.monotonic() - slot.progress_at)
                log.warning("%s", error)
                self.fleet.hung += 1
                self.record.hung.append(self.engines[h].name)
                self.engine_failed(h, error)
                self.fleet._set_busy(h, False)

    def hung_error(self, h: int, idle_s: float) -> EngineError:
        engine, held = self.engines[h], len(self.slots[h].outstanding)
        others = [f"{self.engines[o].name} completed {slot.completed} this step"
                  for o, slot in enumerate(self.slots) if o != h]
        return EngineError(f"{engine.name} on {engine.spec.node or 'this machine'} is hung: it holds {held} "
                           f"request(s) and completed none for {idle_s:.0f} s (rollout.stall_timeout_s="
                           f"{self.fleet.stall_timeout_s:g}; {', '.join(others) or 'it is the only engine'}); "
                           f"its requests go to the other engines, and it is killed and restarted")

    def count_unfinished_restarts(self) -> None:
        """The call ended while an engine was restarting: a restart that failed counts now, so that
        an engine that cannot come back (its node is gone) is dropped within the step it failed."""
        while not self.messages.empty():
            kind, e, _, payload = self.messages.get()
            if kind == "restart_failed" and self.engines[e].name not in self.fleet.lost:
                self.failures[e] += 1
                self.record.failures.append(self.engines[e].name)
                if self.failures[e] > self.fleet.max_restarts and len(self.fleet.live_engines) > 1:
                    self.fleet._drop(self.engines[e], self.failures[e], payload)
