"""justrl's Hydra configuration: each key's type and the values that can work, declared once.

The values (the recipe table) and what each key means live in hydra_conf/*.yaml; this module
declares, in one table (`SCHEMA`), each key's type and its rule, and nothing else. From the table
come the structured schema Hydra merges the YAML into (so an unknown key or a value of the wrong
type fails at composition with the key's name) and the per-key checks of `validate` (negative
learning rate, n = 0, a verifier that does not exist...); `validate` adds the few checks that
relate two keys. Why two places and not one dataclass per section: a key's value depends on the
group options chosen (learner=hf|megatron, cluster=local|slurm, experiment=tiny, the ablations),
which Hydra composes from YAML, and its comment sits beside the value a user overrides; the type
and the rule do not depend on the options, and Hydra needs them before it composes. So each key's
value and documentation are written once (in its YAML) and its type and rule once (here); a key
missing from either fails composition. `ENGINE_KEYS` (how a vLLM server is started) are shared by training
(`rollout.*`) and evaluation (`engine.*`, justrl/eval/command.py). `compose` composes and validates,
for tests and scripts; `justrl.launch` does both at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from justrl.data.problems import PROMPT_FORMS
from justrl.reward.verifiers import VERIFIERS
from justrl.weight_sync.names import TRANSPORTS

CONFIG_MODULE = "justrl.hydra_conf"
SCHEMA_NAME = "justrl_schema"
# Names owned elsewhere, imported from their owners (whose modules load no torch: `python -m
# justrl.launch` on a login node reads this module; a test holds it torch-free).
VERIFIER_NAMES = tuple(VERIFIERS)
WEIGHT_SYNC_TRANSPORTS = TRANSPORTS
LEARNERS = ("hf", "megatron")
CLUSTERS = ("local", "slurm")
PLACEMENTS = ("colocated", "disaggregated")


@dataclass(frozen=True)
class Key:
    """A config key: its type and, when not every value of the type works, the rule (a test and
    the words an error message uses)."""

    type: Any
    ok: Optional[Callable[[Any], bool]] = None
    rule: str = ""


def typed(t) -> Key:
    return Key(t)


def at_least(t, low, rule: str = "") -> Key:
    return Key(t, lambda v: v >= low, rule or f"must be >= {low}")


def positive(t) -> Key:
    return Key(t, lambda v: v > 0, "must be > 0")


def one_of(names) -> Key:
    return Key(str, lambda v: v in names, f"must be one of {list(names)}")


def in_unit_interval(t=float) -> Key:
    return Key(t, lambda v: 0 < v <= 1, "must be in (0, 1]")


def nonempty() -> Key:
    return Key(str, bool, "must not be empty")


# How a vLLM server is started: the same keys in training (rollout.*) and evaluation (engine.*).
ENGINE_KEYS = {
    "tensor_parallel_size": at_least(int, 1),
    "dtype": Key(str, lambda v: v in ("float32", "bfloat16", "float16"), "must be float32, bfloat16 or float16"),
    "gpu_memory_utilization": in_unit_interval(),
    "cpu_kv_cache_gb": positive(int),
    "engine_args": typed(list[str]),
    "startup_timeout_s": positive(float),
    "request_timeout_s": positive(float),
}

SCHEMA = {
    "model": {
        "name": typed(str),
        "path": Key(str, bool, "must name a HF hub id or a local directory"),
        "build_tiny_if_missing": typed(bool),
        "total_steps": Key(Optional[int], lambda v: v is None or v >= 1, "must be null or >= 1"),
    },
    "data": {
        "train_path": nonempty(),
        "problem_key": typed(Optional[str]),
        "answer_key": typed(Optional[str]),
        "prompt_form": one_of(PROMPT_FORMS),
        "deduplicate": typed(bool),
        "prompt_suffix": typed(str),
        "max_prompt_length": at_least(int, 1),
        "seed": typed(int),
        "benchmark_dir": typed(str),
        "val_benchmarks": typed(list[str]),
    },
    "rollout": {
        "n": at_least(int, 2, "must be >= 2 (GRPO compares responses within a group)"),
        "temperature": positive(float),
        "top_p": in_unit_interval(),
        "top_k": Key(int, lambda v: v == -1 or v >= 1, "must be -1 (off) or >= 1"),
        "max_response_length": at_least(int, 1),
        "val_samples": at_least(int, 1),
        "val_temperature": positive(float),
        "val_top_p": in_unit_interval(),
        "val_max_new_tokens": at_least(int, 1),
        "engines": at_least(int, 1),
        **ENGINE_KEYS,
        "max_restarts": at_least(int, 0),
        "stall_timeout_s": Key(Optional[float], lambda v: v is None or v > 0, "must be null (off) or > 0"),
        "max_requests_per_engine": at_least(int, 1),
        "weight_sync": one_of(WEIGHT_SYNC_TRANSPORTS),
        "weight_check": typed(bool),
        "weight_check_tol": Key(Optional[float], lambda v: v is None or v > 0, "must be null (by rollout.dtype) or > 0"),
        "max_policy_lag": Key(int, lambda v: v in (0, 1),
                              "must be 0 (strictly on-policy, the recipe) or 1 (one-step overlap)"),
    },
    "algorithm": {
        "prompts_per_step": at_least(int, 1),
        "mini_batch_prompts": at_least(int, 1),  # and divides prompts_per_step (validate)
        "ppo_epochs": at_least(int, 1),
        "clip_low": Key(float, lambda v: 0 <= v < 1, "must be in [0, 1)"),
        "clip_high": at_least(float, 0),
        "clip_c": Key(float, lambda v: v > 1, "must be > 1 (dual-clip constant)"),
        "adv_eps": positive(float),
        "entropy_coef": at_least(float, 0),
    },
    "optim": {
        "lr": positive(float),
        "warmup_steps": at_least(int, 0),
        "weight_decay": at_least(float, 0),
        "grad_clip": positive(float),
        "betas": Key(list[float], lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
        "eps": positive(float),
    },
    "reward": {
        "verifier": one_of(VERIFIER_NAMES),
        "val_verifier": one_of(VERIFIER_NAMES),
        "overlong": {
            "enable": typed(bool),
            "buffer": positive(int),  # and <= rollout.max_response_length (validate)
            "factor": at_least(float, 0),
        },
        "num_workers": at_least(int, 1),
        "timeout_s": positive(float),
    },
    "learner": {
        "name": one_of(LEARNERS),
        "dtype": Key(str, lambda v: v in ("float32", "bfloat16"), "must be float32 or bfloat16"),
        "micro_batch_tokens": at_least(int, 1),
        "gradient_checkpointing": typed(bool),
        "tensor_parallel_size": at_least(int, 1),  # 1 for hf, divides the learner ranks (validate)
        "max_nonfinite_updates": at_least(int, 1),
        # Megatron only (hydra_conf/learner/megatron.yaml), used when gradient_checkpointing is on;
        # selective is refused with the TE layer spec (justrl.learner.megatron.model.recompute_setting:
        # its fused attention has nothing to recompute). The hf learner recomputes whole layers.
        "recompute_granularity": Key(str, lambda v: v in ("full", "selective"), "must be full or selective"),
    },
    "cluster": {
        "name": one_of(CLUSTERS),
        "nodes": at_least(int, 1),
        "gpus_per_node": at_least(int, 0),
        # colocated: learner and engines share every GPU; disaggregated: the first learner_gpus
        # GPUs train, the rest generate (justrl.cluster.placement)
        "placement": one_of(PLACEMENTS),
        "learner_gpus": at_least(int, 0),  # and fits the nodes, every GPU when colocated (validate)
        "partition": typed(Optional[str]),
        "account": typed(Optional[str]),
        "time_minutes": at_least(int, 1),
        "cpus_per_task": at_least(int, 1),
        "signal_delay_s": at_least(int, 0),
        "max_requeues": at_least(int, 0),
        "engine_srun_args": typed(list[str]),
        "exclusive": typed(bool),
        "dist_timeout_s": at_least(int, 60, "must be >= 60 (seconds)"),
        "preflight": typed(bool),
    },
    "trainer": {
        "total_steps": Key(Optional[int], lambda v: v is None or v >= 1, "must be null (one pass over the data) or >= 1"),
        "val_before_train": typed(bool),
        "val_every": at_least(int, 0, "must be >= 0 (0: never)"),
        "save_every": at_least(int, 1),
        "keep_checkpoints": Key(Optional[int], lambda v: v is None or v >= 1, "must be null (keep all) or >= 1"),
        "seed": typed(int),
        "run_name": nonempty(),
        "output_dir": typed(str),
    },
}
# Keys with a default here, by dotted name: set by only some options of a group (the hf learner has
# no recompute_granularity; hydra_conf/learner/megatron.yaml sets it).
SCHEMA_DEFAULTS = {"learner.recompute_granularity": "full"}


def schema_dataclass(name: str, table: dict, prefix: str = ""):
    """The structured config (a dataclass, every field MISSING unless in SCHEMA_DEFAULTS) of a
    table like `SCHEMA`, for Hydra's ConfigStore."""
    fields = []
    for key, spec in table.items():
        if isinstance(spec, dict):
            sub = schema_dataclass(name + key.title().replace("_", ""), spec, f"{prefix}{key}.")
            fields.append((key, sub, field(default_factory=sub)))
        else:
            fields.append((key, spec.type, field(default=SCHEMA_DEFAULTS.get(prefix + key, MISSING))))
    return make_dataclass(name, fields)


