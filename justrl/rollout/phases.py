"""What the rollout engines do while the learner updates: the one owner of the order of a step's
sleep, wake, freeze and thaw calls.

    colocated (cluster.placement)     generate | sleep(1) freeze | train, export | empty cache, barrier,
                                      thaw, wake(weights) | push | wake(kv_cache) | check
    disaggregated, on-policy          generate | freeze          | train, export | thaw | push | check
    disaggregated, lag 1 (overlap)    the engines generate the next batch while the learner trains:
                                      nothing is put to rest

- sleep(1) (`POST /sleep?level=1`): vLLM's sleep mode offloads the engine's weights to host
  memory and frees its KV cache (gpu_worker.sleep, through the cumem allocator that
  `--enable-sleep-mode` turns on), so the learner rank on the same GPU trains in that memory.
  vLLM's CPU build takes the call and does nothing (CPUWorker.sleep logs "sleep mode is not
  supported on CPU"; its `--enable-sleep-mode` is refused, so justrl.rollout.launch drops it there):
  on a CPU the order and the errors are real, the memory release is not.
- wake(weights) before the push, wake(kv_cache) after it: the weights are resident for the reload
  while the KV cache (most of the engine's memory) is not yet, the order of veRL's sharding
  manager (verl/workers/sharding_manager/fsdp_vllm.py: wake_up(tags=["weights"]), update,
  empty_cache, wake_up(tags=["kv_cache"]); sleep(level=1) and empty_cache on the way out).
  Unlike veRL, whose actor and rollout live in one process, the learner rank and the engine are
  separate processes here, so every learner rank returns its cached blocks to the driver
  (`torch.cuda.empty_cache`) and waits for the others before any engine wakes.
- freeze/thaw (SIGSTOP/SIGCONT): only this machine's CPU engines (justrl.rollout.engine.EngineProcess.
  freeze: a CPU engine's idle worker spins and takes the learner's cores); a no-op elsewhere.

A failed call (an engine that dies asleep, or does not wake) restarts that engine as a failed
request does (justrl.rollout.fleet.RolloutFleet.wake): it comes back awake with the version it served,
and the push that follows replaces it. The learner's own failure ends the step as always.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

SLEEP_LEVEL = 1


class EnginePhases:
    """The engines' side of a step around the learner's update (see the module docstring).

    Call `rest`, `wake_for_weights` and `wake_for_rollouts` on every learner rank, in that order,
    once a step; only rank 0 (`fleet` set) talks to the engines. `barrier`: every learner rank's
    (the control-plane group's) barrier."""

    def __init__(self, fleet, colocated: bool, barrier=lambda: None):
        self.fleet, self.colocated, self.barrier = fleet, colocated, barrier
        self.resting = False

    def rest(self, generating: bool = False) -> None:
        """After the step's rollouts, before the update. `generating`: the next step's batch is
        being generated meanwhile (rollout.max_policy_lag=1): the engines stay as they are."""
        self.resting = not generating
        if self.fleet is None or generating:
            return
        if self.colocated:
            self.fleet.sleep(SLEEP_LEVEL)
        self.fleet.freeze()

    def wake_for_weights(self) -> None:
        """After the learner's export, before the push: the engines' weights resident again."""
        if self.colocated:  # (colocated is always on-policy: every rank rests, every rank meets here)
            release_learner_cache()
            self.barrier()  # no engine wakes on a GPU whose learner rank still holds its cache
        if self.resting and self.fleet is not None:
            self.fleet.thaw()
            if self.colocated:
                self.fleet.wake(("weights",))

    def wake_for_rollouts(self) -> None:
        """After the push, before the check and the next rollouts: the KV cache back."""
        if self.resting and self.colocated and self.fleet is not None:
            self.fleet.wake(("kv_cache",))
        self.resting = False

    def abort(self) -> None:
        """The step failed: leave no engine of this machine stopped (the run is ending)."""
        if self.fleet is not None:
            self.fleet.thaw()


def release_learner_cache() -> None:
    """Return the blocks torch's caching allocator holds (the update's activations) to the driver,
    so that the engine on this GPU can take them back; nothing on a CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
