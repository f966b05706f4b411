"""The typed schema of justrl's Hydra configuration, and the start-up checks.

The values (the recipe table) and their documentation live in hydra_conf/*.yaml; this module only
says what type each key has and which values make sense. Hydra merges the YAML into these
dataclasses, so an unknown key or a value of the wrong type fails at composition with the key's
name; `validate` then checks ranges and names (negative learning rate, n = 0, a verifier that does
not exist...). `compose` does both, for tests and scripts; `justrl.launch` does both at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

CONFIG_MODULE = "justrl.hydra_conf"
SCHEMA_NAME = "justrl_schema"
VERIFIER_NAMES = ("dapo", "lenient")  # kept in step with justrl.reward.VERIFIERS by a test
LEARNERS = ("hf", "megatron")
CLUSTERS = ("local", "slurm")
WEIGHT_SYNC_TRANSPORTS = ("files", "nccl")  # kept in step with justrl.weight_sync.TRANSPORTS by a test


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING
    build_tiny_if_missing: bool = MISSING


@dataclass
class DataConfig:
    train_path: str = MISSING
    problem_key: Optional[str] = MISSING
    answer_key: Optional[str] = MISSING
    prompt_suffix: str = MISSING
    max_prompt_length: int = MISSING
    seed: int = MISSING
    benchmark_dir: str = MISSING
    val_benchmarks: list[str] = MISSING


@dataclass
class RolloutConfig:
    n: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    top_k: int = MISSING
    max_response_length: int = MISSING
    val_samples: int = MISSING
    val_temperature: float = MISSING
    val_top_p: float = MISSING
    val_max_new_tokens: int = MISSING
    engines: int = MISSING
    dtype: str = MISSING
    tensor_parallel_size: int = MISSING
    gpu_memory_utilization: float = MISSING
    cpu_kv_cache_gb: int = MISSING
    engine_args: list[str] = MISSING
    max_restarts: int = MISSING
    startup_timeout_s: float = MISSING
    request_timeout_s: float = MISSING
    max_requests_per_engine: int = MISSING
    weight_sync: str = MISSING
    weight_check: bool = MISSING
    weight_check_tol: Optional[float] = MISSING
    max_policy_lag: int = MISSING


@dataclass
class AlgorithmConfig:
    prompts_per_step: int = MISSING
    mini_batch_prompts: int = MISSING
    ppo_epochs: int = MISSING
    clip_low: float = MISSING
    clip_high: float = MISSING
    clip_c: float = MISSING
    adv_eps: float = MISSING
    entropy_coef: float = MISSING


@dataclass
class OptimConfig:
    lr: float = MISSING
    warmup_steps: int = MISSING
    weight_decay: float = MISSING
    grad_clip: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING


@dataclass
class OverlongConfig:
    enable: bool = MISSING
    buffer: int = MISSING
    factor: float = MISSING


@dataclass
class RewardConfig:
    verifier: str = MISSING
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    num_workers: int = MISSING
    timeout_s: float = MISSING


@dataclass
class LearnerConfig:
    name: str = MISSING
    dtype: str = MISSING
    micro_batch_tokens: int = MISSING
    gradient_checkpointing: bool = MISSING
    tensor_parallel_size: int = MISSING
    max_nonfinite_updates: int = MISSING
    # Megatron only (hydra_conf/learner/megatron.yaml); the hf learner recomputes whole layers.
    recompute_granularity: str = "full"


@dataclass
class ClusterConfig:
    name: str = MISSING
    nodes: int = MISSING
    gpus_per_node: int = MISSING
    learner_gpus: int = MISSING
    partition: Optional[str] = MISSING
    account: Optional[str] = MISSING
    time_minutes: int = MISSING
    cpus_per_task: int = MISSING
    signal_delay_s: int = MISSING
    max_requeues: int = MISSING
    engine_srun_args: list[str] = MISSING
    exclusive: bool = MISSING
    dist_timeout_s: int = MISSING
    preflight: bool = MISSING


@dataclass
class TrainerConfig:
    total_steps: Optional[int] = MISSING
    val_before_train: bool = MISSING
    val_every: int = MISSING
    save_every: int = MISSING
    keep_checkpoints: Optional[int] = MISSING
    seed: int = MISSING
    run_name: str = MISSING
    output_dir: str = MISSING


@dataclass
class JustRLConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


ConfigStore.instance().store(name=SCHEMA_NAME, node=JustRLConfig)


def learner_tasks_per_node(gpus_per_node: int, learner_gpus: int) -> int:
    """Learner tasks on each of the learner's nodes: one per GPU (one on a CPU allocation)."""
    return 1 if gpus_per_node == 0 else min(learner_gpus, gpus_per_node)


