"""vLLM engines: how one is started and stopped. The one owner of engine construction.

`EngineProcess` is one server (vLLM's OpenAI-compatible server with its development endpoints on,
`VLLM_SERVER_DEV_MODE=1`): a subprocess here, or an srun step on another node of the job; only how
it is started differs. `build_engines` turns a run's placements (justrl.cluster.placement) into
engines, for training, evaluation and the judge alike. The HTTP calls are justrl.rollout.client's;
dispatch over several engines is justrl.rollout.fleet's.

Every route of every engine asks for the run's secret (justrl.rollout.auth): the server gets it in
its environment and checks it in its `--middleware`. A remote engine listens on its node's cluster
address (the one its client connects to), a local one on 127.0.0.1.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from justrl.rollout.auth import MIDDLEWARE, SECRET_ENV, new_secret
from justrl.rollout.client import SERVED_MODEL_NAME, EngineClient, EngineError
from justrl.rollout.guard import group_members, wait_for_group_exit
from justrl.cluster.placement import ENGINE_PORT_BASE, EnginePlacement, engine_bind_address, engine_step_cpus, free_port

log = logging.getLogger(__name__)

# Mixed into every engine's vLLM worker; the file weight sync calls its justrl_reload_weights.
WORKER_EXTENSION = "justrl.rollout.vllm_worker.ReloadExtension"
# Lines of an engine's log quoted in an error message.
LOG_TAIL_LINES = 30
# How long a stopped engine may take to exit (server, then the rest of its group) before SIGKILL.
STOP_TIMEOUT_S = 20.0
# How long the engine's HTTP server keeps an idle connection open (vLLM's default is 5 s). The
# client pools its connections and reuses them a step later; with 5 s, a connection the server was
# closing just as the next step's request went out failed as "Remote end closed connection without
# response" (seen on a 256-token benchmark run, 2026-12-02), and the engine was restarted for it.
HTTP_KEEP_ALIVE_S = 24 * 3600


def _ignore_preemption_signals() -> None:
    """Run in the engine's process before exec: Slurm and submitit send their pre-emption
    signals (SIGUSR1/SIGUSR2) to every process of the job, and their default action would kill
    the server mid-step; the training loop handles them. Ignored dispositions survive exec."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def engine_srun_command(spec: EngineSpec) -> list[str]:
    """The srun prefix of a remote engine: a step of the running job on `spec.node` that
    overlaps the learner's step (shares its CPUs, memory and GPUs), holds all of the job's GPUs
    and CPUs on that node and all its memory, and binds no CPUs (engines and learner ranks on one
    node would otherwise be pinned to the same cores)."""
    cmd = ["srun", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={spec.node}", "--export=ALL",
           "--mem=0", "--cpu-bind=none", "--kill-on-bad-exit=1"]
    if spec.node_gpus:
        cmd.append(f"--gres=gpu:{spec.node_gpus}")
    if spec.node_cpus:
        cmd.append(f"--cpus-per-task={spec.node_cpus}")
    return [*cmd, *spec.srun_args]


def engine_cpu_shares(engines: int, cpus: list[int] | None = None) -> list[tuple[int, ...]]:
    """Each of `engines` local CPU engines' cores: contiguous, disjoint shares of this process's
    usable cores (`os.sched_getaffinity`); with more engines than cores, engines share cores
    round-robin. vLLM's own automatic binding would give every engine of the machine the same
    first cores."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else list(cpus)
    if engines <= 0 or not cpus:
        return [() for _ in range(max(engines, 0))]
    if engines > len(cpus):
        return [(cpus[i % len(cpus)],) for i in range(engines)]
    return [tuple(cpus[len(cpus) * i // engines:len(cpus) * (i + 1) // engines]) for i in range(engines)]


def engine_thread_env(spec: "EngineSpec") -> dict[str, str]:
    """The engine's thread settings, chosen by justrl and never inherited from the user's
    `OMP_NUM_THREADS` (a cluster's `OMP_NUM_THREADS=16` made CPU rollouts 4x slower: the API
    server and engine-core processes spun 16 OpenMP threads against the worker).

    CPU engine: its API server and engine core do no heavy math (1 thread); the worker computes
    on the engine's cores (`VLLM_CPU_OMP_THREADS_BIND`, vLLM then runs one OpenMP thread per
    core) less the last one, left to the server and scheduler as vLLM's own binding does
    (`reserve_cpu_num`); a one-core share is the worker's. GPU or remote engine: nothing set (the
    caller drops `OMP_NUM_THREADS`), so vLLM picks its workers' thread count itself
    (vllm.v1.executor.multiproc_executor)."""
    if spec.gpu_ids or spec.node:
        return {}
    env = {"OMP_NUM_THREADS": "1"}
    if spec.cpu_ids:
        worker = spec.cpu_ids[:-1] if len(spec.cpu_ids) > 1 else spec.cpu_ids
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, worker))
    return env


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class EngineSpec:
    """How to start one local vLLM server."""

    max_model_len: int
    dtype: str
    seed: int
    tensor_parallel_size: int = 1
    gpu_ids: tuple[int, ...] = ()
    """CUDA devices of this engine; empty: vLLM's CPU build."""
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gb: int = 1
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    """Extra environment of the server (a weight transport's, justrl.weight_sync.registry.engine_env_for)."""
    node: str | None = None
    """Run the server on this node of the Slurm job (an `srun --overlap` step); None: here."""
    port: int | None = None
    """Fixed port (remote engines); None: a free port of this machine."""
    srun_args: tuple[str, ...] = ()
    """Extra srun arguments for remote engines."""
    node_gpus: int = 0
    """GPUs the job holds on `node`: the engine's srun step asks for all of them (--overlap steps
    share them) and justrl.rollout.launch narrows them to `gpu_ids` inside the step."""
    node_cpus: int = 0
    """CPUs the job holds on `node`, all of them given to the (overlapping) engine step; 0: srun's default."""
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 3600.0
    cpu_ids: tuple[int, ...] = ()
    """This machine's cores the engine's vLLM worker computes on (a local CPU engine; see
    `engine_cpu_shares`); empty: vLLM's own choice."""


