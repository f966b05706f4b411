"""justrl.cluster.preflight: each node's checks, the exchange through the shared output directory, the
table, and failures that name the node and the check. The Slurm tests run it as a job step on the
single-node Slurm (slurm/setup_local_slurm.sh): alone, and at the start of a train.sbatch job and
of a submitit job, where a failed check ends the job before any learner starts."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from justrl.cluster import node_checks

from justrl.cluster import preflight
from justrl.config import compose

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=tiny", "trainer.total_steps=30", "trainer.save_every=10", "trainer.keep_checkpoints=2"]


def _cfg(tmp_path, model_dir, *overrides):
    return compose([*TINY, f"model.path={model_dir}", f"trainer.output_dir={tmp_path / 'run'}", *overrides])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_node_passes_and_prints_the_table(random_tiny_model_dir, tmp_path, capsys):
    cfg = _cfg(tmp_path, random_tiny_model_dir)
    assert preflight.run_here(cfg) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith(f"| {socket.gethostname()} |")]
    assert len(row) == 1 and "FAIL" not in row[0]
    versions = node_checks.package_versions()
    assert all(v for v in versions.values())
    assert f"| {versions['torch']} | {versions['vllm']} | {versions['megatron-core']} | {versions['transformers']} |" \
        in row[0]
    # disk: (keep_checkpoints + 1) checkpoints of 16 bytes per parameter, parameters from the headers
    with safe_open(str(random_tiny_model_dir / "model.safetensors"), "pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    assert node_checks.model_parameters(random_tiny_model_dir) == params
    need = 3 * params * node_checks.CHECKPOINT_BYTES_PER_PARAM
    assert "for 3 checkpoints" in row[0] and node_checks._size(need) in row[0]
    assert out.strip().endswith("preflight: all checks passed on 1 node(s)")
    assert (tmp_path / "run" / "preflight").is_dir()
    # the engines' line: outside Slurm they listen on loopback, with their guard
    assert f"engines on {socket.gethostname()}: {cfg.rollout.engines}, listening on 127.0.0.1, guard on " \
           "(every route asks for the job's secret)" in out.splitlines()


def test_an_engine_guard_that_does_not_load_fails(random_tiny_model_dir, tmp_path, capsys, monkeypatch):
    from justrl.rollout import auth as engine_auth

    monkeypatch.setattr(engine_auth, "MIDDLEWARE", "justrl.rollout.auth.NoSuchMiddleware")
    assert preflight.run_here(_cfg(tmp_path, random_tiny_model_dir)) == 1
    out = capsys.readouterr().out
    assert f"preflight FAILED on node {socket.gethostname()}: check engine_guard: " \
           "justrl.rollout.auth.NoSuchMiddleware does not load: AttributeError" in out
    assert "guard FAIL: justrl.rollout.auth.NoSuchMiddleware does not load" in out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_missing_model_and_unwritable_output_name_node_and_check(tmp_path, capsys):
    here = socket.gethostname()
    cfg = _cfg(tmp_path, tmp_path / "no_model", "model.build_tiny_if_missing=false")
    assert preflight.run_here(cfg) == 1
    out = capsys.readouterr().out
    assert f"preflight FAILED on node {here}: check model: model.path={tmp_path / 'no_model'}: no such directory" in out
    assert f"preflight FAILED on node {here}: check tokenizer: no model directory" in out

    (tmp_path / "a_file").write_text("")
    cfg = compose([*TINY, f"trainer.output_dir={tmp_path / 'a_file' / 'run'}", "model.build_tiny_if_missing=true",
                   f"model.path={tmp_path / 'built_later'}"])
    assert preflight.run_here(cfg) == 1
    out = capsys.readouterr().out
    assert f"preflight FAILED on node {here}: check output_dir: {tmp_path / 'a_file' / 'run'} not writable: " \
           f"NotADirectoryError" in out
    assert "built at start-up (model.build_tiny_if_missing)" in out


def _two_nodes(cfg, exchanges, rendezvous, wait_s=30.0):
    """Two nodes' run_node in threads of this process, as two tasks of a step would run it."""
    results, nodes = {}, ["node1", "node2"]

    def node(name, exchange):
        results[name] = preflight.run_node(cfg, nodes, name, exchange, rendezvous, wait_s)

    threads = [threading.Thread(target=node, args=(n, e)) for n, e in zip(nodes, exchanges)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_nodes_exchange_through_the_shared_directory(random_tiny_model_dir, tmp_path, capsys):
    cfg = _cfg(tmp_path, random_tiny_model_dir)
    port = _free_port()
    exchange = tmp_path / "run" / "preflight" / "job1-step0"
    assert _two_nodes(cfg, [exchange, exchange], ("127.0.0.1", port)) == {"node1": 0, "node2": 0}
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| node1 |", "| node2 |"))]
    assert [r.split(" | ")[0] for r in rows] == ["| node1", "| node2"]
    assert all(f"127.0.0.1:{port} reachable" in r and "sees all 2 nodes' files" in r for r in rows)
    assert all("| 127.0.0.1, reaches 1 other node(s) |" in r for r in rows)  # the announced addresses
    assert json.loads((exchange / "node2.b.json").read_text())["rendezvous_port"]["ok"]
    assert (exchange / "table.md").read_text().startswith("justrl preflight: 2 node(s)")


def test_a_node_that_does_not_share_the_directory_is_named(random_tiny_model_dir, tmp_path, capsys):
    cfg = _cfg(tmp_path, random_tiny_model_dir)
    shared, elsewhere = tmp_path / "run" / "preflight" / "x", tmp_path / "node2_local" / "preflight" / "x"
    results = _two_nodes(cfg, [shared, elsewhere], None, wait_s=3.0)
    assert results == {"node1": 1, "node2": 1}
    captured = capsys.readouterr()
    assert "preflight FAILED on node node1: check shared_dir: does not see the files of ['node2'] after 3 s" \
        in captured.out
    assert "preflight FAILED on node node2: check shared_dir: no result from this node" in captured.out
    assert "preflight FAILED on node node2: check shared_dir: does not see the files of ['node1'] after 3 s" \
        in captured.err


def test_busy_rendezvous_and_engine_ports_fail(random_tiny_model_dir, tmp_path, capsys, monkeypatch):
    from justrl.cluster.placement import ENGINE_PORT_BASE

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setattr(node_checks, "PORT_GRACE_S", 2.0)  # a port that stays busy is retried, then fails
    cfg = _cfg(tmp_path, random_tiny_model_dir, "cluster.gpus_per_node=4", "cluster.learner_gpus=2")
    assert node_checks.engine_ports_here(cfg, ["node1"], "node1") == [ENGINE_PORT_BASE, ENGINE_PORT_BASE + 1]
    port = _free_port()
    with socket.socket() as engine_port, socket.socket() as rendezvous:
        try:
            engine_port.bind(("", ENGINE_PORT_BASE))
        except OSError:
            pass  # already in use on this machine: busy all the same
        rendezvous.bind(("", port))
        rendezvous.listen(1)
        status = preflight.run_node(cfg, ["node1"], "node1", tmp_path / "run" / "preflight" / "p", ("127.0.0.1", port),
                                    5.0)
    assert status == 1
    out = capsys.readouterr().out
    assert f"preflight FAILED on node node1: check engine_ports: in use: [{ENGINE_PORT_BASE}" in out
    assert f"preflight FAILED on node node1: check rendezvous_port: cannot listen on {port}" in out
    assert "| node1 | " in out and "0,1,2,3; free memory: none (no nvidia-smi)" in out


# What torch.cuda would report on a working GPU node (a stand-in: there is no CUDA here).
CUDA_NODE = {"driver": "580.65.06", "torch": "2.13.0", "torch_cuda": "13.0", "device_count": 2, "available": True}


def test_gpu_count_must_match_the_allocation(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert node_checks.check_gpus(2, facts=CUDA_NODE)["ok"]
    assert "torch CUDA 13.0, driver 580.65.06" in node_checks.check_gpus(2, facts=CUDA_NODE)["text"]
    result = node_checks.check_gpus(4, facts=CUDA_NODE)
    assert not result["ok"] and "sees 2 GPU(s), cluster.gpus_per_node=4" in result["text"]
    result = node_checks.check_gpus(2, facts={**CUDA_NODE, "device_count": 1})
    assert not result["ok"] and "torch.cuda.device_count()=1 of 2 GPU(s)" in result["text"]


def test_a_gpu_allocation_without_cuda_fails_unless_emulated(random_tiny_model_dir, tmp_path, capsys, monkeypatch):
    """This machine's torch has no CUDA (the real one, no stand-in): a node that Slurm gives GPUs
    fails the preflight, named with its driver, torch's CUDA and device count; with the emulated
    cluster's JUSTRL_EMULATED_GPUS=1 the same node passes, saying it computes on the CPU."""
    import torch

    from justrl.cluster.placement import EMULATED_ENV

    assert not torch.cuda.is_available()
    here = socket.gethostname()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.delenv(EMULATED_ENV, raising=False)
    base = _free_port()  # the two engines' ports: free ones (other runs on this machine hold 8100...)
    while not node_checks.port_free(base + 1):
        base = _free_port()
    monkeypatch.setattr("justrl.cluster.placement.ENGINE_PORT_BASE", base)
    cfg = _cfg(tmp_path, random_tiny_model_dir, "cluster.gpus_per_node=4", "cluster.learner_gpus=2")
    assert preflight.run_here(cfg) == 1
    out = capsys.readouterr().out
    assert (f"preflight FAILED on node {here}: check gpus: 0,1,2,3; free memory: none (no nvidia-smi): node {here}: "
            f"Slurm gives this task 4 GPU(s) but torch.cuda is unavailable (NVIDIA driver none loaded, torch "
            f"{torch.__version__} built for CUDA none (a CPU build), torch.cuda.device_count()=0)") in out
    assert f"{EMULATED_ENV}=1 (the emulated cluster does)" in out
    monkeypatch.setenv(EMULATED_ENV, "1")
    assert preflight.run_here(cfg) == 0
    out = capsys.readouterr().out
    assert f"0,1,2,3; free memory: none (no nvidia-smi); emulated ({EMULATED_ENV}=1): CPU compute" in out
    assert "preflight: all checks passed on 1 node(s)" in out
    # anything but "1" is no emulation flag
    monkeypatch.setenv(EMULATED_ENV, "yes")
    assert not node_checks.check_gpus(4)["ok"]


def test_each_nodes_announced_address_must_be_reachable(random_tiny_model_dir, tmp_path, capsys):
    """Each node listens on the address it announces and every other node connects to it: a node
    announcing an address that is not its own (192.0.2.254: TEST-NET, on no interface here)
    fails, and the other node says it cannot reach it."""
    cfg = _cfg(tmp_path, random_tiny_model_dir)
    exchange = tmp_path / "run" / "preflight" / "addr"
    results, nodes = {}, ["node1", "node2"]
    addresses = {"node1": "127.0.0.1", "node2": "192.0.2.254"}

    def node(name):
        results[name] = preflight.run_node(cfg, nodes, name, exchange, None, 30.0, address=addresses[name])

    threads = [threading.Thread(target=node, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"node1": 1, "node2": 1}
    captured = capsys.readouterr()
    assert ("preflight FAILED on node node2: check address: announces 192.0.2.254 but cannot listen there: "
            in captured.out)
    assert ("preflight FAILED on node node1: check address: announces 127.0.0.1; node2 announces 192.0.2.254, where "
            "it cannot listen") in captured.out


# -- on the single-node Slurm --------------------------------------------------------------------

def _slurm_up() -> bool:
    return shutil.which("sbatch") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm():
    if not _slurm_up():
        if os.environ.get("CI"):
            pytest.fail("no Slurm running in CI: .ci/run should have started it (slurm/setup_local_slurm.sh)")
        pytest.skip("no Slurm running here: start one with `bash slurm/setup_local_slurm.sh`")


def _wait(job_id: str, timeout_s: float = 900) -> str:
    deadline = time.monotonic() + timeout_s
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} still queued or running after {timeout_s} s")
        time.sleep(2)
    info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return info.split("JobState=", 1)[1].split()[0] if "JobState=" in info else "?"


def _sbatch(tmp_path, *args) -> str:
    env = dict(os.environ, JUSTRL_PYTHON=sys.executable)
    return subprocess.run(["sbatch", "--parsable", f"--chdir={tmp_path}", *args], env=env, capture_output=True,
                          text=True, check=True).stdout.strip().split(";")[0]


@pytest.mark.slow
def test_preflight_step_in_a_slurm_job(slurm, random_tiny_model_dir, tmp_path):
    """Run by hand in an allocation (here: a batch job): one srun step, the table, exit 0."""
    out = tmp_path / "job.out"
    job = _sbatch(tmp_path, "-J", "justrl-preflight", "-c1", f"--output={out}", "--wrap",
                  f"{sys.executable} -m justrl.cluster.preflight {' '.join(TINY)} cluster=slurm cluster.gpus_per_node=0 "
                  f"cluster.learner_gpus=0 model.path={random_tiny_model_dir} trainer.output_dir={tmp_path / 'run'}")
    assert _wait(job) == "COMPLETED", out.read_text()
    text = out.read_text()
    assert "preflight: all checks passed on 1 node(s)" in text
    tables = list((tmp_path / "run" / "preflight").glob(f"job{job}-r*-step*/table.md"))
    assert len(tables) == 1 and tables[0].read_text().strip() in text


@pytest.mark.slow
def test_train_sbatch_stops_before_the_learner_when_a_check_fails(slurm, tmp_path):
    out = tmp_path / "train.out"
    run = tmp_path / "run"
    job = _sbatch(tmp_path, "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={out}",
                  str(REPO / "slurm" / "train.sbatch"), *TINY, f"model.path={tmp_path / 'no_model'}",
                  "model.build_tiny_if_missing=false", f"trainer.output_dir={run}")
    assert _wait(job) == "FAILED"
    text = out.read_text()
    assert f"check model: model.path={tmp_path / 'no_model'}: no such directory" in text
    assert "preflight FAILED on node " in text
    assert "justrl-learner: " not in text and not (run / "train.log").exists()  # no learner started


@pytest.mark.slow
def test_submitit_job_stops_when_a_check_fails(slurm, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "justrl.launch", *TINY, "cluster=slurm", "cluster.nodes=1", "cluster.gpus_per_node=0",
         "cluster.learner_gpus=0", "cluster.cpus_per_task=1", "cluster.exclusive=false",
         f"model.path={tmp_path / 'no_model'}", "model.build_tiny_if_missing=false", f"trainer.output_dir={run}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    job = result.stdout.split("submitted Slurm job ", 1)[1].split(";")[0]
    assert _wait(job) == "FAILED"
    logs = "".join(p.read_text() for p in (run / "submitit").glob(f"{job}_*_log.*"))
    assert f"check model: model.path={tmp_path / 'no_model'}: no such directory" in logs
    assert "preflight failed (exit status 1)" in logs
    assert not (run / "train.log").exists()
