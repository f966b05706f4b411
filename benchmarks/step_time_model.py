"""A model of the JustRL recipe's step time on a GPU allocation, from named assumptions.

No GPU was available to measure any of this: every number below is an assumption with its source,
and the printed table is an estimate. One factor is fitted: `efficiency`, which scales both the
decode bandwidth efficiency and the learner's MFU so that the model reproduces the authors' ~324 s
per step on 32 A800s (their veRL setup: rollout and training colocated on all 32 GPUs). The same
factor is then used for every other placement and for the H100, so the table compares placements
and modes under one consistent set of assumptions; it does not predict absolute times better than
the calibration does.

The step (256 prompts x 8 samples, responses up to 15,360 tokens):

    rollout  each engine decodes its share; one decode iteration costs
             t_iter = t_fixed + (weights + KV of the active sequences) / (HBM bandwidth x eff_bw)
                      + 2 N x active / (peak FLOPs x eff_flops)
             and iterates until its longest response ends (the tail). All of an engine's sequences
             are admitted at once (128 per engine at 16 engines, under vLLM's 256-sequence limit and
             its KV capacity, which the table checks), so dispatch cannot shorten the tail here: the
             least-loaded dispatch matters when engines are over-subscribed or fail
             (benchmarks/dispatch.py measures that case on a CPU).
    train    FLOPs = tokens x (6N + attention) for the update, + tokens x (2N + attention) for the
             old log-probs, + the recomputation (none: the Megatron learner's default for the 1.5B
             models at 16k tokens, docs/megatron.md; full: another 2N + attention, veRL's FSDP);
             time = FLOPs / (learner GPUs x peak x MFU).
    sync     files: one writer (rank 0) writes the bf16 export, every engine reads it from the shared
             filesystem and reloads; nccl: the export is still written (restarts use it) and the
             weights are broadcast from rank 0 over the NCCL group instead of read by the engines.
    check    one probe forward per engine and on the learner: ~0.1 s (assumption).

Modes: sync (max_policy_lag=0): rollout + train + sync. overlap (max_policy_lag=1):
max(rollout, train + export) + the engines' load + check (the engines wait for nothing but the
reload; the learner waits only when the rollout is longer than its update). slept (justrl's
colocated default, cluster.placement=colocated): every GPU generates, then every GPU trains;
rollout + train + sync + the sleep mode's cost per step (the bf16 weights to host memory and back
over PCIe, the KV pool's release and re-map, three HTTP calls); its engines hold 64 sequences
each (2048 / 32) in rollout.gpu_memory_utilization=0.8.

Inputs measured on this CPU (2026-11-22, see README) serve as checks of the model's structure,
not as GPU inputs: benchmarks/overlap.py measures the CPU step time at lag 0 and 1, which the
max() above must bound from below.

    .venv/bin/python benchmarks/step_time_model.py [--mean-response 7000] [--clip 0.05]
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Assumption:
    value: float
    unit: str
    source: str


# -- the model (DeepSeek-R1-Distill-Qwen-1.5B; OpenMath-Nemotron-1.5B has the same Qwen2-1.5B shape)
MODEL = {
    "params_total": Assumption(1.777e9, "parameters", "config.json: 28 layers x hidden 1536, FFN 8960, vocab 151936, untied output layer"),
    "params_compute": Assumption(1.54e9, "parameters", "non-embedding 1.31e9 + output layer 0.23e9 (the input embedding is a lookup)"),
    "layers": Assumption(28, "", "config.json"),
    "hidden": Assumption(1536, "", "config.json"),
    "kv_bytes_per_token": Assumption(28 * 2 * 2 * 128 * 2, "bytes", "28 layers x (K, V) x 2 KV heads x head dim 128 x bf16"),
}
# -- the recipe's workload
WORKLOAD = {
    "responses": Assumption(2048, "per step", "256 prompts x n=8 (hydra_conf/config.yaml)"),
    "max_response": Assumption(15360, "tokens", "rollout.max_response_length"),
    "prompt_mean": Assumption(200, "tokens", "assumption: DAPO-Math problem + chat template + suffix (justrl's prompt builder drops > 1024)"),
    "response_mean": Assumption(7000, "tokens", "assumption: DeepSeek-R1-Distill-Qwen-1.5B at T=1 on competition math writes ~6-9k tokens on average; the paper's length curve is the source to replace this with"),
    "clip_fraction": Assumption(0.05, "", "assumption: share of responses cut at 15,360 (response_length/clip_ratio)"),
    "length_sigma": Assumption(0.7, "", "assumption: log-normal spread of the unclipped lengths"),
}
# -- hardware (dense bf16 peak, HBM bandwidth): vendor datasheets
HARDWARE = {
    "A800": {"peak_flops": Assumption(312e12, "FLOP/s", "NVIDIA A800/A100 80GB SXM datasheet, bf16 dense"),
             "hbm_bw": Assumption(2.039e12, "B/s", "A800 80GB SXM datasheet, HBM2e"),
             "hbm_bytes": Assumption(80e9, "B", "datasheet"),
             "nic_bw": Assumption(25e9, "B/s", "assumption: one 200 Gb/s HDR InfiniBand NIC per GPU")},
    "H100": {"peak_flops": Assumption(989e12, "FLOP/s", "NVIDIA H100 SXM datasheet, bf16 dense"),
             "hbm_bw": Assumption(3.35e12, "B/s", "H100 SXM datasheet, HBM3"),
             "hbm_bytes": Assumption(80e9, "B", "datasheet"),
             "nic_bw": Assumption(50e9, "B/s", "assumption: one 400 Gb/s NDR InfiniBand NIC per GPU")},
}
# -- system efficiencies before calibration (multiplied by the fitted `efficiency`)
SYSTEM = {
    "eff_bw": Assumption(0.75, "", "assumption: vLLM decode reaches ~70-80% of HBM bandwidth on large batches"),
    "eff_flops_decode": Assumption(0.5, "", "assumption: decode GEMMs at batch <= 256"),
    "t_fixed": Assumption(2.0e-3, "s/iteration", "assumption: vLLM V1 scheduling + CUDA-graph launch per decode iteration"),
    "mfu_megatron": Assumption(0.40, "", "assumption: Megatron-core with TE at TP=1, 16k-token packed rows (Megatron-LM reports 40-47% on larger GPTs)"),
    "mfu_fsdp": Assumption(0.30, "", "assumption: veRL's FSDP actor (the authors' setup)"),
    "gpu_mem_util": Assumption(0.85, "", "rollout.gpu_memory_utilization"),
    "fs_write_bw": Assumption(2e9, "B/s", "assumption: one writer to a parallel filesystem"),
    "fs_read_bw_total": Assumption(10e9, "B/s", "assumption: aggregate read bandwidth of the shared filesystem"),
    "reload_overhead": Assumption(2.0, "s", "assumption: vLLM reload_weights bookkeeping + prefix-cache reset"),
    "nccl_overhead": Assumption(1.0, "s", "assumption: start/update/finish round trips, packed buffers"),
    "check_s": Assumption(0.1, "s", "assumption: one probe forward per engine and on the learner"),
    "colocated_switch": Assumption(10.0, "s", "assumption: veRL hybrid engine: vLLM wake/sleep + in-memory resharding per step"),
    # justrl colocated (cluster.placement=colocated, justrl/rollout/phases.py): sleep(1), wake(weights),
    # push, wake(kv_cache) per step, each engine on its own GPU at once
    "gpu_mem_util_colocated": Assumption(0.8, "", "rollout.gpu_memory_utilization when colocated (docs/colocated.md)"),
    "pcie_bw": Assumption(20e9, "B/s", "assumption: PCIe Gen4 x16 host<->GPU copies, pinned memory (~25 GB/s peak)"),
    "sleep_wake_fixed": Assumption(2.0, "s", "assumption: vLLM's cumem unmap/remap of the KV cache pool and the scheduler's pause/resume, both directions"),
    "engine_call_s": Assumption(0.01, "s", "each /sleep and /wake_up call's own cost: medians 3-8 ms on one CPU engine (benchmarks/colocated_calls.py, 2026-12-04, docs/benchmarks.md)"),
    "ipc_overhead": Assumption(1.0, "s", "assumption: CUDA IPC handles of every tensor to the engine on the same GPU, its copy at HBM speed (vLLM's ipc weight transfer: justrl/weight_sync/ipc.py, not run on a GPU)"),
}

ATTN_FLOPS_PER_TOKEN_CTX = 4  # QK^T and AV: 2 matmuls x 2 FLOP per multiply-add, per layer x hidden x context


def response_lengths(w: dict, seed: int = 0) -> np.ndarray:
    """The step's response lengths: log-normal with the given mean, a share cut at the limit."""
    rng = np.random.default_rng(seed)
    n, limit = int(w["responses"].value), int(w["max_response"].value)
    clipped = int(round(n * w["clip_fraction"].value))
    sigma = w["length_sigma"].value
    # the unclipped part's mean is chosen so that the whole step's mean is response_mean
    unclipped_mean = (w["response_mean"].value * n - clipped * limit) / (n - clipped)
    mu = math.log(unclipped_mean) - sigma ** 2 / 2
    body = np.minimum(rng.lognormal(mu, sigma, n - clipped), limit - 1).astype(int)
    lengths = np.concatenate([body, np.full(clipped, limit)])
    return rng.permutation(lengths)


