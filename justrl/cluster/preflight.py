"""Check an allocation before any training: `python -m justrl.cluster.preflight <the launch's overrides>`.

    salloc --nodes=4 --gpus-per-node=8 --exclusive      # then, in that shell:
    python -m justrl.cluster.preflight model=openmath_nemotron_1.5b
    python -m justrl.cluster.preflight experiment=tiny          # outside Slurm: this machine only

Inside an allocation (a batch script or an salloc shell) it starts itself as one srun step with
one task per node; inside a job step it is that task. Every Slurm job of justrl runs it first
(slurm/train.sbatch before the learner's srun; submitit and hydra-submitit jobs from rank 0's
task, see `run_in_job`); `cluster.preflight=false` skips it there.

Each node checks, and the first node prints one table (a row per node):
- gpus: the GPUs the step sees (CUDA_VISIBLE_DEVICES, as Slurm set it) and, where nvidia-smi
  exists, their free memory; there must be cluster.gpus_per_node of them;
- versions: torch, vLLM, megatron-core, transformers, equal on every node (installed
  distributions, read without importing them);
- gpus: also that torch computes on them: where torch.cuda is unavailable (a driver too old for
  torch's CUDA, a CPU torch) the check fails naming the node, the driver, torch's CUDA version and
  torch.cuda.device_count(), unless the allocation says its GPUs are emulated
  (JUSTRL_EMULATED_GPUS=1, exported only by the emulated cluster's TaskProlog);
- rendezvous_port: the learner's torch.distributed port (justrl.cluster.placement.rendezvous_port) on the first
  node is free there and reachable from every node at the learner's MASTER_ADDR
  (placement.rendezvous_host: the user's MASTER_ADDR or the first node's Slurm NodeAddr), when the
  learner has more than one rank;
- address: the address this node announces for rendezvous (placement.announced_address: the
  GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME interface, else its Slurm NodeAddr) is one it can listen
  on, and every other node reaches it there;
- engine_ports: each GPU engine's port (justrl.cluster.placement.ENGINE_PORT_BASE + i) is free on its node;
- output_dir: trainer.output_dir is writable from every node, and shared_dir: a file written on
  one node is seen on all the others (the node results are exchanged through it);
- disk: room in the output directory for trainer.keep_checkpoints + 1 checkpoints (the one being
  written before the oldest goes) of CHECKPOINT_BYTES_PER_PARAM bytes per model parameter;
- model and tokenizer: model.path readable (config, every weight file) and its tokenizer loads;
- engine guard: a line per node under the table: the address its engines will listen on (its
  name as the first node resolves it; 127.0.0.1 for CPU engines beside the learner) and that the
  engines' guard (justrl.rollout.auth, every route asks for the job's secret) loads there;
- memory (cluster.placement=colocated on GPUs): one line with each GPU's budget, the engine's
  share and the learner rank's state while generating, the learner's peak and the sleeping
  engine while training (justrl.cluster.memory_budget: an estimate, said to be one; not a failed check).
A failed check exits non-zero naming the node and the check, before any training starts.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from justrl.config import ConfigError
from justrl.cluster.node_checks import CHECKS, failed, guard_loads, local_checks, package_versions, passed
from justrl.cluster.preflight_report import check_result, engine_lines, memory_lines, table

# The composed config handed from the launching process to the step's tasks.
CONFIG_ENV = "JUSTRL_PREFLIGHT_CONFIG"
# Seconds a node waits for the others' files in the shared output directory (env override for tests).
WAIT_ENV, WAIT_S = "JUSTRL_PREFLIGHT_WAIT_S", 120.0
# Set by slurm/train.sbatch for its learner step (to the job id): that job's preflight already ran.
DONE_ENV = "JUSTRL_PREFLIGHT_DONE"


class PreflightError(ConfigError):
    """A check failed; the message names the node(s) and the check(s)."""


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

    def __init__(self, port: int, host: str = ""):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
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
            return passed(f"{host}:{port} reachable")
    except OSError as exc:
        return failed(f"{host}:{port} not reachable: {exc}")


def _announce(address: str) -> tuple[dict, "_Listener | None"]:
    """This node's announced address, listened on (a free port) so that the others can try it."""
    try:
        listener = _Listener(0, address)
    except OSError as exc:
        return {"address": address, "port": None, "error": f"announces {address} but cannot listen there: {exc} "
                f"(not an address of this node: set GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME)"}, None
    return {"address": address, "port": listener.sock.getsockname()[1]}, listener


def _check_address(here: str, seen: dict[str, dict]) -> dict:
    """This node's announced address usable, and every other node's reachable from here."""
    own = seen[here]["announce"]
    if own.get("error"):
        return failed(own["error"])
    problems = []
    for node, report in seen.items():
        other = report.get("announce", {})
        if node == here:
            continue
        if other.get("port") is None:
            problems.append(f"{node} announces {other.get('address')}, where it cannot listen")
            continue
        result = _reachable(other["address"], other["port"])
        if not result["ok"]:
            problems.append(f"{node}'s {result['text']}")
    if problems:
        return failed(f"announces {own['address']}; " + "; ".join(problems))
    return passed(f"{own['address']}" + (f", reaches {len(seen) - 1} other node(s)" if len(seen) > 1 else ""))