def engine_spec(engine, *, max_model_len: int, seed: int, **overrides) -> EngineSpec:
    """The one way an `EngineSpec` is made from config: `engine` is the section of
    justrl.config.ENGINE_KEYS (training's `rollout`, evaluation's `engine`); `overrides` set what
    the caller decides (dtype for the judge, the extra arguments of a weight transport...)."""
    fields = dict(dtype=engine.dtype, tensor_parallel_size=engine.tensor_parallel_size,
                  gpu_memory_utilization=engine.gpu_memory_utilization, cpu_kv_cache_gb=engine.cpu_kv_cache_gb,
                  extra_args=tuple(engine.engine_args), startup_timeout_s=engine.startup_timeout_s,
                  request_timeout_s=engine.request_timeout_s)
    fields.update(overrides)
    return EngineSpec(max_model_len=max_model_len, seed=seed, **fields)


class EngineProcess:
    """One vLLM server process that justrl starts, stops, freezes and restarts: a subprocess of
    this machine, or, when `spec.node` is set, an `srun --overlap` step of the current Slurm job on
    that node (the srun process is the subprocess; stopping it stops the remote server).

    Its stdout and stderr go to `log_path`, appended across restarts.
    """

    def __init__(self, name: str, spec: EngineSpec, log_path: str | Path, secret: str | None = None):
        self.name = name
        self.spec = spec
        self.log_path = Path(log_path)
        # The run's engine secret (justrl.rollout.auth.job_secret); None: one of this engine's own.
        # A restart keeps it.
        self.secret = secret or new_secret()
        self.process: subprocess.Popen | None = None
        self.client: EngineClient | None = None

    def start(self, model_dir: str | Path) -> None:
        """Start serving `model_dir` and wait until the server answers /health."""
        spec = self.spec
        port = spec.port or free_port()
        host = engine_bind_address(spec.node)
        # justrl.rollout.launch runs where the server runs (inside the srun step for a remote
        # engine): it sets CUDA_VISIBLE_DEVICES to the planned GPUs there, because slurmstepd
        # overwrites what we export with the step's GRES; it picks CPU or GPU vLLM arguments,
        # logs the hostname and devices the server sees, and execs the server.
        cmd = [sys.executable, "-m", "justrl.rollout.launch", "--gpus", ",".join(map(str, spec.gpu_ids)),
               "--cpu-kv-cache-gb", str(spec.cpu_kv_cache_gb), "--",
               "--model", str(model_dir), "--served-model-name", SERVED_MODEL_NAME,
               "--host", host, "--port", str(port), "--dtype", spec.dtype,
               "--max-model-len", str(spec.max_model_len), "--seed", str(spec.seed),
               "--tensor-parallel-size", str(spec.tensor_parallel_size),
               "--gpu-memory-utilization", str(spec.gpu_memory_utilization),
               "--worker-extension-cls", WORKER_EXTENSION, "--middleware", MIDDLEWARE, *spec.extra_args]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # see engine_thread_env
        env.update(VLLM_SERVER_DEV_MODE="1", VLLM_HTTP_TIMEOUT_KEEP_ALIVE=str(HTTP_KEEP_ALIVE_S),
                   **engine_thread_env(spec), **dict(spec.extra_env), **{SECRET_ENV: self.secret})
        if spec.node:
            cmd = [*engine_srun_command(spec), *cmd]
        # The guard takes the server down if this process dies without cleaning up (kill -9).
        cmd = [sys.executable, "-m", "justrl.rollout.guard", str(os.getpid()), "--", *cmd]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== justrl: starting {self.name}: {' '.join(cmd)}\n".encode())
            out.flush()
            # A session of its own, so that stop() takes vLLM's engine-core children down with it.
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=_ignore_preemption_signals)
        self.client = EngineClient(f"http://{host}:{port}", spec.request_timeout_s, secret=self.secret)
        deadline = time.monotonic() + spec.startup_timeout_s
        while (status := self.client.health_status()) != 200:
            if status in (401, 403):  # a server that is not this one (another job's engine on the port)
                self.stop()
                raise EngineError(f"{self.name}: {self.client.url} refuses this run's secret (HTTP {status}): another "
                                  f"job's engine holds the port? (log: {self.log_path}):\n{self.log_tail()}")
            if self.process.poll() is not None:
                raise EngineError(f"{self.name} exited with code {self.process.returncode} while starting "
                                  f"(log: {self.log_path}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(f"{self.name} did not answer /health within {spec.startup_timeout_s:.0f} s "
                                  f"(log: {self.log_path}):\n{self.log_tail()}")
            time.sleep(0.5)
        log.info("%s serving %s at %s (pid %d)", self.name, model_dir, self.client.url, self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def can_freeze(self) -> bool:
        """Only a CPU engine on this machine competes with the learner for its cores."""
        return self.spec.node is None and not self.spec.gpu_ids

    def freeze(self) -> None:
        """Stop the engine's processes (SIGSTOP) so that they use no CPU while the learner trains.

        Why signals and not vLLM's endpoints: on the CPU build (0.32) `/sleep` is a no-op
        (CPUWorker.sleep logs "sleep mode is not supported on CPU"), and `/pause` only holds the
        scheduler, while the worker keeps spinning on its shared-memory queue for
        `busy_loop_s` = 1 s after each read (vllm/distributed/device_communicators/shm_broadcast.py,
        SpinCondition) and the API server's event loop keeps running. The guard process (the group
        leader, see justrl.rollout.guard) is left running, so that it still takes the engine down if
        this process dies; SIGKILL ends stopped processes too."""
        if self.can_freeze() and self.alive():
            for pid in group_members(self.process.pid):
                if pid != self.process.pid:
                    _signal(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Continue a frozen engine (SIGCONT; harmless on a running one)."""
        if self.can_freeze() and self.alive():
            try:
                os.killpg(self.process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def process_tree_cpu_seconds(self) -> float:
        """User + system CPU seconds of the engine's processes (read from /proc/<pid>/stat)."""
        return sum(_cpu_seconds(pid) for pid in group_members(self.process.pid)) if self.process else 0.0

    def stop(self) -> None:
        """Take the engine down and return once every process of it has exited (on this machine:
        a Slurm engine's processes on another node are its srun step's to end)."""
        if self.process is None:
            return
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGTERM)
            os.killpg(group, signal.SIGCONT)  # a frozen engine (see `freeze`) acts on it
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            _kill_group(group)
            self.process.wait()
        # The guard waits for the group; if it was killed instead, what it left is ended here.
        if wait_for_group_exit(group, STOP_TIMEOUT_S):
            _kill_group(group)
            wait_for_group_exit(group, STOP_TIMEOUT_S)
        self.process = None

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])