def engine_time(lengths: np.ndarray, hw: dict, eff: float, prompt: float) -> tuple[float, float]:
    """Seconds to decode `lengths` on one engine (all admitted at once), and its peak KV bytes."""
    if len(lengths) == 0:
        return 0.0, 0.0
    steps = np.arange(1, int(lengths.max()) + 1)
    srt = np.sort(lengths)
    active = len(srt) - np.searchsorted(srt, steps, side="left")  # sequences still decoding at step k
    # context of the active sequences: prompt + k each
    kv = active * (prompt + steps) * MODEL["kv_bytes_per_token"].value
    weights = MODEL["params_total"].value * 2
    t = (SYSTEM["t_fixed"].value
         + (weights + kv) / (hw["hbm_bw"].value * SYSTEM["eff_bw"].value * eff)
         + 2 * MODEL["params_compute"].value * active / (hw["peak_flops"].value * SYSTEM["eff_flops_decode"].value * eff))
    return float(t.sum()), float(kv.max())


def rollout_time(lengths: np.ndarray, engines: int, hw: dict, eff: float, prompt: float) -> tuple[float, float]:
    """The slowest engine's time (contiguous shares of whole prompt groups) and the peak KV share."""
    groups = lengths.reshape(-1, 8)
    shares = np.array_split(groups, engines)
    times = [engine_time(s.reshape(-1), hw, eff, prompt) for s in shares]
    return max(t for t, _ in times), max(k for _, k in times)


