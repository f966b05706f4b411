#!/usr/bin/env python
"""Learner throughput at the recipe's model shape: megatron vs hf, on one GPU, in one run.

    .venv/bin/python benchmarks/learner_throughput.py [--tokens-per-micro-batch 16384] [--micro-batches 4]

Builds a random-weight Qwen2 model of DeepSeek-R1-Distill-Qwen-1.5B's shape (hidden 1536, 28
layers, 12 heads, 2 KV heads, FFN 8960, vocabulary 151936, untied; no download), a GRPO step of
responses of 1k-8k tokens packed into micro-batches of `--tokens-per-micro-batch`, and times
each learner's `train_step` (old log-probs forward, then forward + backward + optimizer step,
one mini-batch) after a warm-up step. Prints tokens per second and MFU for both and compares them
with the targets: MFU >= 40% and megatron >= 1.5x hf.

MFU counts the model's matmul FLOPs once (2 per parameter per token forward, twice that
backward, the causal attention's 2 L^2 d per layer forward), not activation recomputation:
4 x the forward FLOPs per step (one forward for the old log-probs, one forward + backward for
the update), over the step's time and the GPU's dense bf16 peak (H100/H200: 989 TFLOP/s; other
GPUs: set JUSTRL_PEAK_TFLOPS).

Without a CUDA GPU (or without Transformer Engine, which learner=megatron needs on GPUs) it
prints why and exits 0 having measured nothing.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

QWEN2_1_5B = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536,
              "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 131072, "tie_word_embeddings": False, "hidden_act": "silu"}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}
TARGET_MFU, TARGET_SPEEDUP = 0.40, 1.5


def peak_flops() -> float:
    if "JUSTRL_PEAK_TFLOPS" in os.environ:
        return float(os.environ["JUSTRL_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    sys.exit(f"unknown GPU {name!r}: set JUSTRL_PEAK_TFLOPS to its dense bf16 peak")


def write_random_model(out: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_1_5B)).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()


def make_step(tokens: int, seed: int = 0):
    """GRPO groups of 8 (advantages summing to 0) of 1k-8k-token responses, about `tokens` in all,
    trimmed to a multiple of 8 sequences."""
    from justrl.grpo import Sequence

    rng = random.Random(seed)
    seqs: list[Sequence] = []
    while sum(len(s) for s in seqs) < tokens or len(seqs) % 8:
        prompt = tuple(rng.randrange(151000) for _ in range(200))
        response = tuple(rng.randrange(151000) for _ in range(rng.randint(1000, 8000)))
        seqs.append(Sequence(prompt, response, rng.choice([-1.0, 1.0])))
    return seqs


def model_flops(seqs, shape: dict) -> float:
    """Forward matmul FLOPs of one pass over `seqs` (excluding the embedding lookup)."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * shape["intermediate_size"]
    params = layers * per_layer + shape["vocab_size"] * h  # + the output layer
    tokens = sum(len(s) for s in seqs)
    attention = sum(2 * len(s) ** 2 * h * layers for s in seqs)
    return 2 * params * tokens + attention


def time_learner(name: str, model_dir: Path, seqs, micro_tokens: int) -> float:
    from justrl.config import compose
    from justrl.learner import build_learner

    cfg = compose([f"learner={name}", "cluster=local", "learner.tensor_parallel_size=1", "learner.dtype=bfloat16",
                   "learner.gradient_checkpointing=true", f"learner.micro_batch_tokens={micro_tokens}",
                   "rollout.n=8", f"algorithm.prompts_per_step={len(seqs) // 8}",
                   f"algorithm.mini_batch_prompts={len(seqs) // 8}", "optim.warmup_steps=0"])
    learner = build_learner(cfg, model_dir)
    learner.train_step(seqs)  # warm-up: allocations, kernels, optimizer state
    torch.cuda.synchronize()
    start = time.perf_counter()
    learner.train_step(seqs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"  {name}: {seconds:.2f} s, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del learner
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-per-micro-batch", type=int, default=16384)
    parser.add_argument("--micro-batches", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("learner_throughput: SKIPPED, no CUDA GPU here (this benchmark measures the GPU learners)")
        return
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        print("learner_throughput: SKIPPED, Transformer Engine is not installed (learner=megatron needs it on GPUs)")
        return

    import torch.distributed as dist

    from justrl.cluster.placement import free_port

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))

    seqs = make_step(args.tokens_per_micro_batch * args.micro_batches)
    tokens = sum(len(s) for s in seqs)
    flops = 4 * model_flops(seqs, QWEN2_1_5B)
    peak = peak_flops()
    print(f"{datetime.date.today()} {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"Qwen2-1.5B shape, random weights; {len(seqs)} sequences, {tokens} tokens, "
          f"micro-batches of {args.tokens_per_micro_batch} tokens")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        write_random_model(model_dir)
        for name in ("megatron", "hf"):
            seconds = time_learner(name, model_dir, seqs, args.tokens_per_micro_batch)
            results[name] = {"tokens_per_s": tokens / seconds, "mfu": flops / seconds / peak, "seconds": seconds}
    for name, r in results.items():
        print(f"{name:>9}: {r['tokens_per_s']:10.0f} tokens/s   MFU {100 * r['mfu']:5.1f}%")
    speedup = results["megatron"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    mfu_ok, speed_ok = results["megatron"]["mfu"] >= TARGET_MFU, speedup >= TARGET_SPEEDUP
    print(f"megatron / hf: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x: {'PASS' if speed_ok else 'FAIL'}); "
          f"megatron MFU target >= {100 * TARGET_MFU:.0f}%: {'PASS' if mfu_ok else 'FAIL'}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "tokens": tokens, **results, "speedup": speedup}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
