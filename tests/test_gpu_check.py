"""tools/gpu_check.sh / tools/gpu_check.py (issue 24, "a GPU check ready to run").

The check itself needs a GPU (not run on one yet: docs/gpu.md). Here: without CUDA it stops at
once with exit code 2, and its CPU dry run (`--device cpu --tiny`) builds the same table with the
real hf learner on a tiny random Qwen2 and two short packed rows: every row there, no FAILED,
every number finite, the bf16 log-probs close to fp32, the varlen attention equal to dense SDPA
with the block mask and far from dense SDPA that ignores the sequence boundaries. What only a GPU
shows (MFU, flash-attn, peak memory on the device, the 1.5B shape, the Megatron row, the memory
the colocated row's engine frees) is not tested; the colocated row's order and probe check run
on vLLM's CPU build (slow test).
"""
import importlib.util
import io
import math
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def parse(table: str) -> dict[str, dict[str, str]]:
    rows = {}
    for line in table.splitlines()[3:-1]:  # header, column names, rule ... total
        name, _, result = line.partition(" | ")
        rows[name.strip()] = dict(item.split("=", 1) for item in result.split(", ")) if "=" in result else {"": result}
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the check would run")
def test_without_cuda_the_script_stops_with_exit_code_2():
    out = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "no CUDA device: this check needs a GPU" in out.stderr and out.stdout == ""


def test_cpu_dry_run_builds_the_table_with_finite_numbers():
    gpu_check = load_gpu_check()
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = gpu_check.main(["--device", "cpu", "--tiny", "--no-megatron", "--no-colocated"])
    table = buffer.getvalue()
    assert code == 0, table
    assert "FAILED" not in table
    assert table.splitlines()[0].startswith("justrl GPU check: cpu, torch ")
    assert table.splitlines()[-1].startswith("total ")
    rows = parse(table)
    assert list(rows) == ["hf step (bf16)", "hf log-probs bf16 vs fp32", "varlen vs dense SDPA",
                          "megatron step (local, TP=1)", "colocated step (vLLM sleep)"]
    assert rows["colocated step (vLLM sleep)"] == {"skipped": "--no-colocated"}
    step = rows["hf step (bf16)"]
    assert int(step["tokens"]) == gpu_check.ROWS * gpu_check.TINY_ROW_TOKENS == 192
    for key in ("step_s", "peak_mem_GiB", "grad_norm"):
        assert math.isfinite(float(step[key])) and float(step[key]) > 0, (key, step)
    assert step["attention"] == "justrl_varlen"  # no flash-attn on a CPU
    assert step["MFU"].startswith("n/a")  # no peak FLOP/s for a CPU
    logprobs = rows["hf log-probs bf16 vs fp32"]
    assert 0 < float(logprobs["max_abs_diff"]) < 0.05
    assert math.isfinite(float(logprobs["mean_logprob"])) and float(logprobs["mean_logprob"]) < 0
    varlen = rows["varlen vs dense SDPA"]
    same, ignored = float(varlen["max_abs_diff"]), float(varlen["if_boundaries_ignored"])
    assert same < 0.01 and ignored > 10 * same, varlen  # the comparison can tell a leaking mask apart
    assert math.isfinite(float(varlen["varlen_fwd_s"])) and math.isfinite(float(varlen["dense_fwd_s"]))
    assert rows["megatron step (local, TP=1)"] == {"skipped": "--no-megatron"}


def test_peak_flops_are_named_per_gpu_kind():
    gpu_check = load_gpu_check()
    assert gpu_check.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_bf16_flops("NVIDIA GeForce RTX 3090") is None


def test_a_failing_row_prints_failed_and_the_others_still_run():
    gpu_check = load_gpu_check()
    rows = [gpu_check.guarded("boom", lambda: 1 / 0), gpu_check.guarded("fine", lambda: {"x": 1.5})]
    text = gpu_check.render(rows, "header")
    assert text.splitlines()[0] == "header"
    assert "boom                           | FAILED ZeroDivisionError: division by zero" in text
    assert "fine                           | x=1.5" in text


@pytest.mark.slow
def test_cpu_dry_run_of_the_colocated_step_with_a_real_engine():
    """The colocated row on vLLM's CPU build: the engine sleeps, the learner steps, the engine wakes
    for the weights, reloads the export and wakes for its KV cache; its probe then equals the
    learner's (and the step moved the probe by more than twice the tolerance, so a missed reload
    would fail). The memory the sleep frees is GPU-only (nan here: the CPU worker keeps it)."""
    gpu_check = load_gpu_check()
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = gpu_check.main(["--device", "cpu", "--tiny", "--no-megatron"])
    table = buffer.getvalue()
    assert code == 0, table
    row = parse(table)["colocated step (vLLM sleep)"]
    assert math.isnan(float(row["engine_freed_GiB"]))
    assert float(row["probe_diff"]) <= float(row["tolerance"]) == 0.05
    assert float(row["probe_moved"]) > 2 * float(row["tolerance"])
    for key in ("sleep_s", "wake_weights_s", "reload_s", "wake_kv_s", "train_s"):
        assert 0 < float(row[key]) < 60, (key, row)
