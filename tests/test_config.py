"""Hydra configuration: the recipe's defaults, every group composes, ablations change only their
knobs, bad keys and values fail at start-up with the key named, and the launcher's CLI does too."""
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from justrl.config import VERIFIER_NAMES, ConfigError, compose

REPO = Path(__file__).resolve().parents[1]
GROUPS = {
    "model": ["deepseek_r1_distill_qwen_1.5b", "openmath_nemotron_1.5b", "tiny"],
    "ablation": ["none", "length_penalty", "lenient"],
    "cluster": ["local", "slurm"],
    "learner": ["hf", "megatron"],
    "experiment": ["tiny"],
}


def _flat(cfg) -> dict:
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                out[name] = value
    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def test_recipe_defaults():
    cfg = compose()
    assert cfg.model.path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert cfg.rollout.n == 8
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (1.0, 1.0, -1)
    assert cfg.rollout.max_response_length == 15360 and cfg.data.max_prompt_length == 1024
    assert cfg.algorithm.prompts_per_step == 256 and cfg.algorithm.mini_batch_prompts == 64
    assert cfg.algorithm.ppo_epochs == 1
    assert (cfg.algorithm.clip_low, cfg.algorithm.clip_high, cfg.algorithm.clip_c) == (0.2, 0.28, 10.0)
    assert cfg.algorithm.adv_eps == 1e-6 and cfg.algorithm.entropy_coef == 0.0
    assert "kl_coef" not in cfg.algorithm and "loss_agg" not in cfg.algorithm  # not knobs: the recipe has neither
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-6, 10, 0.1, 1.0)
    assert cfg.reward.verifier == "dapo" and cfg.reward.overlong.enable is False
    assert (cfg.reward.overlong.buffer, cfg.reward.overlong.factor) == (4096, 1.0)
    assert (cfg.rollout.val_samples, cfg.rollout.val_temperature, cfg.rollout.val_top_p,
            cfg.rollout.val_max_new_tokens) == (32, 0.7, 0.9, 31744)
    assert list(cfg.data.val_benchmarks) == ["AIME24", "AIME25", "AMC23"]
    assert cfg.trainer.val_every == 50 and cfg.trainer.save_every == 50 and cfg.trainer.val_before_train
    assert cfg.data.prompt_suffix == "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


@pytest.mark.parametrize("group, option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    # the option really was merged, not just accepted
    expected_model = {"deepseek_r1_distill_qwen_1.5b": "deepseek-1.5b", "openmath_nemotron_1.5b": "nemotron-1.5b",
                      "tiny": "tiny"}
    if group in ("cluster", "learner"):
        assert cfg[group].name == option
    elif group == "model":
        assert cfg.model.name == expected_model[option]
    elif group == "experiment":
        assert cfg.model.name == "tiny" and cfg.data.train_path == "toy_scratchpad"
    assert cfg.model.path


@pytest.mark.parametrize("ablation, changed", [
    ("none", {}),
    ("length_penalty", {"reward.overlong.enable": (False, True)}),
    ("lenient", {"reward.verifier": ("dapo", "lenient")}),
])
@pytest.mark.parametrize("base", [[], ["experiment=tiny"], ["model=openmath_nemotron_1.5b", "cluster=slurm"]])
def test_each_ablation_changes_exactly_its_knobs(ablation, changed, base):
    before = _flat(compose(base))
    after = _flat(compose(base + [f"ablation={ablation}"]))
    diff = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    # ...and the run's name, hence its default directory (and Slurm job name): one run per ablation
    name = before["trainer.run_name"]
    assert name == f"justrl-{before['model.name']}-none"
    named = {"trainer.run_name": (name, name[:-len("none")] + ablation),
             "trainer.output_dir": (f"outputs/{name}", f"outputs/{name[:-len('none')]}{ablation}")}
    named.update({k: named["trainer.run_name"] for k, v in before.items() if v == name and k != "trainer.run_name"})
    assert diff == (changed if ablation == "none" else {**changed, **named})


def test_the_run_directory_is_named_after_the_run_not_the_job():
    """Resubmitting the same command continues the run: the default directory depends only on the
    model and the ablation (justrl/cluster/run_lock.py guards it against two live jobs)."""
    assert compose([]).trainer.output_dir == "outputs/justrl-deepseek-1.5b-none"
    assert compose(["model=openmath_nemotron_1.5b", "ablation=lenient"]).trainer.output_dir == \
        "outputs/justrl-nemotron-1.5b-lenient"
    assert compose(["experiment=tiny", "ablation=length_penalty"]).trainer.run_name == "justrl-tiny-length_penalty"
    assert compose(["trainer.run_name=mine"]).trainer.output_dir == "outputs/mine"
    assert "SLURM_JOB_ID" not in (Path(__file__).parents[1] / "slurm" / "train.sbatch").read_text().split(
        "OUTPUT_DIR=", 1)[1].splitlines()[0]


def test_tiny_experiment_is_small_and_local():
    cfg = compose(["experiment=tiny"])
    assert cfg.model.name == "tiny" and cfg.model.build_tiny_if_missing
    assert cfg.cluster.name == "local" and cfg.cluster.gpus_per_node == 0
    assert cfg.learner.name == "hf" and cfg.data.train_path == "toy_scratchpad"
    # the recipe's algorithm is untouched; only sizes change
    assert (cfg.algorithm.clip_low, cfg.algorithm.clip_high, cfg.algorithm.clip_c) == (0.2, 0.28, 10.0)


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1e-6", "optim.lr"),
    ("algorithm.clip_high=-0.1", "algorithm.clip_high"),
    ("algorithm.clip_low=1.5", "algorithm.clip_low"),
    ("algorithm.clip_c=0.5", "algorithm.clip_c"),
    ("rollout.n=0", "rollout.n"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("reward.verifier=exact_match", "reward.verifier"),
    ("algorithm.mini_batch_prompts=100", "algorithm.mini_batch_prompts"),
    ("reward.overlong.buffer=20000", "reward.overlong.buffer"),
    # the recipe's learner on the cluster is megatron: TP=3 does not divide its 16 learner ranks
    ("learner.tensor_parallel_size=3", "learner.tensor_parallel_size"),
    ("trainer.total_steps=0", "trainer.total_steps"),
    ("cluster.learner_gpus=64", "cluster.learner_gpus"),
])
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([override])


