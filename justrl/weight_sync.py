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
   - `nccl` (GPU clusters): vLLM's NCCL weight transfer (vLLM 0.32's RL routes
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
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

log = logging.getLogger(__name__)

TRANSPORTS = ("files", "nccl")
# A fixed probe: ordinary math text, so its log-probs are in the model's usual range (a random
# token string has extreme log-probs, where a bf16 rounding moves them most).
PROBE_TEXT = ("Let x be a positive integer such that x^2 + 3x = 40. Then (x + 8)(x - 5) = 0, "
              "so x = 5 and the answer is \\boxed{5}.")
# Mean |log p_engine - log p_learner| per probe token allowed, by the engines' weights dtype. float32:
# both sides compute in float32 (only kernel order differs). bf16/fp16: the engine's weights are
# rounded copies and both sides compute in half precision, which moves a log-prob by ~1e-2.
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 2e-2}


class WeightSyncError(RuntimeError):
    """An engine does not serve the learner's weights after a sync."""


def version_dir(root: Path, step: int) -> Path:
    from justrl.checkpoint import step_dir_name

    return Path(root) / step_dir_name(step)


# -- the learner's side of the check -----------------------------------------------------------------

def learner_probe_logprobs(learner, token_ids: list[int]) -> list[float]:
    """Log-probs of tokens 1.. of `token_ids` under the learner's current weights, at temperature 1
    (what vLLM's prompt log-probs are). Every learner rank must call (a Megatron forward is a
    tensor-parallel collective); every rank gets the list. Uses the learner's `forward`, as a step
    computes its old log-probs."""
    from justrl.grpo import Sequence
    from justrl.learner.packing import build_micro_batch

    micro = build_micro_batch([Sequence(tuple(token_ids[:1]), tuple(token_ids[1:]), 0.0)],
                              pad_multiple=getattr(learner, "pad_multiple", 1))
    temperature = learner.temperature
    learner.temperature = 1.0
    was_training = learner.model.training
    learner.model.eval()
    try:
        with torch.no_grad():
            logprobs = learner.forward(micro, need_entropy=False, response_only=True)[0]
    finally:
        learner.temperature = temperature
        learner.model.train(was_training)
    mask = micro.mask[0].bool()
    return logprobs[0].float().cpu()[mask].tolist()


def engine_probe_logprobs(client, token_ids: list[int]) -> list[float]:
    """The same log-probs from a vLLM server: prompt log-probs of the probe (raw model output, no
    sampling processing), one generated token that is thrown away."""
    from justrl.engines import SERVED_MODEL_NAME

    body = client._post("/v1/completions", {
        "model": SERVED_MODEL_NAME, "prompt": [list(token_ids)], "max_tokens": 1, "temperature": 0.0,
        "prompt_logprobs": 0})
    entries = body["choices"][0]["prompt_logprobs"]
    if entries is None or len(entries) != len(token_ids):
        raise WeightSyncError(f"{client.url}: asked for the prompt log-probs of {len(token_ids)} tokens, got "
                              f"{None if entries is None else len(entries)}")
    out = []
    for position, (token, entry) in enumerate(zip(token_ids[1:], entries[1:]), start=1):
        if entry is None or str(token) not in entry:
            raise WeightSyncError(f"{client.url}: no log-prob for probe token {token} at position {position}")
        out.append(float(entry[str(token)]["logprob"]))
    return out


def compare_probe(engine_lp: list[float], learner_lp: list[float]) -> float:
    """Mean absolute difference of two probe log-prob lists (inf when they cannot be compared)."""
    if len(engine_lp) != len(learner_lp) or not engine_lp:
        return math.inf
    return sum(abs(a - b) for a, b in zip(engine_lp, learner_lp)) / len(engine_lp)


# -- transports --------------------------------------------------------------------------------------

