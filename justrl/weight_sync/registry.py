"""The weight transports by name (`rollout.weight_sync`'s values, declared in
justrl.weight_sync.names): each name's class, and the one place that decides which transport a
name means on this machine."""
from __future__ import annotations

import logging

from justrl.weight_sync.base import Transport, WeightSyncError
from justrl.weight_sync.files import FileTransport
from justrl.weight_sync.ipc import IpcTransport
from justrl.weight_sync.names import TRANSPORTS
from justrl.weight_sync.nccl import NcclTransport

log = logging.getLogger(__name__)

TRANSPORT_CLASSES = {cls.name: cls for cls in (FileTransport, NcclTransport, IpcTransport)}
if tuple(TRANSPORT_CLASSES) != TRANSPORTS:
    raise ImportError(f"justrl.weight_sync.names.TRANSPORTS {TRANSPORTS} and the transport classes "
                      f"{tuple(TRANSPORT_CLASSES)} differ")


def effective_transport(name: str, env=None) -> str:
    """The transport `rollout.weight_sync=name` runs here. `ipc` (the colocated default on a GPU
    cluster) needs CUDA: on the emulated cluster (JUSTRL_EMULATED_GPUS=1, CPU compute on fake
    GPUs) it is the files transport, said in the log; on any other machine without CUDA it is an
    error, never a silent CPU fallback (the preflight refuses such a node first)."""
    if name not in TRANSPORTS:
        raise ValueError(f"rollout.weight_sync must be one of {list(TRANSPORTS)}, got {name!r}")
    if name != "ipc":
        return name
    import torch

    from justrl.cluster.placement import emulated_gpus
    from justrl.weight_sync.ipc import this_node

    if torch.cuda.is_available():
        return name
    if emulated_gpus(env):
        return "files"
    raise WeightSyncError(f"rollout.weight_sync=ipc needs CUDA GPUs, and torch.cuda is unavailable on node "
                          f"{this_node()}; use rollout.weight_sync=files on a CPU")


def make_transport(name: str) -> Transport:
    effective = effective_transport(name)
    if effective != name:
        log.warning("rollout.weight_sync=%s: no CUDA on this emulated cluster (JUSTRL_EMULATED_GPUS=1), so the %s "
                    "transport moves the weights", name, effective)
    return TRANSPORT_CLASSES[effective]()


def engine_args_for(name: str) -> tuple[str, ...]:
    """Extra vLLM server arguments the transport that `name` runs here needs."""
    return TRANSPORT_CLASSES[effective_transport(name)].engine_args


def engine_env_for(name: str) -> tuple[tuple[str, str], ...]:
    """Extra environment of a vLLM server for the transport that `name` runs here."""
    return TRANSPORT_CLASSES[effective_transport(name)].engine_env