def key_errors(cfg: DictConfig, table: dict, prefix: str = "") -> list[str]:
    """`<key>: <rule>, got <value>` for every key of `cfg` whose value breaks its rule in `table`."""
    errors = []
    for key, spec in table.items():
        if isinstance(spec, dict):
            errors += key_errors(cfg[key], spec, f"{prefix}{key}.")
        elif spec.ok is not None and not spec.ok(cfg[key]):
            value = cfg[key]
            errors.append(f"{prefix}{key}: {spec.rule}, got {list(value) if OmegaConf.is_list(value) else value!r}")
    return errors


JustRLConfig = schema_dataclass("JustRLConfig", SCHEMA)
ConfigStore.instance().store(name=SCHEMA_NAME, node=JustRLConfig)


def learner_tasks_per_node(gpus_per_node: int, learner_gpus: int) -> int:
    """Learner tasks on each of the learner's nodes: one per GPU (one on a CPU allocation)."""
    return 1 if gpus_per_node == 0 else min(learner_gpus, gpus_per_node)


def default_learner_gpus(placement: str, nodes: int, gpus_per_node: int) -> int:
    """cluster.learner_gpus when not given: colocated, every GPU of the allocation (each also
    serves an engine); disaggregated, half of them (the other half generates; 16 of 4 x 8)."""
    gpus = nodes * gpus_per_node
    return gpus if placement == "colocated" else (gpus + 1) // 2


