"""The one start-up of a learner rank, the same on this machine (`python -m justrl.launch`, one
process per GPU) and in a Slurm task (justrl.cluster.slurm): take this task's GPU, say where it
runs in one line, then join the learner's process groups (justrl.cluster.dist_groups)."""
from __future__ import annotations

import json
import os
import socket

# The start-up line of each learner rank (see report_learner_rank).
LEARNER_LOG_PREFIX = "justrl-learner: "


def report_learner_rank(rank: int, world_size: int, local_rank: int, compute: str, gpu: str | None = None,
                        partner: str | None = None) -> None:
    """One line per learner rank at start-up, `justrl-learner: {json}` on stdout (the task's
    log, before any logging is set up): where it runs and the devices it sees, read from its
    own environment, and what it computes on; `gpu`: the CUDA_VISIBLE_DEVICES entry it trains
    on; `partner`: colocated, the engine planned on that GPU."""
    print(LEARNER_LOG_PREFIX + json.dumps({
        "rank": rank, "world_size": world_size, "local_rank": local_rank, "hostname": socket.gethostname(),
        "slurm_node": os.environ.get("SLURMD_NODENAME"), "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "job_nodelist": os.environ.get("SLURM_JOB_NODELIST"),
        "slurm_step": os.environ.get("SLURM_STEP_ID"), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu": gpu, "partner_engine": partner, "compute": compute}, sort_keys=True), flush=True)


def start_learner_rank(rank: int, world_size: int, local_rank: int, master_addr: str, master_port: int,
                       dist_timeout_s: float, cpu_compute: str = "the CPU over gloo", gpu: str | None = None,
                       partner: str | None = None) -> None:
    """Take the GPU of `local_rank` (where torch sees CUDA), report the rank, and, with several
    ranks, initialise torch.distributed (NCCL on GPUs, gloo on the CPU) at master_addr:master_port.
    `cpu_compute`: what the start-up line says a rank without CUDA computes on."""
    import torch

    from justrl.cluster.dist_groups import init_process_groups
    from justrl.cluster.placement import learner_device_index
    from justrl.rollout.launch import visible_devices

    cuda = torch.cuda.is_available()
    compute = cpu_compute
    if cuda:
        index = learner_device_index(visible_devices(os.environ), local_rank)
        torch.cuda.set_device(index)
        compute = f"cuda:{index}"
    report_learner_rank(rank, world_size, local_rank, compute, gpu, partner)
    if world_size == 1:
        return
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    init_process_groups("nccl" if cuda else "gloo", dist_timeout_s)
