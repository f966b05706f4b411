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
    from justrl.placement import pin_socket_interfaces

    # gloo (both groups on CPU, the control group always) and NCCL listen on the interface of the
    # address this node announces, not on what the hostname resolves to (127.0.1.1, a management
    # NIC); a GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME the user set is kept.
    pin_socket_interfaces()
    dist.init_process_group(backend, timeout=timedelta(seconds=data_timeout_s), **init_kwargs)
    _control_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=control_timeout_s))


def control_group():
    """The control-plane group (None before init_process_groups: torch's default group)."""
    return _control_group if dist.is_initialized() else None


def destroy() -> None:
    global _control_group
    _control_group = None
    if dist.is_initialized():
        dist.destroy_process_group()
