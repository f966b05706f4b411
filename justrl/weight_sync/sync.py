"""Weight sync: the one owner of "the engines serve the learner's weights".

After every training step the trainer calls `WeightSync.sync(step)` on every learner rank. It:

1. **names and writes** the version: `<run>/weights/step_<N>/`, an HF directory (safetensors in
   `rollout.dtype`, config, tokenizer) written by the learner's `export_hf` (every rank joins: the
   Megatron learner gathers its tensor-parallel shards). This directory is also **the version
   restarts use**: `RolloutFleet.weights_dir` points at it, and an engine that is restarted (or a
   run that resumes) starts from it;
2. **moves the weights into the engines** with the transport chosen by `rollout.weight_sync`:
   - `files` (portable, the default): every engine reloads the directory in place
     (vLLM's `collective_rpc reload_weights`, then `reset_prefix_cache`): the engines read it from
     the filesystem every engine sees;
   - `ipc` (the colocated default on a GPU cluster, justrl/weight_sync/ipc.py): vLLM's CUDA-IPC
     weight transfer: every learner rank hands the engine worker on its own GPU handles to its
     copy of the weights, which the worker copies in place. Written against vLLM's source,
     **not run here: no GPU** (on the emulated cluster it is the files transport);
   - `nccl` (GPU clusters, disaggregated): vLLM's NCCL weight transfer (vLLM 0.32's RL routes
     `/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`,
     `/finish_weight_update`; engines started with `--weight-transfer-config {"backend":"nccl"}`):
     learner rank 0 broadcasts the HF-named tensors over one NCCL group that holds it and every
     engine's workers, so no engine reads the filesystem. The files are still written (restarts
     and resumes need them); see README for what this saves. Written against vLLM's source
     (vllm/distributed/weight_transfer/nccl_engine.py), **not run here: no GPU**;
3. **checks** that each engine serves the learner's weights: the per-token log-probs of a fixed
   probe text, from each engine (`/v1/completions` with `prompt_logprobs`, `max_tokens=1`) and
   from the learner (its own forward), must agree within a dtype tolerance (mean absolute
   difference per token). A mismatch stops the run with `WeightSyncError` naming the engine. vLLM
   has shipped `reload_weights` regressions that left stale weights in place; this is what
   catches them. The check is only as sensitive as the tolerance: a version that moves the
   probe's log-probs by less than the tolerance (a single step at lr 1e-6 in bf16) passes either
   way, so the check catches engines that missed several updates, reloaded the wrong
   directory, or serve garbage;
4. **retires** old versions: only the newest `keep` version directories stay (never the one the
   engines serve, never the initial model).

Pure control logic; torch and requests only where the weights or the engines are touched.
"""
from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from justrl.weight_sync.base import EnginePushError, WeightSyncError
from justrl.weight_sync.files import FileTransport
from justrl.weight_sync.registry import make_transport
from justrl.weight_sync.probe import (DEFAULT_TOLERANCE, PROBE_TEXT, compare_probe, engine_probe_logprobs,
                                      learner_probe_logprobs)

log = logging.getLogger(__name__)


def version_dir(root: Path, step: int) -> Path:
    from justrl.checkpoint import step_dir_name

    return Path(root) / step_dir_name(step)


def learner_hf_state(learner, dtype: str, every_rank: bool = False) -> dict[str, torch.Tensor] | None:
    """HF-named weights in `dtype` on rank 0 (None elsewhere), or, with `every_rank`, the whole
    model on every rank on its own device (the ipc transport); every rank must call."""
    target = getattr(torch, dtype)
    if hasattr(learner, "gather_hf_state"):  # Megatron: a TP gather, every rank joins
        state = learner.hf_state_on_every_rank() if every_rank else learner.gather_hf_state()
        return None if state is None else {k: v.to(target) for k, v in state.items()}
    if getattr(learner, "rank", 0) != 0 and not every_rank:
        return None
    return {k: v.detach().to(target) for k, v in learner.model.state_dict().items()}