def build_engines(placements: list[EnginePlacement], spec: EngineSpec, log_dir: str | Path, *,
                  node_gpus: int = 0, names: list[str] | None = None, secret: str | None = None) -> list[EngineProcess]:
    """The engines of `placements`, all started with `spec` (its placement fields are filled in
    here): engine i is named `names[i]` (default `engine<i>`) and logs to `<log_dir>/<name>.log`.
    All of them check `secret` (default: a fresh one of this process, justrl.rollout.auth).
    An engine on a node (an srun step of the job) listens on ENGINE_PORT_BASE + i, holds the
    node's `node_gpus` GPUs and all the job's CPUs there; CPU engines on this machine get disjoint
    shares of its cores (`engine_cpu_shares`)."""
    names = names or [f"engine{i}" for i in range(len(placements))]
    secret = secret or new_secret()
    local_cpu = [i for i, p in enumerate(placements) if p.node is None and not p.gpu_ids]
    cpu_ids = dict(zip(local_cpu, engine_cpu_shares(len(local_cpu))))
    return [EngineProcess(names[i], replace(spec, gpu_ids=tuple(p.gpu_ids), node=p.node,
                                            port=ENGINE_PORT_BASE + i if p.node else None,
                                            node_gpus=node_gpus if p.node else 0,
                                            node_cpus=engine_step_cpus(p.node), cpu_ids=cpu_ids.get(i, ())),
                          Path(log_dir) / f"{names[i]}.log", secret)
            for i, p in enumerate(placements)]