def run_node(cfg: DictConfig, nodes: list[str], here: str, exchange: Path, rendezvous: tuple[str, int] | None,
             wait_s: float, address: str | None = None) -> int:
    """One node's part; the first node (nodes[0]) also gathers, prints the table and decides.
    `address`: what this node announces (placement.announced_address() when None).
    Returns the exit status: non-zero when a check failed (on the first node: on any node)."""
    from justrl.cluster.placement import announced_address

    first = here == nodes[0]
    report = {"hostname": socket.gethostname(), "versions": package_versions(), **local_checks(cfg, nodes, here),
              "engine_guard": guard_loads()}
    try:
        report["announce"], announcer = _announce(address or announced_address())
    except ConfigError as exc:
        report["announce"], announcer = {"address": None, "port": None, "error": str(exc)}, None
    listener = None
    if rendezvous and first:
        try:
            listener = _Listener(rendezvous[1])
        except OSError as exc:
            report["rendezvous_port"] = failed(f"cannot listen on {rendezvous[1]}: {exc}")
    try:
        try:
            exchange.mkdir(parents=True, exist_ok=True)
            _write_json(exchange / f"{here}.a.json", report)
            report["output_dir"] = passed("writable")
        except OSError as exc:
            report["output_dir"] = failed(f"{exchange.parent.parent} not writable: {type(exc).__name__}: {exc}")
            if first:
                return _finish(cfg, nodes, {here: report}, exchange, wait_s)
            return _own_failures(here, report)
        seen = _wait_for({n: exchange / f"{n}.a.json" for n in nodes}, wait_s)
        unseen = [n for n in nodes if n not in seen]
        report["shared_dir"] = (failed(f"does not see the files of {unseen} after {wait_s:.0f} s") if unseen
                                else passed(f"sees all {len(nodes)} nodes' files"))
        if not unseen:
            report["address"] = _check_address(here, seen)
        if rendezvous and "rendezvous_port" not in report:
            report["rendezvous_port"] = _reachable(*rendezvous)
        elif not rendezvous:
            report["rendezvous_port"] = passed("unused (one learner rank)")
        _write_json(exchange / f"{here}.b.json", report)
        if not first:
            return _own_failures(here, report)
        reports = _wait_for({n: exchange / f"{n}.b.json" for n in nodes}, wait_s)
        return _finish(cfg, nodes, reports, exchange, wait_s)
    finally:
        for open_listener in (listener, announcer):
            if open_listener:
                open_listener.close()


def _own_failures(here: str, report: dict) -> int:
    """A node other than the first says what failed on it (in the step's output, also when the
    first node never gets its result) and exits non-zero."""
    failed = [check for check in CHECKS if not check_result(report, check)["ok"]]
    for check in failed:
        print(f"preflight FAILED on node {here}: check {check}: {check_result(report, check)['text']}", file=sys.stderr,
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
        report["versions"] = {**versions, "check": failed("; ".join([f"{p} not installed" for p in missing] + differ))
                              if missing or differ else passed("")}
    failures = [(node, check, check_result(reports[node], check)["text"])
                for node in nodes if node in reports for check in CHECKS if not check_result(reports[node], check)["ok"]]
    failures += [(node, "shared_dir", f"no result from this node in {exchange} within {wait_s:.0f} s (not "
                                      f"writable or not shared there, or the task did not start: see its output)")
                 for node in nodes if node not in reports]
    failures += [(node, "engine_guard", reports[node]["engine_guard"]["text"]) for node in nodes
                 if node in reports and not reports[node].get("engine_guard", passed(""))["ok"]]
    lines = [table(cfg, nodes, reports), *engine_lines(cfg, nodes, reports), *memory_lines(cfg)]
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


# -- where it runs --------------------------------------------------------------------------------

def _wait_s() -> float:
    return float(os.environ.get(WAIT_ENV, WAIT_S))


def run_in_step(cfg: DictConfig) -> int:
    """This task's part in the preflight step (one task per node)."""
    from justrl.cluster.placement import allocation_nodes, learner_world_size, rendezvous_host, rendezvous_port

    if os.environ.get("SLURM_LOCALID", "0") != "0":
        return 0  # one task per node does the checks (srun asked for one; be safe if given more)
    nodes = allocation_nodes()
    here = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    job, step = os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_STEP_ID", "0")
    # A requeued job keeps its id and numbers its steps from 0 again: the restart count keeps the
    # attempts apart (a stale file of the previous attempt would pass for a node's answer).
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    exchange = Path(cfg.trainer.output_dir).absolute() / "preflight" / f"job{job}-r{restart}-step{step}"
    rendezvous = (rendezvous_host(nodes), rendezvous_port(job)) if learner_world_size(cfg.cluster) > 1 else None
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
    return [*cmd, sys.executable, "-m", "justrl.cluster.preflight"]


def run_as_step(cfg: DictConfig) -> int:
    """From a batch script, an salloc shell or a task of the job: run the preflight as an srun
    step over all of the job's nodes; returns its exit status."""
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or cfg.cluster.nodes)
    env = {**os.environ, CONFIG_ENV: OmegaConf.to_yaml(cfg)}
    return subprocess.run(srun_command(cfg, nodes), env=env).returncode


def run_in_job(cfg: DictConfig) -> None:
    """At the start of a Slurm job's learner tasks (justrl.cluster.slurm.run_in_allocation): rank 0's task
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
    from justrl.cluster.placement import in_slurm_task

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
        sys.exit(f"justrl.cluster.preflight: {exc}")