def allocation_parameters(exclusive: bool) -> dict:
    """sbatch settings beyond the task shape: requeue on pre-emption; keep the allocation when a
    node fails (`--no-kill`: Slurm then kills only the steps on that node, so a lost engine node
    takes its engines' steps, not the learner's; sbatch(1), 22.05 and the current release say the
    same); and, with `exclusive`, whole nodes with all their memory (`--exclusive --mem=0`): the
    engines' steps use the CPUs and memory of their node beyond what the learner's tasks ask for."""
    return {"requeue": True, "no_kill": True, **({"exclusive": True, "mem": "0"} if exclusive else {})}


# Used by hydra_conf/cluster/slurm.yaml to derive the launcher's settings from cluster.*.
OmegaConf.register_new_resolver("justrl_allocation_parameters", allocation_parameters, replace=True)
OmegaConf.register_new_resolver("justrl_none_if_zero", lambda v: None if v == 0 else v, replace=True)
OmegaConf.register_new_resolver("justrl_learner_tasks_per_node", learner_tasks_per_node, replace=True)
OmegaConf.register_new_resolver("justrl_learner_gpus", default_learner_gpus, replace=True)
# rollout.weight_sync by placement: colocated on GPUs, CUDA IPC from the learner rank on each engine
# GPU (justrl/weight_sync/ipc.py); elsewhere the files every engine reloads.
OmegaConf.register_new_resolver("justrl_weight_sync", lambda placement, gpus_per_node: "ipc" if placement == "colocated"
                                and gpus_per_node else "files", replace=True)
# rollout.gpu_memory_utilization by placement (justrl.cluster.memory_budget checks the colocated one).
ENGINE_MEMORY_SHARE = {"disaggregated": 0.85, "colocated": 0.8}
OmegaConf.register_new_resolver("justrl_engine_memory_share", lambda placement: ENGINE_MEMORY_SHARE[placement],
                                replace=True)
# The default benchmark_dir (hydra_conf/config.yaml, evaluate.yaml): the copy shipped in the package.
OmegaConf.register_new_resolver("justrl_packaged_benchmarks", lambda: str(_packaged_benchmark_dir()), replace=True)


def _packaged_benchmark_dir():
    from justrl.benchmark_data import DIR

    return DIR


