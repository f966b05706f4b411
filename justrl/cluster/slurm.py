"""Running the controller loop inside a Slurm allocation, and submitting it with submitit.

Placement (computed in justrl.cluster.placement): one allocation holds everything (`cluster.nodes` x
`cluster.gpus_per_node`). The learner ranks are the allocation's first `cluster.learner_gpus` GPUs
(whole nodes, or part of the first node), one task per GPU, started by srun (by
`slurm/train.sbatch`, by submitit, or by hydra-submitit-launcher, whose srun starts nodes x
tasks-per-node tasks: the tasks past the learner's world size exit at once, see `learner_rank`).
Each learner task sees its node's GPUs and takes the one of its local rank
(`learner_device_index`). The remaining GPUs serve vLLM engines of `rollout.tensor_parallel_size`
GPUs each; rank 0 starts each engine on its node as an `srun --overlap` step of the same job
holding all of the node's GPUs, and justrl.rollout.launch, inside the step, narrows them to the
planned ones. The rendezvous address is the first node's Slurm NodeAddr (or the user's MASTER_ADDR),
and gloo/NCCL are pinned to the interface of the node's announced address (placement.
pin_socket_interfaces), never what `socket.gethostname()` resolves to. On a CPU allocation
(gpus_per_node = 0) there is one learner rank and `rollout.engines` CPU engines beside it on the
first node. Where Slurm hands out GPUs but torch sees no CUDA, the task stops naming the node, the
driver and torch's CUDA, unless the allocation says its GPUs are emulated (JUSTRL_EMULATED_GPUS=1,
exported only by the emulated cluster of slurm/setup_emulated_cluster.sh): there learner ranks
compute on the CPU over gloo and engines run vLLM's CPU build, on exactly the same placement; both
say so in their logs.

Pre-emption: the job's signal (SIGUSR1 from `sbatch --signal=B:USR1@...` forwarded by the batch
script, submitit's SIGUSR2, or SIGTERM) makes the loop finish its step and checkpoint; then the
batch script (`scontrol requeue`) or submitit requeues the job, and the next start resumes from
that checkpoint because it runs in the same output directory.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from justrl.config import ConfigError, allocation_parameters
from justrl.cluster.placement import (EnginePlacement, allocation_nodes, colocated_partner, cuda_facts, emulated_gpus,
                              learner_device_index,
                              learner_rank, learner_tasks, learner_world_size, no_cuda_message, plan_engines,
                              rendezvous_host, rendezvous_port)

log = logging.getLogger(__name__)

def learner_gpu(cluster, rollout, local_rank: int) -> tuple[str | None, str | None]:
    """(the CUDA_VISIBLE_DEVICES entry this learner task trains on, the engine planned on it when
    colocated), from this task's own environment; (None, None) on a CPU allocation."""
    from justrl.rollout.launch import visible_devices

    if not cluster.gpus_per_node:
        return None, None
    visible = visible_devices(os.environ)
    index = learner_device_index(visible, local_rank)
    gpu = visible[index] if visible is not None else str(index)
    partner = None
    if cluster.placement == "colocated":
        here = os.environ.get("SLURMD_NODENAME")
        # planned indices count the node's GPUs as the step sees them (justrl.rollout.launch)
        partner = colocated_partner(plan_engines(cluster, rollout, allocation_nodes()), here, index)
    return gpu, partner


def init_distributed_from_slurm(cluster, rollout) -> int | None:
    """torch.distributed over the job's learner tasks (justrl.cluster.startup, with Slurm's ranks);
    returns this task's learner rank, None for a task that is not a learner (it should exit)."""
    import torch

    from justrl.cluster.startup import start_learner_rank

    procid, ntasks = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    local_rank = int(os.environ["SLURM_LOCALID"])
    rank = learner_rank(cluster, procid, ntasks)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if rank is None:
        print(f"justrl: task {procid} of {ntasks} on {socket.gethostname()} is not a learner rank (the learner "
              f"has {learner_world_size(cluster)}): exiting", flush=True)
        return None
    cpu_compute = "the CPU over gloo"
    if not torch.cuda.is_available() and visible is not None and cluster.gpus_per_node:
        if not emulated_gpus():  # the preflight says so first; this guards cluster.preflight=false
            raise ConfigError(no_cuda_message(os.environ.get("SLURMD_NODENAME", socket.gethostname()), cuda_facts(),
                                              len([d for d in visible.split(",") if d.strip()])))
        cpu_compute = "the CPU over gloo (emulated GPUs: JUSTRL_EMULATED_GPUS=1, torch.cuda is unavailable)"
    gpu, partner = learner_gpu(cluster, rollout, local_rank)
    world_size = learner_world_size(cluster)
    master = ((rendezvous_host(allocation_nodes()), rendezvous_port(os.environ["SLURM_JOB_ID"])) if world_size > 1
              else ("", 0))  # one rank: no process group
    start_learner_rank(rank, world_size, local_rank, *master, cluster.dist_timeout_s, cpu_compute, gpu, partner)
    return rank


