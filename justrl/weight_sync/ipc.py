"""vLLM's CUDA-IPC weight transfer, for the colocated placement: every learner rank hands the engine
worker on its own GPU handles to its copy of the new weights; the worker copies them into its
model on the GPU, with no filesystem and no network in between. Written against vLLM 0.32's
source (vllm/distributed/weight_transfer/ipc_engine.py); **its CUDA parts have not run here: no GPU.**

What vLLM's IPC engine expects, and where justrl differs from vLLM's own trainer side
(`IPCTrainerWeightTransferEngine`, which drives one engine from every trainer rank of one node):

- every learner rank holds the whole model in `rollout.dtype` on its GPU (the hf learner, and the
  Megatron learner after an all-gather over its tensor-parallel group: `hf_state_on_every_rank`);
- each rank makes one handle per tensor (`torch.multiprocessing.reductions.reduce_tensor`, whose
  second element is `rebuild_cuda_tensor`'s arguments) under its GPU's UUID, the key a vLLM worker
  looks its own GPU up by (`receive_weights`: `torch.cuda.get_device_properties(i).uuid`);
- the handles meet on learner rank 0 over the control group (gloo, `all_gather_object`, as vLLM
  gathers them over the default group); rank 0 sends each engine only the handles of the ranks on
  the engine's node (a UUID of another node could never match, and 32 nodes' worth of handles
  would be sent to every engine), as vLLM's HTTP client does: pickled into `ipc_handles_pickled`,
  which the server only unpickles with `VLLM_ALLOW_INSECURE_SERIALIZATION=1` (`engine_env`; the
  engine's secret guards the route like every other: docs/security.md);
- per engine and push: `/init_weight_transfer_engine {"packed": false}` (it only records the
  flag; sent every push so that a restarted engine needs nothing else), `/start_weight_update`,
  `/update_weights`, `/finish_weight_update` with the step as the weight version,
  `/reset_prefix_cache`. Unpacked (one handle per tensor, one update call): the learner's copy is
  alive anyway, and a packed transfer's per-chunk barriers would cost a round trip per chunk;
- every rank keeps its tensors alive until rank 0 has every engine's answer (a barrier of the
  control group), then `torch.cuda.ipc_collect()`, as vLLM's `_post_send_sync`.

Faults: an engine that is not running, dies, answers an error or is still loading at
`push_timeout_s` is stopped (before the ranks free the memory its handles point to; the other
engines are waited for, for the same reason) and named in EnginePushError; WeightSync then loads
the step's files into every engine (the fleet restarts the stopped ones from them) and the probe
check proves it. An engine that *answered* an error (the IPC transfer refused: a GPU it cannot
find among the handles, no CUDA) turns the transport into the files transport for the rest of the
run, logged once, rather than restarting engines every step. A rank that cannot make its handles
says so in the gather, and every rank raises the same error (none is left waiting for it).
vLLM's CPU build takes the init and start routes and fails the update ("Torch not compiled with
CUDA enabled"), and its engine core dies of it: that is how the fault path is tested here with a
real engine (tests/test_ipc_sync.py).
"""
from __future__ import annotations

import base64
import logging
import os
import pickle
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from justrl.weight_sync.base import (EnginePushError, Transport, WeightSyncError, post_route,
                                     shutdown_transfer_engines)
from justrl.weight_sync.files import FileTransport

log = logging.getLogger(__name__)


def this_node() -> str:
    """The Slurm node this process runs on (its hostname outside Slurm): what an engine's
    `spec.node` names."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def cuda_handle(tensor) -> tuple[str, tuple]:
    """(this GPU's UUID, `rebuild_cuda_tensor`'s arguments) for a CUDA tensor: the CUDA part."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    uuid = str(torch.cuda.get_device_properties(tensor.device.index).uuid)
    return uuid, reduce_tensor(tensor)[1]


