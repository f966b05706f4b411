"""Start one vLLM server on the devices the placement planned, from inside its own process.

    python -m justrl.rollout.launch [--gpus 2,3] [--cpu-kv-cache-gb N] -- <vLLM server arguments...>

Why a launcher: an engine on another node runs as an `srun --overlap` step of the training job,
and slurmstepd writes the step's own `CUDA_VISIBLE_DEVICES` (every GPU of the step's GRES) over
whatever the caller exported; and overlapping steps that each ask for `--gres=gpu:1` are all
given the same first GPU (seen on Slurm 22.05, slurm/README.md). So the step asks for all of the
job's GPUs on its node, and this launcher, running inside the step, narrows them to the planned
ones: planned index i is the i-th device the process can see (its `CUDA_VISIBLE_DEVICES` as
Slurm set it, or 0..n-1 when unset), which also holds where the job got only part of a node's
GPUs and Slurm renumbered them.

It logs one line, `justrl-engine: {json}`, with the hostname, the Slurm node and step, the
devices the step gave and the ones the server will use, and the compute: vLLM on those GPUs when
torch sees CUDA; otherwise (CPU nodes, or the emulated GPU cluster of slurm/setup_emulated_cluster.sh)
vLLM's CPU build on this node's CPUs, with the CPU-only arguments and tensor parallel size 1 (the
GPUs stay "held" in CUDA_VISIBLE_DEVICES, so placement is checked all the same). Then it execs
the server: the process (and its pid, which justrl.rollout.guard and srun signal) becomes vLLM.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys

from justrl.cluster.placement import cuda_facts, emulated_gpus, no_cuda_message

# The line tests and people grep for in an engine's log.
LOG_PREFIX = "justrl-engine: "
# vLLM's CPU build (0.32) crashes ("CPU Generator does not use offset") when a seeded request's
# prefill is split by chunked prefill; CPU engines therefore run without chunked prefill.
CPU_ENGINE_ARGS = ("--enforce-eager", "--no-enable-chunked-prefill")
# vLLM's sleep mode (colocated placement): on GPUs it needs the cumem allocator this turns on;
# vLLM's CPU platform refuses it ("Sleep mode is not supported on current platform",
# vllm/config/model.py, is_sleep_mode_available), while its /sleep and /wake_up routes still
# answer (the CPU worker does nothing), so a CPU engine runs without it.
SLEEP_MODE_ARGS = ("--enable-sleep-mode",)
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class PlacementError(RuntimeError):
    """The planned devices are not among those this process can see."""


def visible_devices(env: dict) -> list[str] | None:
    """The CUDA devices this process may use, as listed in `CUDA_VISIBLE_DEVICES`; None: unset
    (every device of the machine)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [d.strip() for d in value.split(",") if d.strip()]


def select_devices(planned: list[int], visible: list[str] | None, where: str = "") -> list[str]:
    """The `CUDA_VISIBLE_DEVICES` entries of the planned device indices: planned index i is the
    i-th visible device (itself when nothing is set)."""
    if visible is None:
        return [str(i) for i in planned]
    missing = [i for i in planned if not 0 <= i < len(visible)]
    if missing:
        raise PlacementError(f"{where or socket.gethostname()}: planned GPU(s) {missing} but this process sees only "
                             f"CUDA_VISIBLE_DEVICES={','.join(visible) or '(empty)'}; the engine's srun step must "
                             f"hold all of the job's GPUs on its node (--gres=gpu:<gpus_per_node>)")
    return [visible[i] for i in planned]


def _replace_arg(args: list[str], name: str, value: str) -> list[str]:
    out, i = [], 0
    while i < len(args):
        if args[i] == name and i + 1 < len(args):
            out += [name, value]
            i += 2
        elif args[i].startswith(name + "="):
            out.append(f"{name}={value}")
            i += 1
        else:
            out.append(args[i])
            i += 1
    return out