class FileTransport:
    """Today's portable sync: every engine reloads the HF directory in place."""

    name = "files"
    uses_learner_state = False

    def push(self, fleet, weights_dir: Path, step: int, state=None) -> None:
        fleet.load_weights(weights_dir)

    def close(self, fleet) -> None:
        pass


class EnginePushError(WeightSyncError):
    """An engine died, refused or stalled during an NCCL push; `engines` names the ones whose
    copy of the weights is unknown (WeightSync restarts them and reloads the files)."""

    def __init__(self, message: str, engines: list[str]):
        super().__init__(message)
        self.engines = engines


class NcclTransport:
    """vLLM's NCCL weight transfer (the dense `nccl` backend of vLLM 0.32), one group for all engines.

    Group: rank 0 is learner rank 0 (the sender); engine i's `tensor_parallel_size` workers take
    ranks `1 + offset_i ...`. vLLM's own `NCCLTrainerWeightTransferEngine` drives one client; the
    handshake below is the same one (vllm/distributed/weight_transfer/nccl_engine.py) fanned out
    to every engine: each engine's `init_weight_transfer_engine` blocks in the NCCL rendezvous, so
    they are called on threads while the sender opens its end; per sync `start_weight_update`,
    then every engine's `update_weights` (they receive) concurrently with the packed broadcast,
    then `finish_weight_update` with the step as the weight version. A restarted engine leaves the
    group broken, so the group is rebuilt before the next push whenever the fleet restarted one.

    The rendezvous address is this node's announced address (placement.announced_address: the
    GLOO/NCCL_SOCKET_IFNAME interface or the Slurm NodeAddr), never `socket.gethostname()`. The
    HTTP calls go through each engine's `EngineClient.session` (trust_env=False: no proxy).

    The push is watched: the broadcast runs on a thread while this one polls the engines'
    `update_weights` answers and processes every `poll_s`. An engine that exits or answers with an
    error, or a push past `push_timeout_s`, aborts the group (vLLM's `PyNcclCommunicator.destroy`
    is `ncclCommAbort`, device_communicators/pynccl.py ~250-262), which releases the sender's
    stream wait (packed_tensor.py ~176: `streams[i].synchronize()` has no timeout), and raises
    EnginePushError naming the engines. **The CUDA parts (`_send`, `_synchronize_stream`, the
    group) have not run here: no GPU.**
    """

    name = "nccl"
    uses_learner_state = True
    # Seconds to wait for the sender's thread after ncclCommAbort (it returns once the aborted
    # kernels end); past this the thread is left behind (a daemon) and the error raised anyway.
    ABORT_WAIT_S = 30.0

    def __init__(self, master_address: str | None = None, timeout_s: float = 600.0, push_timeout_s: float = 600.0,
                 poll_s: float = 0.5):
        from justrl.placement import announced_address

        self.master_address = master_address or announced_address()
        self.timeout_s, self.push_timeout_s, self.poll_s = timeout_s, push_timeout_s, poll_s
        self.group = None
        self._restarts_at_init = None

    def _rpc(self, engine, path: str, payload: dict | None = None) -> None:
        # The engine's own session: trust_env=False, so a cluster's http_proxy never sees node:port,
        # and it carries the engine's secret (justrl.engine_auth).
        response = engine.client.session.post(f"{engine.client.url}{path}", json=payload, timeout=self.timeout_s)
        if response.status_code != 200:
            raise WeightSyncError(f"{engine.name} {path}: HTTP {response.status_code}: {response.text[:500]}")

    def _init_group(self, fleet) -> None:
        from vllm.distributed.weight_transfer.nccl_common import (NCCLWeightTransferInitInfo, trainer_init,
                                                                   worker_init_payload)
        from justrl.placement import free_port

        self.close(fleet)
        sizes = [e.spec.tensor_parallel_size for e in fleet.live_engines]
        world = 1 + sum(sizes)
        port = free_port()
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        with ThreadPoolExecutor(max_workers=len(fleet.live_engines)) as pool:
            futures = [pool.submit(self._rpc, e, "/init_weight_transfer_engine", {"init_info": worker_init_payload(
                NCCLWeightTransferInitInfo(master_address=self.master_address, master_port=port, rank_offset=off,
                                           world_size=world, packed=True))})
                       for e, off in zip(fleet.live_engines, offsets)]
            self.group = trainer_init({"master_address": self.master_address, "master_port": port,
                                       "world_size": world}, rank=0)
            for f in futures:
                f.result()
        self._restarts_at_init = (fleet.restarts, len(fleet.lost))  # a restart or a drop rebuilds the group
        log.info("NCCL weight transfer group: learner rank 0 + %d engine workers (%s:%d)", world - 1,
                 self.master_address, port)

    def _synchronize_stream(self) -> None:
        """The weights were cast (`_learner_hf_state`, a Megatron gather) on the current stream;
        vLLM's producer packs them on its own streams (packed_tensor.py ~180), which do not wait
        for the current one: without this the broadcast can read half-cast tensors."""
        torch.cuda.current_stream().synchronize()

    def _send(self, state: dict[str, torch.Tensor], names: list[str]) -> None:
        """The broadcast (learner rank 0 is NCCL rank 0)."""
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        device = torch.device("cuda", torch.cuda.current_device())
        packed_nccl_broadcast_producer(iterator=((n, state[n].to(device).contiguous()) for n in names),
                                       group=self.group, src=0, post_iter_func=lambda item: item[1])

    def _check_alive(self, fleet, when: str) -> None:
        dead = [e for e in fleet.live_engines if not e.alive()]
        if dead:
            raise EnginePushError(f"NCCL weight push {when}: {', '.join(e.name for e in dead)} not running "
                                  f"(exit code {[e.process.returncode if e.process else None for e in dead]})",
                                  [e.name for e in dead])

    def _abort(self, sending) -> None:
        group, self.group = self.group, None
        if group is not None:
            group.destroy()  # ncclCommAbort: the sender's pending kernels end, its stream wait returns
        try:
            sending.result(timeout=self.ABORT_WAIT_S)
        except Exception:  # the aborted broadcast's own error; the engine's is the one raised
            pass

    def _watch(self, fleet, receiving: dict, sending, step: int) -> None:
        """Until the broadcast and every engine's receive are done; on an engine's death, error or
        the bound: abort the group and raise EnginePushError naming the engines."""
        deadline = time.monotonic() + self.push_timeout_s
        while True:
            problems = {}
            for engine in fleet.live_engines:
                future = receiving[engine.name]
                if future.done() and future.exception() is not None:
                    problems[engine.name] = f"{engine.name} refused the update: {future.exception()}"
                elif not engine.alive():
                    problems[engine.name] = f"{engine.name} exited during the push (log {engine.log_path})"
            if sending.done() and sending.exception() is not None:
                problems.setdefault("", f"the broadcast failed: {sending.exception()}")
            pending = [name for name, f in receiving.items() if not f.done()]
            if not problems and not pending and sending.done():
                return
            if not problems and time.monotonic() > deadline:
                problems = {name: f"{name} still receiving after rollout push bound {self.push_timeout_s:.0f} s"
                            for name in pending} or {"": f"the broadcast not done after {self.push_timeout_s:.0f} s"}
            if problems:
                self._abort(sending)
                named = [n for n in problems if n] or pending
                raise EnginePushError(f"NCCL weight push of step {step} aborted (ncclCommAbort): "
                                      + "; ".join(problems.values()), sorted(set(named + pending)))
            time.sleep(self.poll_s)

    def push(self, fleet, weights_dir: Path, step: int, state=None) -> None:
        if state is None:
            raise WeightSyncError("the nccl weight sync needs the learner's weights on rank 0")
        self._check_alive(fleet, "not started")
        if self.group is None or (fleet.restarts, len(fleet.lost)) != self._restarts_at_init:
            self._init_group(fleet)
        names = list(state)
        update_info = {"names": names, "dtype_names": [str(state[n].dtype).split(".")[-1] for n in names],
                       "shapes": [list(state[n].shape) for n in names]}
        pool = ThreadPoolExecutor(max_workers=len(fleet.live_engines) + 1)
        try:
            list(pool.map(lambda e: self._rpc(e, "/start_weight_update"), fleet.live_engines))
            receiving = {e.name: pool.submit(self._rpc, e, "/update_weights", {"update_info": update_info})
                         for e in fleet.live_engines}
            self._synchronize_stream()  # before the sender reads the casted weights
            sending = pool.submit(self._send, state, names)
            self._watch(fleet, receiving, sending, step)
            list(pool.map(lambda e: self._rpc(e, "/finish_weight_update", {"weight_version": str(step)}),
                          fleet.live_engines))
            list(pool.map(lambda e: self._rpc(e, "/reset_prefix_cache"), fleet.live_engines))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a stalled engine's call must not hold us
        fleet.weights_dir = Path(weights_dir)  # what a restart loads (then the group is rebuilt)

    def close(self, fleet) -> None:
        if self.group is None:
            return
        for engine in fleet.live_engines:
            if engine.alive():
                try:
                    self._rpc(engine, "/shutdown_weight_transfer_engine")
                except (requests.RequestException, WeightSyncError) as exc:
                    log.warning("%s: shutting the weight transfer down failed: %s", engine.name, exc)
        self.group.destroy()
        self.group = None


