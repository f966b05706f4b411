"""The weight transports by name (`rollout.weight_sync`'s values, declared in
justrl.weight_sync.names): each name's class."""
from __future__ import annotations

from justrl.weight_sync.base import Transport
from justrl.weight_sync.files import FileTransport
from justrl.weight_sync.names import TRANSPORTS
from justrl.weight_sync.nccl import NcclTransport

TRANSPORT_CLASSES = {cls.name: cls for cls in (FileTransport, NcclTransport)}
if tuple(TRANSPORT_CLASSES) != TRANSPORTS:
    raise ImportError(f"justrl.weight_sync.names.TRANSPORTS {TRANSPORTS} and the transport classes "
                      f"{tuple(TRANSPORT_CLASSES)} differ")


def make_transport(name: str) -> Transport:
    if name not in TRANSPORTS:
        raise ValueError(f"rollout.weight_sync must be one of {list(TRANSPORTS)}, got {name!r}")
    return TRANSPORT_CLASSES[name]()


def engine_args_for(name: str) -> tuple[str, ...]:
    """Extra vLLM server arguments a transport needs."""
    return TRANSPORT_CLASSES[name].engine_args