def plan_command(planned: list[int], vllm_args: list[str], env: dict, cuda: bool,
                 cpu_kv_cache_gb: int = 1) -> tuple[list[str], dict, dict]:
    """(server arguments, environment, report) for an engine planned on `planned` GPU indices
    (empty: a CPU engine). `cuda`: whether torch sees a GPU here."""
    env = dict(env)
    step_devices = visible_devices(env)
    report = {"hostname": socket.gethostname(), "slurm_node": env.get("SLURMD_NODENAME"),
              "slurm_job": env.get("SLURM_JOB_ID"), "slurm_step": env.get("SLURM_STEP_ID"),
              "step_cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"), "planned_gpus": planned}
    args = list(vllm_args)
    if planned:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(select_devices(planned, step_devices, report["hostname"]))
    report["cuda_visible_devices"] = env.get("CUDA_VISIBLE_DEVICES")
    if planned and cuda:
        report["compute"] = "cuda"
    elif planned and not emulated_gpus(env):
        raise PlacementError(no_cuda_message(env.get("SLURMD_NODENAME") or report["hostname"], cuda_facts(),
                                             len(planned)))
    else:
        report["compute"] = "cpu"
        if planned:
            report["note"] = ("torch.cuda is unavailable: vLLM's CPU build on this node's CPUs stands in for "
                              f"the {len(planned)} planned GPU(s), tensor parallel size 1")
            args = _replace_arg(args, "--tensor-parallel-size", "1")
        args += [a for a in CPU_ENGINE_ARGS if a not in args]
        if any(a in args for a in SLEEP_MODE_ARGS):
            args = [a for a in args if a not in SLEEP_MODE_ARGS]
            report["sleep_mode"] = "the CPU build has none: /sleep and /wake_up answer and keep the memory"
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gb))
        # No torch.compile in a CPU engine: the model already runs eagerly (--enforce-eager), and
        # the one compiled function left, vLLM's rank count for prompt log-probs (the weight
        # check's probe), was compiled by inductor on the first sync: 20-23 s of a fresh
        # machine's first step (C++ compiled with gcc), 2.5 s with its cache (2026-12-02).
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
    report["server"] = server_module(report["compute"], env)
    return args, env, report


def server_module(compute: str, env: dict) -> str:
    """The module that runs the server: justrl.rollout.vllm_cpu_server (the worker inside the engine-core
    process) for a CPU engine whose worker justrl bound to one core, vLLM's own server otherwise."""
    bind = env.get("VLLM_CPU_OMP_THREADS_BIND", "")
    one_core = bind.strip().isdigit()
    return "justrl.rollout.vllm_cpu_server" if compute == "cpu" and one_core else SERVER_MODULE


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: python -m justrl.rollout.launch [--gpus 0,1] [--cpu-kv-cache-gb N] -- <vLLM args...>",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m justrl.rollout.launch")
    parser.add_argument("--gpus", default="", help="planned GPU indices on this node, comma-separated")
    parser.add_argument("--cpu-kv-cache-gb", type=int, default=1)
    opts = parser.parse_args(argv[:split])
    planned = [int(g) for g in opts.gpus.split(",") if g.strip()]
    try:
        args, env, report = plan_command(planned, argv[split + 1:], dict(os.environ),
                                         cuda=bool(planned) and _cuda_available(),
                                         cpu_kv_cache_gb=opts.cpu_kv_cache_gb)
    except PlacementError as exc:
        print(f"justrl.rollout.launch: {exc}", file=sys.stderr, flush=True)
        return 3
    print(LOG_PREFIX + json.dumps(report, sort_keys=True), flush=True)
    # Slurm signals every step of a job, not only the learner's: submitit's --signal=USR2@...,
    # `scancel --signal=USR1` without --batch, pre-emption warnings. An engine step's server
    # would die of them (the emulated cluster showed it: "task 0: User defined signal 1"); the
    # training loop acts on them and stops the engines itself. Ignored dispositions survive exec.
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    cmd = [sys.executable, "-m", report["server"], *args]
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
