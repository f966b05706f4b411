"""Where the learner tasks and the vLLM engines go in an allocation (pure functions; the GPU layouts
cannot run here, their arithmetic can be checked)."""
import pytest

from justrl.config import ConfigError, compose
from justrl.launch import local_placements
from justrl.slurm import executor_parameters, learner_tasks, plan_engines

NODES = ["n1", "n2", "n3", "n4"]


def test_recipe_layout_4x8_gpus_16_learner_16_engines():
    cfg = compose([])  # the recipe's default: cluster=slurm
    assert cfg.cluster.name == "slurm"
    assert learner_tasks(cfg.cluster) == (2, 8)
    engines = plan_engines(cfg.cluster, cfg.rollout, NODES)
    assert [(e.node, e.gpu_ids) for e in engines] == [(n, (g,)) for n in ("n3", "n4") for g in range(8)]


def test_engine_tensor_parallel_and_partial_learner_node():
    cfg = compose(["cluster=slurm", "cluster.nodes=2", "cluster.learner_gpus=4", "rollout.tensor_parallel_size=2"])
    assert learner_tasks(cfg.cluster) == (1, 4)
    engines = plan_engines(cfg.cluster, cfg.rollout, NODES[:2])
    assert [(e.node, e.gpu_ids) for e in engines] == [("n1", (4, 5)), ("n1", (6, 7)), ("n2", (0, 1)),
                                                      ("n2", (2, 3)), ("n2", (4, 5)), ("n2", (6, 7))]


def test_bad_splits_are_refused_with_the_key():
    cfg = compose(["cluster=slurm", "cluster.learner_gpus=12"])
    with pytest.raises(ConfigError, match="cluster.learner_gpus=12: must fill whole nodes"):
        plan_engines(cfg.cluster, cfg.rollout, NODES)
    cfg = compose(["cluster=slurm", "cluster.nodes=2"])  # 16 learner GPUs of 16
    with pytest.raises(ConfigError, match="no GPU left for rollouts"):
        plan_engines(cfg.cluster, cfg.rollout, NODES[:2])


def test_cpu_allocation_one_learner_task_engines_beside_it():
    cfg = compose(["experiment=tiny", "cluster=slurm", "cluster.nodes=1", "cluster.gpus_per_node=0",
                   "cluster.learner_gpus=0", "rollout.engines=2"])
    assert learner_tasks(cfg.cluster) == (1, 1)
    assert [(e.node, e.gpu_ids) for e in plan_engines(cfg.cluster, cfg.rollout, ["vm"])] == [("vm", ()), ("vm", ())]


def test_submitit_parameters_follow_the_cluster_config():
    cfg = compose(["cluster=slurm", "cluster.partition=gpu", "cluster.account=proj"])
    params = executor_parameters(cfg.cluster, "run")
    assert params["nodes"] == 4 and params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "proj"
    assert params["slurm_srun_args"] == ["--nodes=2", "--ntasks=16"]  # learner tasks on the first 2 nodes
    assert params["slurm_additional_parameters"] == {"requeue": True}


def test_local_gpu_placement():
    cfg = compose(["cluster=local", "cluster.gpus_per_node=8", "cluster.learner_gpus=4",
                   "rollout.tensor_parallel_size=2"])
    assert local_placements(cfg.cluster, cfg.rollout) == [(None, [4, 5]), (None, [6, 7])]
    cpu = compose(["cluster=local"])
    assert local_placements(cpu.cluster, cpu.rollout) is None  # CPU: rollout.engines engines