class WeightSync:
    """Owns the weight versions of a run and the engines' copy of them (see the module docstring).

    Call `sync(step)` on every learner rank; `fleet` is the rollout fleet on rank 0, None elsewhere,
    given when the sync is built (the fleet need not have started).
    """

    def __init__(self, root: str | Path, learner, tokenizer, dtype: str, fleet=None, transport: str = "files",
                 keep: int = 1, check: bool = True, tolerance: float | None = None, rank: int = 0):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.learner, self.tokenizer, self.dtype = learner, tokenizer, dtype
        self.fleet, self.rank = fleet, rank
        self.transport = make_transport(transport)
        self.keep, self.check = keep, check
        self.tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
        self.probe_ids = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
        self.last_probe_diff: dict[str, float] = {}
        self.served_step = 0
        """The training step whose weights the engines serve (0: the initial model); set here
        only, once a push is done (what the controller reports as rollout/weights_step)."""

    def export(self, step: int) -> Path | None:
        """Write version `step` (every rank; rank 0 gets the path)."""
        out = version_dir(self.root, step) if self.rank == 0 else None
        return self.learner.export_hf(out, self.tokenizer, self.dtype)

    def resume_from(self, step: int) -> Path | None:
        """A resumed run: write the checkpoint's version `step`, the one the engines start from
        (every rank, before the engines start; rank 0 gets the path)."""
        path = self.export(step)
        self.served_step = step
        return path

    def sync(self, step: int, before_push=None, after_push=None) -> dict[str, float]:
        """Write version `step`, move it into every engine, check, retire old versions.

        `before_push` (every rank): called after the export and before the engines are touched,
        e.g. to wait for a rollout still generating with the previous weights
        (rollout.max_policy_lag=1), or to wake sleeping engines (justrl.rollout.phases);
        `after_push` (every rank): after the push, before the check.
        Returns timing metrics (rank 0; empty elsewhere). Raises WeightSyncError on a mismatch."""
        t0 = time.perf_counter()
        path = self.export(step)
        state = (learner_hf_state(self.learner, self.dtype, self.transport.every_rank)
                 if self.transport.uses_learner_state else None)
        # The learner's side of the check, before the engines are touched (the trainer keeps this
        # machine's CPU engines frozen until `before_push`; see justrl.trainer).
        reference = learner_probe_logprobs(self.learner, self.probe_ids) if self.check else None
        t1 = time.perf_counter()
        if before_push is not None:
            before_push()
        t2 = time.perf_counter()
        if self.rank == 0:
            try:
                self.transport.push(self.fleet, path, step, state)
            except EnginePushError as exc:
                self._recover(exc, path, step)
            self.fleet.weights_dir = Path(path)
        elif self.transport.every_rank:  # the ipc transport: every rank hands over its own GPU's copy
            self.transport.push(None, path, step, state)
        del state
        self.served_step = step
        if after_push is not None:
            after_push()
        t3 = time.perf_counter()
        if self.check:
            self.verify(step, reference)
        t4 = time.perf_counter()
        if self.rank == 0:
            self.retire()
            return {"perf/time_sync_export": t1 - t0, "perf/time_sync_load": t3 - t2, "perf/time_sync_check": t4 - t3}
        return {}

    def _recover(self, exc: "EnginePushError", path: Path, step: int) -> None:
        """After a failed NCCL or IPC push: the named engines are stopped (their state is unknown) and
        every engine loads the export through the files transport; the fleet restarts the stopped
        ones from it (RolloutFleet._on_engine), which also makes the next push rebuild the group.
        The check that follows proves every engine serves the step."""
        log.warning("%s; restarting %s and loading %s through the files transport", exc, exc.engines, path)
        for engine in self.fleet.live_engines:
            if engine.name in exc.engines:
                engine.stop()
        FileTransport().push(self.fleet, path, step)

    def verify(self, step: int | None = None, reference: list[float] | None = None) -> None:
        """Every engine's probe log-probs against the learner's (`reference`, computed here when
        None; every rank calls; rank 0 asks the engines). Raises WeightSyncError naming the first
        engine off by more than the tolerance."""
        if reference is None:
            reference = learner_probe_logprobs(self.learner, self.probe_ids)
        if self.rank != 0:
            return
        engines = self.fleet.live_engines
        with ThreadPoolExecutor(max_workers=len(engines)) as pool:
            served = list(pool.map(lambda e: engine_probe_logprobs(e.client, self.probe_ids), engines))
        self.last_probe_diff = {e.name: compare_probe(lp, reference) for e, lp in zip(engines, served)}
        for engine in engines:
            diff = self.last_probe_diff[engine.name]
            if not diff <= self.tolerance:
                raise WeightSyncError(
                    f"{engine.name} does not serve the learner's weights after the sync of step {step} "
                    f"(rollout.weight_sync={self.transport.name}, from {self.fleet.weights_dir}): the mean "
                    f"|log-prob difference| on the {len(reference)}-token probe is {diff:.3g} > tolerance "
                    f"{self.tolerance:g} (rollout.weight_check_tol, rollout.dtype={self.dtype}); "
                    f"log {engine.log_path}")

    def retire(self) -> None:
        """Delete version directories beyond the newest `keep` (never the one the engines serve)."""
        serving = self.fleet.weights_dir.resolve() if self.fleet is not None else None
        versions = []
        for path in self.root.glob("step_*"):
            suffix = path.name[len("step_"):]
            if suffix.isdigit():  # not step_N.tmp (an export in progress)
                versions.append((int(suffix), path))
        versions.sort()
        for _, path in versions[:-self.keep]:
            if path.resolve() != serving:
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        if self.rank == 0 and self.fleet is not None:
            self.transport.close(self.fleet)
