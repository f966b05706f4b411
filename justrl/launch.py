"""Entry point: compose the config, check it, start the learner ranks and the rollout engines.

    python -m justrl.launch experiment=tiny                 # embedded default: tiny model, CPU
    python -m justrl.launch model=openmath_nemotron_1.5b    # the recipe, on this machine's GPUs
    python -m justrl.launch trainer.output_dir=outputs/x    # relaunching the same directory resumes
    python -m justrl.launch cluster=slurm                   # one Slurm job, submitted with submitit
    python -m justrl.launch -m cluster=slurm ablation=length_penalty,lenient   # a job per ablation

Placement with cluster=local: learner ranks 0..learner_gpus-1 take the first GPUs (one CPU rank
when there are none), and the remaining GPUs are cut into vLLM engines of
rollout.tensor_parallel_size GPUs each (rollout.engines engines on a CPU machine). Rank 0 runs the
controller loop (justrl.trainer.train) and starts and stops the engines itself. With
cluster=slurm, see justrl/cluster/slurm.py.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from justrl.config import ConfigError, validate

log = logging.getLogger("justrl")


def _rank_main(rank: int, world_size: int, cfg_yaml: str, port: int, placements) -> None:
    from justrl.cluster import dist_groups
    from justrl.cluster.startup import start_learner_rank

    cfg = OmegaConf.create(cfg_yaml)
    start_learner_rank(rank, world_size, rank, "127.0.0.1", port, cfg.cluster.dist_timeout_s)
    try:
        from justrl.trainer import train

        train(cfg, placements)
    finally:
        dist_groups.destroy()


def launch_local(cfg: DictConfig) -> None:
    """Run the loop on this machine: in this process (one rank) or one process per learner GPU."""
    from justrl.cluster.placement import free_port, local_placements
    from justrl.trainer import train

    placements = local_placements(cfg.cluster, cfg.rollout)
    world_size = max(1, cfg.cluster.learner_gpus)
    if world_size == 1:
        train(cfg, placements)
        return
    import torch.multiprocessing as mp

    from justrl.cluster.run_lock import check_free

    check_free(Path(cfg.trainer.output_dir).absolute())  # refused here rather than inside a spawned rank
    mp.spawn(_rank_main, args=(world_size, OmegaConf.to_yaml(cfg), free_port(), placements), nprocs=world_size)


def _sweep_run_dir(cfg: DictConfig) -> DictConfig:
    """In a Hydra multirun each job trains in its own sweep subdirectory (`<job number>-<ablation>`),
    so that `tensorboard --logdir <sweep dir>` shows the runs side by side; its run name (and Slurm
    job name) is the run's own (model and ablation) plus the job number, which tells apart two jobs
    of one sweep that share an ablation. Relaunching with `hydra.sweep.dir=<that sweep dir>`
    resumes every run of the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cfg
    hydra_cfg = HydraConfig.get()
    return OmegaConf.merge(cfg, {"trainer": {"output_dir": str(Path(hydra_cfg.runtime.output_dir)),
                                             "run_name": f"{cfg.trainer.run_name}-{hydra_cfg.job.num}"}})


@hydra.main(config_path="pkg://justrl.hydra_conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """cluster=local: run here. cluster=slurm: inside a job's task (train.sbatch, submitit,
    hydra-submitit-launcher), run the loop; on a login node, submit the job with submitit."""
    from justrl.learner import NonFiniteError
    from justrl.rollout.client import EngineError
    from justrl.cluster.placement import in_slurm_task
    from justrl.cluster.run_lock import RunLocked
    from justrl.cluster.slurm import run_in_allocation, submit

    OmegaConf.resolve(cfg)
    try:
        cfg = _sweep_run_dir(cfg)
        validate(cfg)
        if cfg.cluster.name == "local":
            launch_local(cfg)
        elif in_slurm_task():
            run_in_allocation(cfg)
        else:
            submit(cfg)
    except (ConfigError, NonFiniteError, EngineError, RunLocked) as exc:
        log.error("%s", exc)
        sys.exit(f"justrl: {exc}")
    except Exception as exc:
        # The cause in one line first (a batch log holds every rank's traceback), then the traceback.
        lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
        print(f"justrl: error: {type(exc).__name__}: {lines[0]}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    main()