def train_time(lengths: np.ndarray, gpus: int, hw: dict, mfu: float, eff: float, prompt: float,
               recompute: str = "none") -> float:
    tokens = float(np.sum(lengths + prompt))
    # mean attention context per token of a causal sequence of length L is (L + 1) / 2
    ctx = float(np.sum((lengths + prompt) ** 2 / 2)) / tokens
    n, lh = MODEL["params_compute"].value, MODEL["layers"].value * MODEL["hidden"].value
    attn_fwd = ATTN_FLOPS_PER_TOKEN_CTX * lh * ctx
    per_token = (6 * n + 3 * attn_fwd) + (2 * n + attn_fwd)  # update + old log-probs
    if recompute not in ("none", "full"):
        raise ValueError(f"recompute must be none or full, got {recompute!r}")
    per_token += 2 * n + attn_fwd if recompute == "full" else 0.0
    return tokens * per_token / (gpus * hw["peak_flops"].value * mfu * eff)


def sync_time(engines: int, hw: dict, transport: str) -> tuple[float, float]:
    """(seconds the learner spends writing, seconds until every engine serves the new weights)."""
    w = MODEL["params_total"].value * 2
    export = w / SYSTEM["fs_write_bw"].value
    if transport == "files":
        load = engines * w / SYSTEM["fs_read_bw_total"].value + SYSTEM["reload_overhead"].value
    elif transport == "ipc":  # from the learner rank on the same GPU: no filesystem read, no network
        load = w / hw["hbm_bw"].value + SYSTEM["ipc_overhead"].value
    else:
        load = w / hw["nic_bw"].value + SYSTEM["nccl_overhead"].value
    return export, load + SYSTEM["check_s"].value


def sleep_wake_time() -> float:
    """justrl's colocated sleep(1) + wake(weights) + wake(kv_cache) of a step: the bf16 weights to
    host memory and back over PCIe, the KV pool's unmap and remap, three calls."""
    w = MODEL["params_total"].value * 2
    return 2 * w / SYSTEM["pcie_bw"].value + SYSTEM["sleep_wake_fixed"].value + 3 * SYSTEM["engine_call_s"].value


@dataclass(frozen=True)
class Placement:
    name: str
    learner_gpus: int
    engine_gpus: int
    mode: str  # sync | overlap | colocated (veRL's hybrid engine) | slept (justrl colocated: sleep mode)
    transport: str = "files"  # files | nccl | ipc | memory (veRL)
    learner: str = "megatron"


def step_time(p: Placement, hw: dict, eff: float, lengths: np.ndarray) -> dict:
    prompt = WORKLOAD["prompt_mean"].value
    mfu = SYSTEM["mfu_fsdp" if p.learner == "fsdp" else "mfu_megatron"].value
    roll, kv_peak = rollout_time(lengths, p.engine_gpus, hw, eff, prompt)
    train = train_time(lengths, p.learner_gpus, hw, mfu, eff, prompt,
                       recompute="full" if p.learner == "fsdp" else "none")
    if p.mode == "colocated":
        export, load = 0.0, SYSTEM["colocated_switch"].value
        total = roll + train + load
    elif p.mode == "slept":
        export, load = sync_time(p.engine_gpus, hw, p.transport)
        load += sleep_wake_time()
        total = roll + train + export + load
    else:
        export, load = sync_time(p.engine_gpus, hw, p.transport)
        total = roll + train + export + load if p.mode == "sync" else max(roll, train + export) + load
    util = SYSTEM["gpu_mem_util_colocated" if p.mode == "slept" else "gpu_mem_util"].value
    kv_room = hw["hbm_bytes"].value * util - MODEL["params_total"].value * 2 - 2e9
    return {"rollout": roll, "train": train, "sync": export + load, "step": total, "kv_fits": kv_peak <= kv_room}


