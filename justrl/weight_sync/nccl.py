"""vLLM's NCCL weight transfer: learner rank 0 broadcasts the HF-named tensors to every engine's
workers over one NCCL group. Written against vLLM 0.32's source; its CUDA parts have not run here."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from justrl.weight_sync.base import (EnginePushError, Transport, WeightSyncError, post_route,
                                     shutdown_transfer_engines)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class NcclTransport(Transport):
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
    engine_args = ("--weight-transfer-config", '{"backend": "nccl"}')
    # Seconds to wait for the sender's thread after ncclCommAbort (it returns once the aborted
    # kernels end); past this the thread is left behind (a daemon) and the error raised anyway.
    ABORT_WAIT_S = 30.0

    def __init__(self, master_address: str | None = None, timeout_s: float = 600.0, push_timeout_s: float = 600.0,
                 poll_s: float = 0.5):
        from justrl.cluster.placement import announced_address

        self.master_address = master_address or announced_address()
        self.timeout_s, self.push_timeout_s, self.poll_s = timeout_s, push_timeout_s, poll_s
        self.group = None
        self._restarts_at_init = None

    def _rpc(self, engine, path: str, payload: dict | None = None) -> None:
        post_route(engine, path, payload, self.timeout_s)

    def _init_group(self, fleet) -> None:
        from vllm.distributed.weight_transfer.nccl_common import (NCCLWeightTransferInitInfo, trainer_init,
                                                                   worker_init_payload)
        from justrl.cluster.placement import free_port

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
        """The weights were cast (`learner_hf_state`, a Megatron gather) on the current stream;
        vLLM's producer packs them on its own streams (packed_tensor.py ~180), which do not wait
        for the current one: without this the broadcast can read half-cast tensors."""
        import torch

        torch.cuda.current_stream().synchronize()

    def _send(self, state: dict[str, torch.Tensor], names: list[str]) -> None:
        """The broadcast (learner rank 0 is NCCL rank 0)."""
        import torch
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
        shutdown_transfer_engines(fleet, self.timeout_s)
        self.group.destroy()
        self.group = None
