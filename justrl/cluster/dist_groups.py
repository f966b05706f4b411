"""The learner ranks' process groups: the data plane (NCCL on GPUs, gloo on CPUs) and a gloo
control plane with a long timeout.

Why two: the non-zero ranks spend rank 0's validation and rollout time parked in
`broadcast_object_list` (trainer._broadcast) and barriers. On the NCCL group that wait is bounded
by the NCCL watchdog (torch's default: 10 minutes), far less than one validation or first rollout
at the recipe's sizes, and the watchdog aborts the job. The control-plane messages (rollouts,
flags, paths) are small Python objects, so they go over a gloo group whose timeout is
`cluster.dist_timeout_s`; the NCCL group keeps a shorter explicit timeout (`DATA_TIMEOUT_S`),
which still catches a rank that hangs inside a training collective. (verl and NeMo-RL likewise
raise torch's default timeouts for their controller waits; the separate gloo group is our choice.)
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist

# Timeout of the data-plane group (gradient all-reduce etc.): every rank enters those together.
DATA_TIMEOUT_S = 1800

_control_group = None


def init_process_groups(backend: str, control_timeout_s: float, data_timeout_s: float = DATA_TIMEOUT_S,
                        **init_kwargs) -> None:
    """`dist.init_process_group(backend)` with an explicit timeout (the data plane), then the
    gloo control group with `control_timeout_s`."""
    global _control_group
    from justrl.cluster.placement import pin_socket_interfaces

    # gloo (both groups on CPU, the control group always) and NCCL listen on the interface of the
    # address this node announces, not on what the hostname resolves to (127.0.1.1, a management
    # NIC); a GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME the user set is kept.
    pin_socket_interfaces()
    if "init_method" not in init_kwargs and "store" not in init_kwargs:  # env://: justrl's own store
        init_kwargs = dict(init_kwargs, store=rendezvous_store(max(data_timeout_s, control_timeout_s)))
        init_kwargs.setdefault("rank", int(os.environ["RANK"]))
        init_kwargs.setdefault("world_size", int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=data_timeout_s), **init_kwargs)
    _control_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=control_timeout_s))


def rendezvous_store(timeout_s: float, env=None) -> dist.TCPStore:
    """torch's env:// rendezvous store (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), with rank 0's
    server listening on MASTER_ADDR's address only, where env:// would listen on every interface
    of the node (torch has no bind-address setting for it). Rank 0 binds the socket itself and
    hands it to the store (`TCPStore(master_listen_fd=...)`, which both of torch's store backends
    take over); the other ranks connect as env:// does. The store still has no authentication:
    anyone on the cluster network who reaches MASTER_ADDR can read and write its keys
    (docs/security.md)."""
    env = os.environ if env is None else env
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(host, port, world, False, timeout=timeout)
    from justrl.config import ConfigError

    try:
        address = socket.gethostbyname(host)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(max(128, world))
    except OSError as exc:
        raise ConfigError(f"{socket.gethostname()}: learner rank 0 cannot listen for the rendezvous on MASTER_ADDR="
                          f"{host}:{port} ({exc}): rank 0 must run on the node that address names (the job's first "
                          f"node's Slurm NodeAddr unless MASTER_ADDR is set)") from exc
    # the store owns the descriptor from here (it closes it), not the Python socket
    return dist.TCPStore(host, port, world, True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())


def control_group():
    """The control-plane group (None before init_process_groups: torch's default group)."""
    return _control_group if dist.is_initialized() else None


def destroy() -> None:
    global _control_group
    _control_group = None
    if dist.is_initialized():
        dist.destroy_process_group()
