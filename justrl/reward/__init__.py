"""Rewards: the recipe's verifiers and the DAPO overlong penalty.

Public API, for scripts:

    from justrl.reward import score, overlong_penalty
    score("... so the answer is \\boxed{42}", "42")               # 1.0  (recipe's strict `dapo`)
    score("... \\boxed{\\frac{1}{2}}", "0.5", verifier="lenient")  # 1.0  (veRL's math-verify reward)
    overlong_penalty(14000, max_length=15360, buffer=4096, factor=1.0)  # -0.668...

For thousands of responses per step, `ScorerPool` scores them in worker processes with a
per-response timeout (see justrl/reward/pool.py).
"""
from __future__ import annotations

import atexit
import threading

from justrl.reward.lenient import in_main_thread
from justrl.reward.pool import ScorerPool, ScoreStats
from justrl.reward.verifiers import SCORER_NAMES, VERIFIERS, scorer

# The limit on one `score` call that runs in a worker process (see `score`): far above what
# math-verify's own limits allow a call (5 s per parse, 5 s per comparison), so it only ends calls
# those limits did not stop, and the worker's start (sympy's import) does not count against it.
WORKER_TIMEOUT_S = 60.0
_worker_pools: dict[str, ScorerPool] = {}
_worker_lock = threading.Lock()


def _score_in_worker(verifier: str, response: str, ground_truth: str, timeout_s: float) -> float:
    # One single-worker pool per verifier, started on first use and shared by the calling threads
    # one call at a time; a call that overruns is killed with its worker and scores -1.
    with _worker_lock:
        pool = _worker_pools.get(verifier)
        if pool is None:
            pool = _worker_pools[verifier] = ScorerPool(verifier, num_workers=1, timeout_s=timeout_s)
        pool.timeout_s = timeout_s
        (value,), _ = pool.score([response], [ground_truth])
        return value


@atexit.register
def _close_worker_pools() -> None:
    for pool in _worker_pools.values():
        pool.close()
    _worker_pools.clear()


def score(response: str, ground_truth: str, verifier: str = "dapo", timeout_s: float | None = None) -> float:
    """Reward of one response: +1.0 if `verifier` accepts its final answer, else -1.0.

    `verifier` is "dapo" (the recipe: exact match of the last \\boxed{} in the last 100
    characters) or "lenient" (veRL's math-verify reward, justrl/reward/lenient.py).

    A call never hangs. "dapo" is string work. "lenient" runs in this process when called from the
    main thread, bounded by math-verify's own signal-based limits (5 s per parse and per
    comparison, as in veRL); from any other thread, or when `timeout_s` is given, it runs in a
    worker process that is killed after `timeout_s` seconds (default WORKER_TIMEOUT_S; the
    response then scores -1). For batches use ScorerPool.
    """
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; choose one of {sorted(VERIFIERS)}")
    if not isinstance(response, str) or not isinstance(ground_truth, str):
        raise TypeError(f"response and ground_truth must be str, got {type(response).__name__} "
                        f"and {type(ground_truth).__name__}")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if verifier == "dapo" or (timeout_s is None and in_main_thread()):
        return VERIFIERS[verifier](response, ground_truth)
    return _score_in_worker(verifier, response, ground_truth, timeout_s or WORKER_TIMEOUT_S)


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float) -> float:
    """DAPO's soft overlong punishment, added to the reward in the length_penalty ablation.

    0 up to `max_length - buffer` tokens, then falling linearly to `-factor` at `max_length`
    (and beyond, for lengths past it): min(0, -(length - (max_length - buffer)) / buffer * factor).
    """
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length={max_length}], got {buffer}")
    exceed = length - (max_length - buffer)
    return min(-exceed / buffer * factor, 0.0)


__all__ = ["score", "overlong_penalty", "ScorerPool", "ScoreStats", "VERIFIERS", "SCORER_NAMES", "scorer"]