PLACEMENTS = [
    Placement("authors: veRL, colocated on 32 (calibration)", 32, 32, "colocated", "memory", "fsdp"),
    Placement("justrl default: colocated on 32, sleep mode, CUDA IPC", 32, 32, "slept", "ipc"),
    Placement("colocated on 32, sleep mode, files (the fallback)", 32, 32, "slept", "files"),
    Placement("16 learner / 16 engines, sync, files", 16, 16, "sync", "files"),
    Placement("16 / 16, sync, nccl", 16, 16, "sync", "nccl"),
    Placement("16 / 16, overlap (lag 1), nccl", 16, 16, "overlap", "nccl"),
    Placement("12 / 20, overlap (lag 1), nccl", 12, 20, "overlap", "nccl"),
    Placement("8 / 24, overlap (lag 1), nccl", 8, 24, "overlap", "nccl"),
    Placement("8 / 24, sync, nccl", 8, 24, "sync", "nccl"),
    Placement("24 / 8, overlap (lag 1), nccl", 24, 8, "overlap", "nccl"),
    Placement("8 / 24, overlap (lag 1), files", 8, 24, "overlap", "files"),
]


def calibrate(target: float, lengths: np.ndarray) -> float:
    """The efficiency factor for which the authors' placement on A800 takes `target` seconds."""
    lo, hi = 0.05, 3.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if step_time(PLACEMENTS[0], HARDWARE["A800"], mid, lengths)["step"] > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mean-response", type=float, default=WORKLOAD["response_mean"].value)
    parser.add_argument("--clip", type=float, default=WORKLOAD["clip_fraction"].value)
    parser.add_argument("--paper-step-s", type=float, default=324.0, help="the authors' seconds per step on 32 A800s")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--assumptions", action="store_true", help="print every assumption and its source")
    args = parser.parse_args()
    WORKLOAD["response_mean"] = replace(WORKLOAD["response_mean"], value=args.mean_response)
    WORKLOAD["clip_fraction"] = replace(WORKLOAD["clip_fraction"], value=args.clip)
    if args.assumptions:
        for group in (MODEL, WORKLOAD, SYSTEM):
            for key, a in group.items():
                print(f"{key:22s} {a.value:>12.4g} {a.unit:12s} {a.source}")
        for name, hw in HARDWARE.items():
            for key, a in hw.items():
                print(f"{name}.{key:17s} {a.value:>12.4g} {a.unit:12s} {a.source}")
        print()

    lengths = response_lengths(WORKLOAD)
    eff = calibrate(args.paper_step_s, lengths)
    print(f"responses: mean {lengths.mean():.0f} tokens, max {lengths.max()}, {WORKLOAD['clip_fraction'].value:.0%} "
          f"cut at the limit; fitted efficiency factor {eff:.2f} (the authors' 32 x A800 at {args.paper_step_s:.0f} s)")
    rows = []
    for hw_name in ("A800", "H100"):
        hw = HARDWARE[hw_name]
        for p in PLACEMENTS:
            r = step_time(p, hw, eff, lengths)
            rows.append((hw_name, p.name, r))
    if args.markdown:
        print("| GPUs | placement, mode, sync | rollout s | train s | sync s | step s | vs 324 s |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for hw_name, name, r in rows:
            note = "" if r["kv_fits"] else " (KV over capacity)"
            print(f"| 32 x {hw_name} | {name}{note} | {r['rollout']:.0f} | {r['train']:.0f} | {r['sync']:.0f} | "
                  f"{r['step']:.0f} | {r['step'] / args.paper_step_s:.2f} |")
    else:
        print(f"{'GPUs':10s} {'placement, mode, sync':52s} {'rollout':>8s} {'train':>7s} {'sync':>6s} {'step':>7s} {'/324':>6s}")
        for hw_name, name, r in rows:
            note = "" if r["kv_fits"] else "  KV over capacity"
            print(f"32x{hw_name:7s} {name:52s} {r['rollout']:8.0f} {r['train']:7.0f} {r['sync']:6.1f} {r['step']:7.0f} "
                  f"{r['step'] / args.paper_step_s:6.2f}{note}")


if __name__ == "__main__":
    main()