def test_several_errors_are_reported_together():
    with pytest.raises(ConfigError) as err:
        compose(["optim.lr=0", "rollout.n=1"])
    assert "optim.lr" in str(err.value) and "rollout.n" in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1e-6", "lrr"),
    ("+optim.momentum=0.9", "momentum"),
    ("rollout.n=eight", "rollout.n"),
    ("ablation=shorter", "ablation"),
    ("algorithm.kl_coef=0.001", "algorithm.kl_coef"),  # no KL term in the recipe: not a knob at all
])
def test_unknown_keys_and_wrong_types_fail_with_the_key(override, key):
    with pytest.raises(Exception) as err:
        compose([override])
    assert key in str(err.value)


def test_verifier_names_match_the_reward_module():
    from justrl.config import PROMPT_FORMS
    from justrl.data import PROMPT_FORMS as DATA_PROMPT_FORMS
    from justrl.reward import VERIFIERS

    assert set(VERIFIER_NAMES) == set(VERIFIERS)
    assert PROMPT_FORMS == DATA_PROMPT_FORMS


def test_config_reads_the_owners_names_without_loading_torch():
    """justrl.config imports its name lists from their owners (the verifiers, the prompt forms,
    the weight transports) and still loads no torch: `python -m justrl.launch` on a login node."""
    import subprocess
    import sys

    code = ("import sys, justrl.config as c; from justrl.reward import VERIFIERS; "
            "print('torch' in sys.modules, c.VERIFIER_NAMES == tuple(VERIFIERS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_installed_without_editable_finds_config(tmp_path):
    """A plain (non -e) install ships hydra_conf as justrl.hydra_conf."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    code = ("import justrl.config as c, justrl.hydra_conf as h; cfg = c.compose(['ablation=lenient']); "
            "print(h.__file__); print(cfg.reward.verifier)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}).stdout
    hydra_file, verifier = out.strip().splitlines()[-2:]
    assert hydra_file.startswith(str(target)) and verifier == "lenient"
    assert (target / "justrl" / "hydra_conf" / "ablation" / "lenient.yaml").is_file()


def test_megatron_tensor_parallel_size_must_divide_the_learner_ranks():
    """Checked before anything starts: the CPU launcher runs one learner rank."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "justrl.launch", "experiment=tiny", "learner=megatron",
                             "learner.tensor_parallel_size=2"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "learner.tensor_parallel_size: must divide the learner ranks (cluster.learner_gpus=0, so 1), got 2" \
        in result.stderr


def test_evaluation_checks_the_engine_keys_it_shares_with_training():
    """The engine keys are declared once (justrl.config.ENGINE_KEYS): training's rollout.* and
    evaluation's engine.* reject the same bad value with the same rule."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import justrl.eval.command as evaluate

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="justrl.hydra_conf", version_base=None):
        cfg = hydra_compose(config_name="evaluate", overrides=["model_path=x", "benchmarks=[AIME24]", "samples=0",
                                                               "engine.gpu_memory_utilization=1.5", "engine.dtype=int8"])
    with pytest.raises(ConfigError) as err:
        evaluate.check(cfg)
    message = str(err.value)
    assert "samples: must be null (the paper's) or >= 1, got 0" in message
    assert "engine.gpu_memory_utilization: must be in (0, 1], got 1.5" in message
    assert "engine.dtype: must be float32, bfloat16 or float16, got 'int8'" in message
    with pytest.raises(ConfigError, match=r"rollout.gpu_memory_utilization: must be in \(0, 1\], got 1.5"):
        compose(["rollout.gpu_memory_utilization=1.5"])
