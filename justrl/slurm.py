"""Running the controller loop inside a Slurm allocation, and submitting it with submitit.

Placement: one allocation holds everything (`cluster.nodes` x `cluster.gpus_per_node`). The learner
ranks are the allocation's first `cluster.learner_gpus` GPUs (whole nodes, or part of the first
node), one task per GPU, started by srun (by `slurm/train.sbatch`, or by submitit, which starts
its tasks with srun too). The remaining GPUs serve vLLM engines of `rollout.tensor_parallel_size`
GPUs each; rank 0 starts each engine on its node as an `srun --overlap` step of the same job, so
the rendezvous needs no hostname: the learner's comes from SLURM_JOB_NODELIST, the engines'
from the placement. On a CPU allocation (gpus_per_node = 0, the tests here) there is one learner
rank and `rollout.engines` CPU engines beside it on the first node.

Pre-emption: the job's signal (SIGUSR1 from `sbatch --signal=B:USR1@...` forwarded by the batch
script, submitit's SIGUSR2, or SIGTERM) makes the loop finish its step and checkpoint; then the
batch script (`scontrol requeue`) or submitit requeues the job, and the next start resumes from
that checkpoint because it runs in the same output directory.
"""
from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from justrl.config import ConfigError, learner_tasks_per_node

log = logging.getLogger(__name__)

# Port of the learner ranks' rendezvous: fixed per job, so every rank computes the same one.
MASTER_PORT_BASE = 29500
# Port of engine i on its node (engines on different nodes may share a number).
ENGINE_PORT_BASE = 8100


def in_slurm_task() -> bool:
    """True inside an srun task of a Slurm job (where the loop runs), False on a login node."""
    return "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ


def allocation_nodes() -> list[str]:
    """Hostnames of the job's nodes, in Slurm's order."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


@dataclass(frozen=True)
class EnginePlacement:
    node: str
    gpu_ids: tuple[int, ...]
    """CUDA devices on `node`; empty: a CPU engine."""


def plan_engines(cluster, rollout, nodes: list[str]) -> list[EnginePlacement]:
    """Where each vLLM engine runs: the GPUs the learner does not use, cut into engines of
    `rollout.tensor_parallel_size` GPUs within a node (an engine never spans nodes)."""
    if cluster.gpus_per_node == 0:
        return [EnginePlacement(nodes[0], ()) for _ in range(rollout.engines)]
    per_node, learner, tp = cluster.gpus_per_node, cluster.learner_gpus, rollout.tensor_parallel_size
    if learner > per_node and learner % per_node:
        raise ConfigError(f"cluster.learner_gpus={learner}: must fill whole nodes of "
                          f"cluster.gpus_per_node={per_node} GPUs, or fit in one node")
    engines = []
    for index, node in enumerate(nodes[:cluster.nodes]):
        free = [g for g in range(per_node) if index * per_node + g >= learner]
        engines += [EnginePlacement(node, tuple(free[i:i + tp])) for i in range(0, len(free) - tp + 1, tp)]
    if not engines:
        raise ConfigError(f"no GPU left for rollouts: cluster.learner_gpus={learner} of "
                          f"{cluster.nodes} x {per_node}, rollout.tensor_parallel_size={tp}")
    return engines


def learner_tasks(cluster) -> tuple[int, int]:
    """(nodes, tasks per node) of the learner's srun: one task per learner GPU (one on a CPU)."""
    per_node = learner_tasks_per_node(cluster.gpus_per_node, cluster.learner_gpus)
    return (1 if cluster.gpus_per_node == 0 else -(-cluster.learner_gpus // per_node)), per_node


def init_distributed_from_slurm() -> None:
    """torch.distributed over the job's learner tasks (env:// with Slurm's ranks)."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ["SLURM_NTASKS"])
    rank, local_rank = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_LOCALID"])
    if world_size == 1:
        return
    os.environ.update(MASTER_ADDR=allocation_nodes()[0],
                      MASTER_PORT=str(MASTER_PORT_BASE + int(os.environ["SLURM_JOB_ID"]) % 1000),
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def run_in_allocation(cfg: DictConfig) -> None:
    """The loop, on this task of the job (every learner task calls it)."""
    from justrl.trainer import train

    init_distributed_from_slurm()
    nodes = allocation_nodes()
    placements = plan_engines(cfg.cluster, cfg.rollout, nodes)
    here = os.environ.get("SLURMD_NODENAME", nodes[0])
    log.info("job %s on %s: %d learner task(s), engines on %s", os.environ["SLURM_JOB_ID"], ",".join(nodes),
             int(os.environ["SLURM_NTASKS"]), [f"{p.node}:{list(p.gpu_ids)}" for p in placements])
    train(cfg, engine_placements=[(None if p.node == here else p.node, list(p.gpu_ids)) for p in placements])


class TrainJob:
    """What submitit runs on each task; `checkpoint()` makes submitit requeue it when the job is
    pre-empted or times out (the loop has checkpointed before submitit calls it)."""

    def __init__(self, cfg_yaml: str):
        self.cfg_yaml = cfg_yaml

    def __call__(self) -> None:
        run_in_allocation(OmegaConf.create(self.cfg_yaml))

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg_yaml))


def executor_parameters(cluster, job_name: str) -> dict:
    """sbatch settings of the allocation, as submitit's `slurm_*` parameters."""
    nodes, tasks = learner_tasks(cluster)
    params = dict(nodes=cluster.nodes, tasks_per_node=tasks, timeout_min=cluster.time_minutes, name=job_name,
                  slurm_additional_parameters={"requeue": True}, slurm_signal_delay_s=cluster.signal_delay_s,
                  cpus_per_task=cluster.cpus_per_task)
    if cluster.gpus_per_node:
        params["gpus_per_node"] = cluster.gpus_per_node
    if cluster.partition:
        params["slurm_partition"] = cluster.partition
    if cluster.account:
        params["slurm_account"] = cluster.account
    # the learner's tasks run on the first `nodes` nodes; the allocation may hold more (rollouts)
    if nodes < cluster.nodes:
        params["slurm_srun_args"] = [f"--nodes={nodes}", f"--ntasks={nodes * tasks}"]
    return params


def submit(cfg: DictConfig) -> str:
    """Submit the run as one Slurm job through submitit; returns the job id."""
    import shutil

    import submitit

    if shutil.which("sbatch") is None:
        raise ConfigError("cluster.name='slurm' (the recipe's default) but there is no Slurm here (no sbatch on "
                          "PATH); on this machine use cluster=local, or experiment=tiny for the CPU default")
    run_dir = Path(cfg.trainer.output_dir).absolute()
    cfg = OmegaConf.merge(cfg, {"trainer": {"output_dir": str(run_dir)}})
    executor = submitit.AutoExecutor(folder=run_dir / "submitit", cluster="slurm",
                                     slurm_max_num_timeout=cfg.cluster.max_requeues)
    executor.update_parameters(**executor_parameters(cfg.cluster, cfg.trainer.run_name))
    job = executor.submit(TrainJob(OmegaConf.to_yaml(cfg)))
    log.info("submitted job %s: %s (logs: %s)", job.job_id, run_dir, run_dir / "submitit")
    print(f"submitted Slurm job {job.job_id}; run directory {run_dir}; "
          f"job logs {run_dir / 'submitit'}; tensorboard --logdir {run_dir.parent}")
    return job.job_id
