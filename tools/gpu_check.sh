#!/usr/bin/env bash
# The single-GPU check (tools/gpu_check.py): one table of the hf learner in bf16 on a random
# 1.5B-shaped Qwen2 at 16k-token packed rows (step time, peak memory, MFU, log-probs against fp32),
# the varlen attention against dense SDPA, the Megatron learner (local spec, TP=1), and, where vLLM
# is installed, a colocated step (an engine put to sleep, a learner step, the engine woken with the
# new weights and checked against the learner).
#
#   bash tools/gpu_check.sh [--no-megatron] [--no-colocated]
#
# For a machine like the one this project may be lent: one GPU, Python 3.12, a CUDA torch,
# transformers; no vLLM, no Transformer Engine, no network. megatron-core can travel as a wheel:
# MEGATRON_WHEEL=megatron_core-0.16.1-....whl puts it (no dependencies) on the path for this run.
# Bounded to 8 minutes. Exits 2 without a CUDA device ("no CUDA device: this check needs a GPU"),
# 1 if a row failed. Not run on a GPU yet (docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -n "${MEGATRON_WHEEL:-}" ]; then
    target=$(mktemp -d)
    "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$target" "$MEGATRON_WHEEL" || exit 1
    export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
fi
exec timeout --signal=INT --kill-after=20 480 "$PYTHON" tools/gpu_check.py "$@"