def allocation_parameters(exclusive: bool) -> dict:
    """sbatch settings beyond the task shape: requeue on pre-emption and, with `exclusive`,
    whole nodes with all their memory (`--exclusive --mem=0`): the engines' steps use the CPUs and
    memory of their node beyond what the learner's tasks ask for."""
    return {"requeue": True, **({"exclusive": True, "mem": "0"} if exclusive else {})}


# Used by hydra_conf/cluster/slurm.yaml to derive the launcher's settings from cluster.*.
OmegaConf.register_new_resolver("justrl_allocation_parameters", allocation_parameters, replace=True)
OmegaConf.register_new_resolver("justrl_none_if_zero", lambda v: None if v == 0 else v, replace=True)
OmegaConf.register_new_resolver("justrl_learner_tasks_per_node", learner_tasks_per_node, replace=True)
# The default benchmark_dir (hydra_conf/config.yaml, evaluate.yaml): the copy shipped in the package.
OmegaConf.register_new_resolver("justrl_packaged_benchmarks", lambda: str(_packaged_benchmark_dir()), replace=True)


def _packaged_benchmark_dir():
    from justrl.benchmark_data import DIR

    return DIR


class ConfigError(ValueError):
    """A configuration value that cannot work; the message starts with the key."""


def _check(errors: list[str], ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        errors.append(f"{key}: {rule}, got {value!r}")


def _unknown_keys(node: Any, schema: Any, prefix: str = "") -> list[str]:
    """Keys of `node` that the schema does not have (Hydra's `+key=value` can add them)."""
    unknown, known = [], set(schema.keys())  # `in` would call a MISSING ("???") field absent
    for key in node.keys():
        if key not in known:
            unknown.append(f"{prefix}{key}")
        elif isinstance(node[key], DictConfig) and isinstance(schema[key], DictConfig):
            unknown += _unknown_keys(node[key], schema[key], f"{prefix}{key}.")
    return unknown


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every key whose value cannot work. Call once, at start-up."""
    c = cfg
    e: list[str] = [f"{key}: unknown config key" for key in
                    _unknown_keys(cfg, OmegaConf.structured(JustRLConfig)) if key != "hydra"]
    _check(e, bool(c.model.path), "model.path", "must name a HF hub id or a local directory", c.model.path)

    _check(e, bool(c.data.train_path), "data.train_path", "must not be empty", c.data.train_path)
    _check(e, c.data.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1", c.data.max_prompt_length)
    # The validation sets are read before the first step; a missing file must stop the run here,
    # before a job queues, engines start or a GPU is used.
    from justrl.data.benchmarks import benchmark_file_errors

    e += [f"data.val_benchmarks: {msg}" for msg in
          benchmark_file_errors(c.data.val_benchmarks, c.data.benchmark_dir, "data.benchmark_dir")]

    r = c.rollout
    _check(e, r.n >= 2, "rollout.n", "must be >= 2 (GRPO compares responses within a group)", r.n)
    for key in ("temperature", "val_temperature"):
        _check(e, r[key] > 0, f"rollout.{key}", "must be > 0", r[key])
    for key in ("top_p", "val_top_p"):
        _check(e, 0 < r[key] <= 1, f"rollout.{key}", "must be in (0, 1]", r[key])
    _check(e, r.top_k == -1 or r.top_k >= 1, "rollout.top_k", "must be -1 (off) or >= 1", r.top_k)
    for key in ("max_response_length", "val_samples", "val_max_new_tokens", "engines", "tensor_parallel_size"):
        _check(e, r[key] >= 1, f"rollout.{key}", "must be >= 1", r[key])
    _check(e, r.dtype in ("float32", "bfloat16", "float16"), "rollout.dtype",
           "must be float32, bfloat16 or float16", r.dtype)
    _check(e, 0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]",
           r.gpu_memory_utilization)
    _check(e, r.cpu_kv_cache_gb > 0, "rollout.cpu_kv_cache_gb", "must be > 0", r.cpu_kv_cache_gb)
    _check(e, r.max_restarts >= 0, "rollout.max_restarts", "must be >= 0", r.max_restarts)
    for key in ("startup_timeout_s", "request_timeout_s"):
        _check(e, r[key] > 0, f"rollout.{key}", "must be > 0", r[key])
    _check(e, r.max_requests_per_engine >= 1, "rollout.max_requests_per_engine", "must be >= 1",
           r.max_requests_per_engine)
    _check(e, r.weight_sync in WEIGHT_SYNC_TRANSPORTS, "rollout.weight_sync",
           f"must be one of {list(WEIGHT_SYNC_TRANSPORTS)}", r.weight_sync)
    _check(e, r.weight_sync != "nccl" or c.cluster.gpus_per_node > 0, "rollout.weight_sync",
           "nccl needs GPUs (cluster.gpus_per_node > 0); use files on a CPU", r.weight_sync)
    _check(e, r.weight_check_tol is None or r.weight_check_tol > 0, "rollout.weight_check_tol",
           "must be null (by rollout.dtype) or > 0", r.weight_check_tol)
    _check(e, r.max_policy_lag in (0, 1), "rollout.max_policy_lag",
           "must be 0 (strictly on-policy, the recipe) or 1 (one-step overlap)", r.max_policy_lag)

    a = c.algorithm
    _check(e, a.prompts_per_step >= 1, "algorithm.prompts_per_step", "must be >= 1", a.prompts_per_step)
    _check(e, a.mini_batch_prompts >= 1 and a.prompts_per_step % max(a.mini_batch_prompts, 1) == 0,
           "algorithm.mini_batch_prompts", f"must be >= 1 and divide prompts_per_step={a.prompts_per_step}",
           a.mini_batch_prompts)
    _check(e, a.ppo_epochs >= 1, "algorithm.ppo_epochs", "must be >= 1", a.ppo_epochs)
    _check(e, 0 <= a.clip_low < 1, "algorithm.clip_low", "must be in [0, 1)", a.clip_low)
    _check(e, a.clip_high >= 0, "algorithm.clip_high", "must be >= 0", a.clip_high)
    _check(e, a.clip_c > 1, "algorithm.clip_c", "must be > 1 (dual-clip constant)", a.clip_c)
    _check(e, a.adv_eps > 0, "algorithm.adv_eps", "must be > 0", a.adv_eps)
    _check(e, a.entropy_coef >= 0, "algorithm.entropy_coef", "must be >= 0", a.entropy_coef)

    o = c.optim
    _check(e, o.lr > 0, "optim.lr", "must be > 0", o.lr)
    _check(e, o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", o.warmup_steps)
    _check(e, o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _check(e, o.grad_clip > 0, "optim.grad_clip", "must be > 0", o.grad_clip)
    _check(e, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
           "must be two numbers in [0, 1)", list(o.betas))
    _check(e, o.eps > 0, "optim.eps", "must be > 0", o.eps)

    w = c.reward
    _check(e, w.verifier in VERIFIER_NAMES, "reward.verifier", f"must be one of {list(VERIFIER_NAMES)}", w.verifier)
    _check(e, 0 < w.overlong.buffer <= r.max_response_length, "reward.overlong.buffer",
           f"must be in (0, rollout.max_response_length={r.max_response_length}]", w.overlong.buffer)
    _check(e, w.overlong.factor >= 0, "reward.overlong.factor", "must be >= 0", w.overlong.factor)
    _check(e, w.num_workers >= 1, "reward.num_workers", "must be >= 1", w.num_workers)
    _check(e, w.timeout_s > 0, "reward.timeout_s", "must be > 0", w.timeout_s)

    lr = c.learner
    _check(e, lr.name in LEARNERS, "learner.name", f"must be one of {list(LEARNERS)}", lr.name)
    _check(e, lr.dtype in ("float32", "bfloat16"), "learner.dtype", "must be float32 or bfloat16", lr.dtype)
    _check(e, lr.micro_batch_tokens >= 1, "learner.micro_batch_tokens", "must be >= 1", lr.micro_batch_tokens)
    _check(e, lr.tensor_parallel_size >= 1 and (lr.name == "megatron" or lr.tensor_parallel_size == 1),
           "learner.tensor_parallel_size", "must be >= 1, and 1 for the hf learner", lr.tensor_parallel_size)
    _check(e, lr.max_nonfinite_updates >= 1, "learner.max_nonfinite_updates", "must be >= 1",
           lr.max_nonfinite_updates)
    _check(e, lr.recompute_granularity in ("full", "selective"), "learner.recompute_granularity",
           "must be full or selective", lr.recompute_granularity)

    cl = c.cluster
    _check(e, cl.name in CLUSTERS, "cluster.name", f"must be one of {list(CLUSTERS)}", cl.name)
    _check(e, cl.nodes >= 1, "cluster.nodes", "must be >= 1", cl.nodes)
    _check(e, cl.gpus_per_node >= 0, "cluster.gpus_per_node", "must be >= 0", cl.gpus_per_node)
    _check(e, 0 <= cl.learner_gpus <= cl.nodes * cl.gpus_per_node, "cluster.learner_gpus",
           f"must be in [0, nodes * gpus_per_node = {cl.nodes * cl.gpus_per_node}]", cl.learner_gpus)
    _check(e, cl.time_minutes >= 1, "cluster.time_minutes", "must be >= 1", cl.time_minutes)
    _check(e, cl.cpus_per_task >= 1, "cluster.cpus_per_task", "must be >= 1", cl.cpus_per_task)
    _check(e, cl.signal_delay_s >= 0, "cluster.signal_delay_s", "must be >= 0", cl.signal_delay_s)
    _check(e, cl.max_requeues >= 0, "cluster.max_requeues", "must be >= 0", cl.max_requeues)
    _check(e, cl.dist_timeout_s >= 60, "cluster.dist_timeout_s", "must be >= 60 (seconds)", cl.dist_timeout_s)
    _check(e, cl.gpus_per_node == 0 or cl.learner_gpus >= 1, "cluster.learner_gpus",
           "must be >= 1 when the nodes have GPUs", cl.learner_gpus)
    learner_ranks = max(1, cl.learner_gpus)
    _check(e, learner_ranks % lr.tensor_parallel_size == 0, "learner.tensor_parallel_size",
           f"must divide the learner ranks (cluster.learner_gpus={cl.learner_gpus}, so {learner_ranks})",
           lr.tensor_parallel_size)

    t = c.trainer
    _check(e, t.total_steps is None or t.total_steps >= 1, "trainer.total_steps",
           "must be null (one pass over the data) or >= 1", t.total_steps)
    _check(e, t.val_every >= 0, "trainer.val_every", "must be >= 0 (0: never)", t.val_every)
    _check(e, t.save_every >= 1, "trainer.save_every", "must be >= 1", t.save_every)
    _check(e, t.keep_checkpoints is None or t.keep_checkpoints >= 1, "trainer.keep_checkpoints",
           "must be null (keep all) or >= 1", t.keep_checkpoints)
    _check(e, bool(t.run_name), "trainer.run_name", "must not be empty", t.run_name)
    if e:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(e))


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the installed hydra_conf with command-line style overrides, resolve and validate.

    The same composition `python -m justrl.launch <overrides>` does, without starting a run.
    """
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    validate(cfg)
    return cfg