def _barrier_if_distributed() -> None:
    import torch.distributed as dist

    from justrl.cluster.dist_groups import control_group

    if dist.is_initialized():
        dist.barrier(group=control_group())


BATCH_SCRIPT_HANDLES_FAILURE = "JUSTRL_BATCH_SCRIPT_REQUEUES"
"""Set to 1 by slurm/train.sbatch, which asks `python -m justrl.cluster.requeue` after the learner's step."""


def run_in_allocation(cfg: DictConfig) -> None:
    """The loop, on this task of the job (every task of the learner's srun calls it)."""
    from justrl.trainer import train

    # -- the job starts here, on every task: the one place for checks before any training -------
    from justrl.cluster.preflight import run_in_job

    run_in_job(cfg)  # rank 0 runs justrl.cluster.preflight on every node; all tasks stop if it failed
    rank = init_distributed_from_slurm(cfg.cluster, cfg.rollout)
    if rank is None:
        return
    nodes = allocation_nodes()
    placements = plan_engines(cfg.cluster, cfg.rollout, nodes)
    here = os.environ.get("SLURMD_NODENAME", nodes[0])
    log.info("job %s on %s: %d learner rank(s), engines on %s", os.environ["SLURM_JOB_ID"], ",".join(nodes),
             learner_world_size(cfg.cluster), [f"{p.node}:{list(p.gpu_ids)}" for p in placements])
    from justrl.cluster.batch_host_watch import start_batch_host_watch, stop_watch
    from justrl.cluster.requeue import requeue_job
    from justrl.rollout.fleet import AllEnginesLost

    # the batch host's loss takes this task and the batch script with it: a step on each other
    # node requeues the job then (justrl.cluster.batch_host_watch)
    watches = (start_batch_host_watch(os.environ["SLURM_JOB_ID"], cfg.cluster.max_requeues)
               if rank == 0 and len(nodes) > 1 else [])
    try:
        # GPU engines always run as srun steps of their node (also on this node): the step holds the
        # node's GPUs whatever this task was bound to. CPU engines run here, beside the learner.
        train(cfg, engine_placements=[EnginePlacement(None, ()) if (p.node == here and not p.gpu_ids) else p
                                      for p in placements])
    except AllEnginesLost as exc:  # the trainer has checkpointed every finished step
        if rank == 0:
            # Requeue once Slurm has set the engines' other nodes down (or SlurmdTimeout + 60 s
            # passed: engines lost for another reason). Requeued while a node was only "not
            # responding", the job kept it, and Slurm 22.05 then miscounted the requeued job's GPUs
            # ("node offset invalid", its first step refused; seen on the emulated cluster).
            from justrl.cluster.requeue import slurmd_timeout_s, state_says_down, wait_until_marked

            others = sorted({p.node for p in placements if p.node and p.node != here})
            down = (wait_until_marked(others, slurmd_timeout_s() + 60, every=True, failed=state_says_down)
                    if others else [])
            requeue_job(f"every rollout engine is lost ({str(exc).splitlines()[0]})"
                        + (f"; Slurm set {', '.join(down)} down" if down else ""), cfg.cluster.max_requeues)
        # the other ranks wait for rank 0's requeue: their exit would make srun (--kill-on-bad-exit) end it
        _barrier_if_distributed()
        raise
    except Exception:
        # Under submitit (no batch script of ours to ask after the step): a learner rank's error
        # because a node of the job failed requeues the job; any other error does not.
        if rank == 0 and os.environ.get(BATCH_SCRIPT_HANDLES_FAILURE) != "1":
            from justrl.cluster.requeue import lost_nodes

            lost = lost_nodes(nodes, os.environ["SLURM_JOB_ID"])
            if lost:
                requeue_job("node(s) " + ", ".join(f"{n} ({why})" for n, why in lost.items()) + " of the job failed",
                            cfg.cluster.max_requeues)
        raise
    finally:
        stop_watch(watches)


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
                  slurm_additional_parameters=allocation_parameters(cluster.exclusive),
                  slurm_signal_delay_s=cluster.signal_delay_s, cpus_per_task=cluster.cpus_per_task)
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
    from justrl.cluster.run_lock import check_free

    run_dir = Path(cfg.trainer.output_dir).absolute()
    check_free(run_dir)  # a run still going there: refused here, not after a wait in the queue
    cfg = OmegaConf.merge(cfg, {"trainer": {"output_dir": str(run_dir)}})
    executor = submitit.AutoExecutor(folder=run_dir / "submitit", cluster="slurm",
                                     slurm_max_num_timeout=cfg.cluster.max_requeues)
    executor.update_parameters(**executor_parameters(cfg.cluster, cfg.trainer.run_name))
    job = executor.submit(TrainJob(OmegaConf.to_yaml(cfg)))
    log.info("submitted job %s: %s (logs: %s)", job.job_id, run_dir, run_dir / "submitit")
    print(f"submitted Slurm job {job.job_id}; run directory {run_dir}; "
          f"job logs {run_dir / 'submitit'}; tensorboard --logdir {run_dir.parent}")
    return job.job_id