def make_transport(name: str):
    if name == "files":
        return FileTransport()
    if name == "nccl":
        return NcclTransport()
    raise ValueError(f"rollout.weight_sync must be one of {list(TRANSPORTS)}, got {name!r}")


def engine_args_for(name: str) -> tuple[str, ...]:
    """Extra vLLM server arguments a transport needs."""
    return ("--weight-transfer-config", '{"backend": "nccl"}') if name == "nccl" else ()


def _learner_hf_state(learner, dtype: str) -> dict[str, torch.Tensor] | None:
    """HF-named weights in `dtype` on rank 0 (None elsewhere); every rank must call."""
    target = getattr(torch, dtype)
    if hasattr(learner, "gather_hf_state"):  # Megatron: a TP gather, every rank joins
        state = learner.gather_hf_state()
        return None if state is None else {k: v.to(target) for k, v in state.items()}
    if getattr(learner, "rank", 0) != 0:
        return None
    return {k: v.detach().to(target) for k, v in learner.model.state_dict().items()}


class WeightSync:
    """Owns the weight versions of a run and the engines' copy of them (see the module docstring).

    Call `sync(step)` on every learner rank; `fleet` is the rollout fleet on rank 0, None elsewhere.
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

    def export(self, step: int) -> Path | None:
        """Write version `step` (every rank; rank 0 gets the path). For a resume, before the engines start."""
        out = version_dir(self.root, step) if self.rank == 0 else None
        return self.learner.export_hf(out, self.tokenizer, self.dtype)

    def sync(self, step: int, before_push=None, after_push=None) -> dict[str, float]:
        """Write version `step`, move it into every engine, check, retire old versions.

        `before_push` (every rank): called after the export and before the engines are touched,
        e.g. to wait for a rollout still generating with the previous weights
        (rollout.max_policy_lag=1), or to wake sleeping engines (justrl.engine_phases);
        `after_push` (every rank): after the push, before the check.
        Returns timing metrics (rank 0; empty elsewhere). Raises WeightSyncError on a mismatch."""
        t0 = time.perf_counter()
        path = self.export(step)
        state = _learner_hf_state(self.learner, self.dtype) if self.transport.uses_learner_state else None
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
        """After an aborted NCCL push: the named engines are stopped (their state is unknown) and
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