def merge_for_nodes(contributions: list[dict]) -> dict[str, list[dict]]:
    """Every rank's contribution ({"node", "names", "uuid", "handles"}) -> per node, one dict per
    tensor mapping each of the node's GPU UUIDs to its handle (vLLM's `ipc_handles`). Raises
    WeightSyncError when two ranks disagree on the tensors or share a GPU."""
    names = contributions[0]["names"]
    per_node: dict[str, list[dict]] = {}
    seen: dict[str, int] = {}
    for rank, part in enumerate(contributions):
        if part["names"] != names:
            raise WeightSyncError(f"ipc weight sync: learner rank {rank} holds other tensors than rank 0 "
                                  f"({len(part['names'])} against {len(names)})")
        if part["uuid"] in seen:
            raise WeightSyncError(f"ipc weight sync: learner ranks {seen[part['uuid']]} and {rank} are on the same "
                                  f"GPU ({part['uuid']} on {part['node']}): one learner rank a GPU")
        seen[part["uuid"]] = rank
        merged = per_node.setdefault(part["node"], [{} for _ in names])
        for slot, handle in zip(merged, part["handles"]):
            slot[part["uuid"]] = handle
    return per_node


class IpcTransport(Transport):
    """vLLM's CUDA-IPC weight transfer from the learner rank on each engine GPU (module docstring).

    `handle_of(tensor) -> (gpu_uuid, handle)`: `cuda_handle` on a GPU; the CPU tests give a
    stand-in, which is the only part they replace."""

    name = "ipc"
    uses_learner_state = True
    every_rank = True
    engine_args = ("--weight-transfer-config", '{"backend": "ipc"}')
    engine_env = (("VLLM_ALLOW_INSECURE_SERIALIZATION", "1"),)

    def __init__(self, push_timeout_s: float = 600.0, poll_s: float = 0.5, handle_of=cuda_handle, group=None):
        self.push_timeout_s, self.poll_s, self.handle_of = push_timeout_s, poll_s, handle_of
        self._group = group
        self.refused: str | None = None
        """Set on rank 0 once an engine refused the transfer: the files transport from then on."""

    def group(self):
        if self._group is not None:
            return self._group
        from justrl.cluster.dist_groups import control_group

        return control_group()

    def _gather(self, part: dict) -> list[dict]:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [part]
        gathered = [None] * dist.get_world_size(group=self.group())
        dist.all_gather_object(gathered, part, group=self.group())
        return gathered

    def _barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier(group=self.group())

    def push(self, fleet, weights_dir: Path, step: int, state=None) -> None:
        """Every learner rank calls (fleet: rank 0's, None elsewhere); `state`: this rank's whole
        model, HF-named, in `rollout.dtype`, on its GPU."""
        import torch

        tensors, part = {}, {"node": this_node(), "names": [], "uuid": "", "handles": [], "problem": None}
        try:  # nothing raises before the gather: a rank that failed alone would leave the others waiting
            if state is None:
                raise WeightSyncError("no weights given on this rank")
            tensors = {n: t.detach().contiguous() for n, t in state.items()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.current_stream().synchronize()  # the casts are done before another process reads
            handles = [self.handle_of(t) for t in tensors.values()]
            uuids = sorted({u for u, _ in handles})
            if len(uuids) != 1:
                raise WeightSyncError(f"its weights are on GPUs {uuids}, not on one")
            part.update(names=list(tensors), uuid=uuids[0], handles=[h for _, h in handles])
        except Exception as exc:
            part["problem"] = f"{type(exc).__name__}: {exc}"
        gathered = self._gather(part)
        failed = [(rank, p) for rank, p in enumerate(gathered) if p["problem"]]
        if failed:
            rank, p = failed[0]
            raise WeightSyncError(f"ipc weight sync of step {step}: learner rank {rank} on {p['node']} could not hand "
                                  f"over its weights: {p['problem']}")
        try:
            if fleet is not None:
                self._push_engines(fleet, weights_dir, step, tensors, gathered)
        finally:
            self._barrier()  # the engines are done (or stopped): the copies may go
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.ipc_collect()

    def _push_engines(self, fleet, weights_dir: Path, step: int, tensors: dict, gathered: list[dict]) -> None:
        if self.refused is not None:
            FileTransport().push(fleet, weights_dir, step)
            return
        per_node = merge_for_nodes(gathered)
        here = this_node()
        dead = [e for e in fleet.live_engines if not e.alive()]
        if dead:
            raise EnginePushError(f"ipc weight push of step {step}: {', '.join(e.name for e in dead)} not running",
                                  [e.name for e in dead])
        names = list(tensors)
        meta = {"names": names, "dtype_names": [str(t.dtype).split(".")[-1] for t in tensors.values()],
                "shapes": [list(t.shape) for t in tensors.values()]}
        payloads = {}
        for engine in fleet.live_engines:
            node = engine.spec.node or here
            if node not in per_node:
                raise WeightSyncError(f"ipc weight sync: no learner rank on {node}, where {engine.name} runs "
                                      f"(cluster.placement=colocated puts one on every GPU)")
            payloads[engine.name] = dict(meta, ipc_handles_pickled=base64.b64encode(
                pickle.dumps(per_node[node])).decode("ascii"))
        pool = ThreadPoolExecutor(max_workers=len(fleet.live_engines))
        try:
            calls = {e.name: pool.submit(self._engine_calls, e, payloads[e.name], step) for e in fleet.live_engines}
            self._watch(fleet, calls, step)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        fleet.weights_dir = Path(weights_dir)

    def _post(self, engine, path: str, payload: dict | None = None) -> None:
        # past the watch's bound, so that the watch (which stops the engine) decides, not the socket
        post_route(engine, path, payload, self.push_timeout_s + 60)

    def _engine_calls(self, engine, update_info: dict, step: int) -> None:
        self._post(engine, "/init_weight_transfer_engine", {"init_info": {"packed": False}})
        self._post(engine, "/start_weight_update")
        self._post(engine, "/update_weights", {"update_info": update_info})
        self._post(engine, "/finish_weight_update", {"weight_version": str(step)})
        self._post(engine, "/reset_prefix_cache")

    def _watch(self, fleet, calls: dict, step: int) -> None:
        """Until every engine's calls are done. An engine that dies or answers an error is stopped at
        once (its worker may still read the learner's memory); the others are waited for, so that no
        worker reads a copy the ranks have freed; one still loading at the bound is stopped too. Then,
        if any failed, raise EnginePushError naming them."""
        deadline = time.monotonic() + self.push_timeout_s
        engines = {e.name: e for e in fleet.live_engines}
        problems, refused = {}, []
        while True:
            for name, future in calls.items():
                if name in problems:
                    continue
                if future.done() and future.exception() is not None:
                    problems[name] = f"{name}: {future.exception()}"
                    if isinstance(future.exception(), WeightSyncError):  # it answered: the transfer was refused
                        refused.append(name)
                elif not future.done() and not engines[name].alive():
                    problems[name] = f"{name} exited during the push (log {engines[name].log_path})"
                if name in problems:
                    engines[name].stop()
            pending = [name for name, f in calls.items() if not f.done() and name not in problems]
            if not pending:
                break
            if time.monotonic() > deadline:
                for name in pending:
                    problems[name] = f"{name} still loading after the push bound {self.push_timeout_s:.0f} s"
                    engines[name].stop()
                break
            time.sleep(self.poll_s)
        if not problems:
            return
        if refused:
            self.refused = problems[refused[0]]
            log.warning("the ipc weight sync was refused (%s): the files transport moves the weights from now on",
                        self.refused)
        raise EnginePushError(f"ipc weight push of step {step} failed: " + "; ".join(problems.values()),
                              sorted(problems))

    def close(self, fleet) -> None:
        shutdown_transfer_engines(fleet, self.push_timeout_s)
