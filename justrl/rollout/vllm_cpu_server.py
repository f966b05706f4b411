"""vLLM's OpenAI server for a CPU engine whose worker computes on one core, with the worker in the
engine-core process (vLLM's uniprocess executor) instead of a process of its own.

    python -m justrl.rollout.vllm_cpu_server <vLLM server arguments...>

justrl.rollout.launch runs this instead of `vllm.entrypoints.openai.api_server` for such engines
(a local CPU engine whose share of the machine is one worker core: the embedded default on a
2-core machine). Why: vLLM's CPU platform (0.32, `CpuPlatform.check_and_update_config`) always
switches the uniprocess executor to its multiprocess one, so that it can set each worker's OpenMP
environment (thread count and core list) before the worker's torch starts. With one worker core
there is nothing to set (justrl gives every engine process `OMP_NUM_THREADS=1`), and the extra
process only costs: each decoding step is handed from the engine core to the worker and back
through shared memory, the two spinning against each other. Measured on the 2-core VM
(2026-12-02, 16 prompts x 8 samples on the tiny model): a rollout of the toy's short answers took
0.16-0.23 s in one process where the worker process took 0.18-0.53 s (one run in three about
0.2 s slower), 256-token responses 2.8-2.9 s vs 2.8-3.5 s; and one process fewer starts (about 7 s
of start-up). Everything else is vLLM's server as it is.

The engine core is forked from this server process instead of spawned. vLLM's CPU platform also
sets `VLLM_WORKER_MULTIPROC_METHOD=spawn`, for the same reason (a fresh OpenMP runtime per
worker); the uniprocess engine core needs no fresh one, and a spawned one imports vLLM again:
about 9 s of an engine's start on the 2-core VM (2026-12-02: engine core up 9 s after the server's
first log line when spawned, the same second when forked). Forking the engine core from the
server is what vLLM does by default on GPU machines.

What is lost: vLLM's multiprocess executor pins its worker to `VLLM_CPU_OMP_THREADS_BIND`; the
uniprocess one pins nothing, so the engine core (which now computes) floats over the machine's
cores. The engines are frozen while the learner trains, so this only matters with several engines
on one machine, which then share all cores instead of one each. Pinning the forked engine core to
its core from an at-fork hook was tried (2026-12-02) and made the embedded default's step no
faster (0.61-0.65 s pinned against 0.56-0.60 s floating, alternating runs), so it floats.
"""
from __future__ import annotations

import os
import runpy
import sys

from vllm.platforms.cpu import CpuPlatform

_check_and_update_config = CpuPlatform.check_and_update_config.__func__


def _uniprocess_executor(cls, vllm_config) -> None:
    _check_and_update_config(cls, vllm_config)
    if vllm_config.parallel_config.world_size == 1:
        vllm_config.parallel_config.distributed_executor_backend = "uni"
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"


# The server process builds the engine's config (the executor choice and the start method with it)
# and hands it to the engine core it forks, so patching here is enough.
CpuPlatform.check_and_update_config = classmethod(_uniprocess_executor)

if __name__ == "__main__":
    sys.argv = ["vllm.entrypoints.openai.api_server", *sys.argv[1:]]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
