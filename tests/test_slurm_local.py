"""The local single-node Slurm (slurm/setup_local_slurm.sh) runs justrl's environment in real jobs.

The Slurm parts of the toolkit (sbatch script, submitit launcher, requeue) build on this. Skipped
where no Slurm is running, except in CI, where .ci/run starts one and a missing Slurm is a failure.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _slurm_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm():
    if not _slurm_up():
        if os.environ.get("CI"):
            pytest.fail("no Slurm running in CI: .ci/run should have started it (slurm/setup_local_slurm.sh)")
        pytest.skip("no Slurm running here: start one with `bash slurm/setup_local_slurm.sh`")


def _wait_for(job_id: str, timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job_id])
        pytest.fail(f"job {job_id} still queued or running after {timeout_s}s")
    info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return info.split("JobState=", 1)[1].split()[0]


def test_sbatch_job_composes_the_config_in_the_project_env(slurm, tmp_path):
    code = "import justrl.config as c; print('VERIFIER', c.compose(['ablation=lenient']).reward.verifier)"
    out = tmp_path / "job.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-c1", "-J", "justrl-env-check", f"--chdir={tmp_path}", f"--output={out}",
         "--wrap", f"{sys.executable} -c \"{code}\""],
        check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
    assert _wait_for(job_id) == "COMPLETED", out.read_text() if out.exists() else "no output"
    assert "VERIFIER lenient" in out.read_text()