class ConfigError(ValueError):
    """A configuration value that cannot work; the message starts with the key."""


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
    e: list[str] = [f"{key}: unknown config key" for key in
                    _unknown_keys(cfg, OmegaConf.structured(JustRLConfig)) if key != "hydra"]
    e += key_errors(cfg, SCHEMA)
    # The validation sets are read before the first step; a missing file must stop the run here,
    # before a job queues, engines start or a GPU is used.
    from justrl.data.benchmarks import benchmark_file_errors

    e += [f"data.val_benchmarks: {msg}" for msg in
          benchmark_file_errors(cfg.data.val_benchmarks, cfg.data.benchmark_dir, "data.benchmark_dir")]

    # What relates two keys.
    r, a, w, lr, cl = cfg.rollout, cfg.algorithm, cfg.reward, cfg.learner, cfg.cluster
    if a.mini_batch_prompts >= 1 and a.prompts_per_step % a.mini_batch_prompts:
        e.append(f"algorithm.mini_batch_prompts: must divide prompts_per_step={a.prompts_per_step}, "
                 f"got {a.mini_batch_prompts!r}")
    if r.weight_sync in ("nccl", "ipc") and cl.gpus_per_node == 0:
        e.append(f"rollout.weight_sync: {r.weight_sync} needs GPUs (cluster.gpus_per_node > 0); use files on a CPU, "
                 f"got {r.weight_sync!r}")
    if r.weight_sync == "ipc" and cl.gpus_per_node and cl.placement != "colocated":
        e.append("rollout.weight_sync: ipc needs cluster.placement=colocated (each engine worker takes the weights "
                 "from the learner rank on its own GPU); use files or nccl disaggregated, got 'ipc'")
    if w.overlong.buffer > r.max_response_length:
        e.append(f"reward.overlong.buffer: must be <= rollout.max_response_length={r.max_response_length}, "
                 f"got {w.overlong.buffer!r}")
    if lr.name == "hf" and lr.tensor_parallel_size != 1:
        e.append(f"learner.tensor_parallel_size: must be 1 for the hf learner, got {lr.tensor_parallel_size!r}")
    if cl.learner_gpus > cl.nodes * cl.gpus_per_node:
        e.append(f"cluster.learner_gpus: must be in [0, nodes * gpus_per_node = {cl.nodes * cl.gpus_per_node}], "
                 f"got {cl.learner_gpus!r}")
    if cl.gpus_per_node > 0 and cl.learner_gpus == 0:
        e.append("cluster.learner_gpus: must be >= 1 when the nodes have GPUs, got 0")
    e += colocation_errors(cl, r)
    learner_ranks = max(1, cl.learner_gpus)
    if lr.tensor_parallel_size >= 1 and learner_ranks % lr.tensor_parallel_size:
        e.append(f"learner.tensor_parallel_size: must divide the learner ranks (cluster.learner_gpus="
                 f"{cl.learner_gpus}, so {learner_ranks}), got {lr.tensor_parallel_size!r}")
    if e:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(e))


def colocation_errors(cl, r) -> list[str]:
    """What a colocated placement (learner and engines on the same GPUs, the engines asleep while
    the learner trains) rules out."""
    if cl.placement != "colocated":
        return []
    e = []
    gpus = cl.nodes * cl.gpus_per_node
    if cl.learner_gpus != gpus:
        e.append(f"cluster.learner_gpus: must be every GPU (nodes * gpus_per_node = {gpus}) with "
                 f"cluster.placement=colocated (each GPU trains and generates), got {cl.learner_gpus!r}; "
                 f"cluster.placement=disaggregated splits them")
    if r.max_policy_lag:
        e.append("rollout.max_policy_lag: must be 0 with cluster.placement=colocated (the engines sleep while the "
                 "learner trains, so nothing can generate meanwhile); the one-step overlap needs "
                 f"cluster.placement=disaggregated, got {r.max_policy_lag!r}")
    if r.weight_sync == "nccl" and cl.gpus_per_node:
        # NCCL refuses a communicator with two ranks on one GPU ("Duplicate GPU detected",
        # init.cc), and colocated, learner rank 0 and an engine worker share one.
        e.append("rollout.weight_sync: nccl cannot run colocated (learner rank 0 and an engine share a GPU, and "
                 "NCCL refuses two ranks of one group on one GPU); use ipc or files, or "
                 "cluster.placement=disaggregated, got 'nccl'")
    return e


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the installed hydra_conf with command-line style overrides, resolve and validate.

    The same composition `python -m justrl.launch <overrides>` does, without starting a run.
    """
    cfg = compose_unchecked(overrides, config_name)
    validate(cfg)
    return cfg


def compose_unchecked(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """`compose` without `validate`. Like `@hydra.main`, it makes Hydra's own config current while it
    resolves, so that `${hydra:runtime.choices.ablation}` (in trainer.run_name) means the same here."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg
