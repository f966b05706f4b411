#!/usr/bin/env bash
# Build the CUDA environment in .venv at the repository root (a GPU cluster's checkout), in two
# stages, because Transformer Engine's PyTorch extension is compiled against the installed torch:
#
#   bash tools/setup_gpu_env.sh               the checks below, stage 1, stage 2, an import check
#   bash tools/setup_gpu_env.sh --check       only the checks (installs nothing)
#   bash tools/setup_gpu_env.sh --print-plan  what each stage installs (read from requirements/)
#
#   stage 1: torch (requirements/gpu.txt's pin: 2.13.0, PyPI's CUDA 13 build), then justrl with its
#            `gpu` extra (requirements/gpu.txt: vLLM, megatron-core), editable, without Transformer
#            Engine;
#   stage 2: Transformer Engine's build tools (requirements/gpu-te-build.txt), then
#            pip install --no-build-isolation <requirements/gpu-te.txt>, compiled against stage 1's
#            torch (under build isolation pip would build it against the newest torch on the index,
#            and the result does not load next to torch 2.13.0);
#   then:    import torch and transformer_engine.pytorch together (and, where a GPU is visible, run a
#            TE layer on it).
#
# Needs (checked first, every missing piece named at once):
#   - Python >= 3.11 ($PYTHON, default python3; 3.12 on clusters lets megatron-core move past 0.16);
#   - the CUDA toolkit of torch's CUDA major (13.x: nvcc in $CUDA_HOME/bin, on PATH or in
#     /usr/local/cuda/bin), for stage 2's compiler;
#   - cuDNN >= 9.3 headers (cudnn.h: $CUDNN_PATH, $CUDNN_HOME, the toolkit, /usr/include, or the
#     nvidia-cudnn-cu13 wheel stage 1 brings with torch);
#   - on the nodes that run it: an NVIDIA driver R580 or newer (CUDA 13.0's driver branch; the
#     sources are in docs/install.md). A node without a driver (a login node) gets a warning only;
#     an older driver is an error.
# Not verified: no GPU and no network where this was written (docs/install.md says what was).
# Environment: PYTHON, JUSTRL_VENV (default .venv), JUSTRL_TORCH_INDEX (an index for torch, e.g.
# https://download.pytorch.org/whl/cu130), CUDA_HOME, CUDNN_PATH, MAX_JOBS (TE's parallel build).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${JUSTRL_VENV:-.venv}
MIN_DRIVER_MAJOR=580
MIN_CUDNN=(9 3)

# The requirement lines of requirements/<file>: what setup.py's requirements() reads (text before
# a '#', stripped, blank lines left out). One list for the extra and for this script.
reqs() { sed -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' -e '/^$/d' "requirements/$1"; }

mapfile -t STAGE1 < <(reqs gpu.txt)
mapfile -t TE_BUILD < <(reqs gpu-te-build.txt)
mapfile -t TE_REQ < <(reqs gpu-te.txt)
TORCH_REQ=$(printf '%s\n' "${STAGE1[@]}" | grep -E '^torch[[:space:]]*([=<>!~;]|$)' || true)
TORCH_VERSION=$(sed -n 's/^torch[[:space:]]*==[[:space:]]*\([0-9.]*\).*/\1/p' <<<"$TORCH_REQ")
CUDA_MAJOR=$(sed -n 's/.*core[-_]cu\([0-9]*\).*/\1/p' <<<"${TE_REQ[0]:-}")
if [ -z "$TORCH_VERSION" ] || [ "${#TE_REQ[@]}" -ne 1 ] || [ -z "$CUDA_MAJOR" ]; then
    echo "setup_gpu_env: requirements/gpu.txt needs one 'torch==X' line and requirements/gpu-te.txt one" \
         "'transformer_engine[core-cuNN,pytorch]==X' line (got torch: '${TORCH_REQ}', TE: '${TE_REQ[*]:-}')" >&2
    exit 1
fi

if [ "${1:-}" = "--print-plan" ]; then
    echo "stage1 torch: ${TORCH_REQ}"
    for r in "${STAGE1[@]}"; do echo "stage1: $r"; done
    echo "stage1 justrl: -e .[gpu]"
    for r in "${TE_BUILD[@]}"; do echo "stage2 build: $r"; done
    echo "stage2 --no-build-isolation: ${TE_REQ[0]}"
    echo "needs: CUDA toolkit ${CUDA_MAJOR}.x (nvcc), cuDNN >= ${MIN_CUDNN[0]}.${MIN_CUDNN[1]} headers, NVIDIA driver >= ${MIN_DRIVER_MAJOR}"
    exit 0
fi

# -- checks --------------------------------------------------------------------------------------
MISSING=()

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    MISSING+=("Python >= 3.11 (\$PYTHON=$PYTHON: $("$PYTHON" --version 2>&1 || echo 'not found'))")
fi

# nvcc as Transformer Engine's build finds it (build_tools/utils.py cuda_path): $CUDA_HOME/bin/nvcc
# when CUDA_HOME is set (and only there), else the first nvcc on PATH that sits in a toolkit (its
# ../include/cuda_runtime.h: a wrapper script elsewhere does not tell where the headers are), else
# /usr/local/cuda. CUDA_HOME is then exported for the build.
NVCC=""
if [ -n "${CUDA_HOME:-}" ]; then
    [ -x "$CUDA_HOME/bin/nvcc" ] && NVCC="$CUDA_HOME/bin/nvcc"
    WHERE="\$CUDA_HOME/bin (CUDA_HOME=$CUDA_HOME)"
else
    for candidate in $(type -ap nvcc) /usr/local/cuda/bin/nvcc; do
        home=$(dirname "$(dirname "$(readlink -f "$candidate")")")
        if [ -x "$candidate" ] && [ -f "$home/include/cuda_runtime.h" ]; then NVCC=$candidate; export CUDA_HOME=$home; break; fi
    done
    WHERE="a CUDA toolkit on PATH or in /usr/local/cuda (CUDA_HOME unset)"
fi
if [ -z "$NVCC" ]; then
    MISSING+=("the CUDA toolkit ${CUDA_MAJOR}.x: no nvcc in $WHERE; install it (or 'module load cuda/${CUDA_MAJOR}.x') and export CUDA_HOME")
else
    NVCC_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
    if [ "${NVCC_VERSION%%.*}" != "$CUDA_MAJOR" ]; then
        MISSING+=("the CUDA toolkit ${CUDA_MAJOR}.x: $NVCC is CUDA ${NVCC_VERSION:-of unknown version} (torch ${TORCH_VERSION} and ${TE_REQ[0]} are CUDA ${CUDA_MAJOR}; torch's extension build refuses another major)")
    fi
    if [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
        MISSING+=("the CUDA toolkit's headers: no $CUDA_HOME/include/cuda_runtime.h next to $NVCC")
    fi
fi

# cudnn.h where Transformer Engine's build looks (CUDNN_PATH / CUDNN_HOME, the toolkit, the system),
# or in torch's nvidia-cudnn wheel once stage 1 has installed it.
find_cudnn() {
    local dirs=(${CUDNN_PATH:+"$CUDNN_PATH/include"} ${CUDNN_HOME:+"$CUDNN_HOME/include"}
                ${CUDA_HOME:+"$CUDA_HOME/include"} /usr/include /usr/include/x86_64-linux-gnu /usr/local/cuda/include)
    dirs+=("$VENV"/lib/python3*/site-packages/nvidia/cudnn/include)
    local d
    for d in "${dirs[@]}"; do
        if [ -f "$d/cudnn.h" ]; then echo "$d"; return 0; fi
    done
    return 1
}
cudnn_version_ok() {  # $1: the include directory
    local f="$1/cudnn_version.h" major minor
    [ -f "$f" ] || f="$1/cudnn.h"
    major=$(sed -n 's/^#define CUDNN_MAJOR[[:space:]]*\([0-9]*\).*/\1/p' "$f" | head -n 1)
    minor=$(sed -n 's/^#define CUDNN_MINOR[[:space:]]*\([0-9]*\).*/\1/p' "$f" | head -n 1)
    CUDNN_VERSION="${major:-?}.${minor:-?}"
    [ -n "$major" ] && [ -n "$minor" ] && { [ "$major" -gt "${MIN_CUDNN[0]}" ] || { [ "$major" -eq "${MIN_CUDNN[0]}" ] && [ "$minor" -ge "${MIN_CUDNN[1]}" ]; }; }
}
CUDNN_INCLUDE=$(find_cudnn || true)
if [ -n "$CUDNN_INCLUDE" ] && ! cudnn_version_ok "$CUDNN_INCLUDE"; then
    MISSING+=("cuDNN >= ${MIN_CUDNN[0]}.${MIN_CUDNN[1]} headers: $CUDNN_INCLUDE/cudnn.h is cuDNN $CUDNN_VERSION")
fi

DRIVER=""
if [ -r /proc/driver/nvidia/version ]; then
    DRIVER=$(sed -n 's/.*Kernel Module[^0-9]*\([0-9][0-9.]*\).*/\1/p' /proc/driver/nvidia/version | head -n 1)
fi
if [ -n "$DRIVER" ] && [ "${DRIVER%%.*}" -lt "$MIN_DRIVER_MAJOR" ]; then
    MISSING+=("an NVIDIA driver >= ${MIN_DRIVER_MAJOR} (R${MIN_DRIVER_MAJOR}, the minimum for CUDA ${CUDA_MAJOR}): this node has ${DRIVER}; torch ${TORCH_VERSION}'s CUDA ${CUDA_MAJOR} build would find no usable GPU")
fi

if [ "${#MISSING[@]}" -gt 0 ]; then
    echo "setup_gpu_env: cannot build the GPU environment; missing:" >&2
    printf '  - %s\n' "${MISSING[@]}" >&2
    exit 1
fi
[ -n "$DRIVER" ] || echo "setup_gpu_env: warning: no NVIDIA driver on this node (a login node?); the GPU nodes need R${MIN_DRIVER_MAJOR}+" >&2
[ -n "$CUDNN_INCLUDE" ] || echo "setup_gpu_env: no cuDNN headers on the system; looking in torch's nvidia-cudnn wheel after stage 1" >&2
echo "setup_gpu_env: nvcc $NVCC (CUDA $NVCC_VERSION), cuDNN headers ${CUDNN_INCLUDE:-from the wheel, after stage 1}, driver ${DRIVER:-none on this node}"
if [ "${1:-}" = "--check" ]; then exit 0; fi

# -- stage 1: torch, then justrl[gpu] without Transformer Engine -----------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
"${PIP[@]}" ${JUSTRL_TORCH_INDEX:+--index-url "$JUSTRL_TORCH_INDEX"} "$TORCH_REQ"
"${PIP[@]}" -e ".[gpu]"
TORCH_CUDA=$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "none")')
if [ "${TORCH_CUDA%%.*}" != "$CUDA_MAJOR" ]; then
    echo "setup_gpu_env: stage 1 installed a torch built for CUDA ${TORCH_CUDA} (expected ${CUDA_MAJOR}.x: a CPU or" \
         "another CUDA build from JUSTRL_TORCH_INDEX?); Transformer Engine ${TE_REQ[0]} needs CUDA ${CUDA_MAJOR}" >&2
    exit 1
fi

# -- stage 2: Transformer Engine, compiled against that torch ---------------------------------------
if [ -z "$CUDNN_INCLUDE" ]; then
    CUDNN_INCLUDE=$(find_cudnn || true)
    if [ -z "$CUDNN_INCLUDE" ]; then
        echo "setup_gpu_env: missing cuDNN >= ${MIN_CUDNN[0]}.${MIN_CUDNN[1]} headers (cudnn.h): not in \$CUDNN_PATH," \
             "\$CUDNN_HOME, \$CUDA_HOME/include, /usr/include nor torch's nvidia-cudnn wheel; install cuDNN" \
             "and set CUDNN_PATH" >&2
        exit 1
    fi
    if ! cudnn_version_ok "$CUDNN_INCLUDE"; then
        echo "setup_gpu_env: missing cuDNN >= ${MIN_CUDNN[0]}.${MIN_CUDNN[1]} headers: $CUDNN_INCLUDE has cuDNN $CUDNN_VERSION" >&2
        exit 1
    fi
fi
export CUDNN_PATH=${CUDNN_PATH:-$(dirname "$CUDNN_INCLUDE")}
"${PIP[@]}" "${TE_BUILD[@]}"
NVTE_FRAMEWORK=pytorch "${PIP[@]}" --no-build-isolation "${TE_REQ[0]}"

# -- Transformer Engine loads next to torch ---------------------------------------------------------
"$VENV/bin/python" - "$TORCH_VERSION" <<'PY'
import sys

import torch
import transformer_engine
import transformer_engine.pytorch as te  # loads the compiled extension: fails here on an ABI mismatch

want = sys.argv[1]
assert torch.__version__.split("+")[0] == want, f"torch {torch.__version__} after stage 2, expected {want}"
line = (f"justrl GPU environment ready: torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"transformer_engine {transformer_engine.__version__}")
if torch.cuda.is_available():
    layer = te.Linear(256, 256, params_dtype=torch.bfloat16).cuda()
    out = layer(torch.randn(32, 256, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "a Transformer Engine layer gave non-finite output"
    line += f", a TE layer ran on {torch.cuda.get_device_name()}"
else:
    line += " (no GPU visible here: the TE layer was not run)"
import megatron.core
import vllm

print(f"{line}; vllm {vllm.__version__}, megatron-core {megatron.core.__version__}")
PY
