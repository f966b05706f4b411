"""One table of what the learners do on one GPU: `bash tools/gpu_check.sh` (issue 24, "a GPU check").

For a single-GPU machine without vLLM, Transformer Engine or network (e.g. one H200, Python 3.12,
torch 2.11 CUDA, transformers 5.17; megatron-core if it travelled as a wheel). Rows, each guarded
(a failure prints `FAILED <reason>` in its row and the others still run):

  hf step           the hf learner (justrl.learner.hf) in bf16 on a random Qwen2 of the 1.5B shape
                    (DeepSeek-R1-Distill-Qwen-1.5B's config, built here: no download), one GRPO
                    step over 16384-token packed rows: step time, peak memory, MFU
  hf log-probs      the bf16 forward's log-probs against the same weights in fp32 (max |diff|)
  varlen vs dense   the learner's varlen attention (flash-attn where importable, else justrl's SDPA
                    over the packed position ids) against transformers' dense SDPA (a block-diagonal
                    mask from the position ids), same rows and weights: max |log-prob diff|, time
  megatron step     the Megatron learner (local layer spec, TP=1) on the same GPU, if megatron_core
                    imports (rows of MEGATRON_ROW_TOKENS: the local spec's attention keeps its L x L
                    scores), step time, peak memory, max |log-prob diff| against the hf learner
  colocated step    if vLLM imports: a vLLM engine (--enable-sleep-mode) and the hf learner on the
                    same GPU, as cluster.placement=colocated runs them: the memory the engine's
                    sleep(1) frees, a learner step in it (time, peak), the wake(weights), on a GPU
                    the CUDA-IPC push of the learner's weights (rollout.weight_sync=ipc), wake(kv_cache),
                    and the reload of the learner's export (the files sync) times, and the engine's
                    probe log-probs against the learner's after each (justrl.weight_sync.sync's
                    check); it fails when they differ beyond the bf16 tolerance or the engine is
                    still asleep

MFU = 6 * N * tokens / step time / the GPU's peak dense bf16 FLOP/s (`PEAK_BF16_FLOPS`, by
torch.cuda.get_device_name; N: every parameter but the input embedding's, which is a lookup).
`--device cpu --tiny` builds everything at a tiny size on the CPU (what tests/test_gpu_check.py runs);
without a GPU and without `--device cpu` it exits 2. Not run on a GPU yet (docs/gpu.md).
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

NO_CUDA = "no CUDA device: this check needs a GPU"
# Peak dense bf16 tensor-core FLOP/s (no sparsity), from NVIDIA's data sheets, by a substring of
# torch.cuda.get_device_name(). Checked in order: the first match wins.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
)
# DeepSeek-R1-Distill-Qwen-1.5B's config.json (the recipe's model), and a tiny model of its kind.
QWEN2_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=131072, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False)
# The colocated row's tiny model where an engine serves it (justrl.model.tiny's shape: head dim 64).
TINY_ENGINE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
ROW_TOKENS, ROWS = 16384, 2
TINY_ROW_TOKENS = 96
MEGATRON_ROW_TOKENS = 4096
SEQUENCES_PER_ROW = 4


@dataclass
class Row:
    name: str
    values: dict
    failed: str | None = None


def peak_bf16_flops(device_name: str) -> float | None:
    for kind, flops in PEAK_BF16_FLOPS:
        if kind in device_name:
            return flops
    return None


def _import_hf_learner():
    """justrl.learner.hf, without justrl.learner's __init__ where that cannot import (it brings in
    justrl.config, hence hydra and omegaconf, which a bare GPU machine may not have: the check
    needs only the learner's own modules)."""
    try:
        from justrl.learner.hf import HFLearner
    except ImportError as e:
        if "justrl" in str(e):
            raise
        sys.modules.pop("justrl.learner", None)
        package = types.ModuleType("justrl.learner")
        package.__path__ = [str(REPO / "justrl" / "learner")]
        sys.modules["justrl.learner"] = package
        from justrl.learner.hf import HFLearner
    return HFLearner


def settings(micro_batch_tokens: int, gradient_checkpointing: bool, mini_batch_size: int):
    """The recipe's learner / optim / algorithm settings (hydra_conf/config.yaml, learner/*.yaml)
    as plain objects: no Hydra needed."""
    learner = SimpleNamespace(name="hf", dtype="bfloat16", micro_batch_tokens=micro_batch_tokens,
                              gradient_checkpointing=gradient_checkpointing, tensor_parallel_size=1,
                              max_nonfinite_updates=3, recompute_granularity="full")
    optim = SimpleNamespace(lr=1e-6, warmup_steps=0, weight_decay=0.1, grad_clip=1.0, betas=[0.9, 0.999], eps=1e-8)
    algorithm = SimpleNamespace(ppo_epochs=1, clip_low=0.2, clip_high=0.28, clip_c=10.0, entropy_coef=0.0)
    return learner, optim, algorithm


def make_sequences(rows: int, row_tokens: int, vocab: int, seed: int = 0):
    """GRPO-shaped sequences filling `rows` packed rows of exactly `row_tokens` tokens: SEQUENCES_PER_ROW
    per row, an eighth of each its prompt, advantages summing to 0."""
    from justrl.grpo import Sequence

    g = torch.Generator().manual_seed(seed)
    per = row_tokens // SEQUENCES_PER_ROW
    prompt_len = max(2, per // 8)
    seqs = []
    for i in range(rows * SEQUENCES_PER_ROW):
        tokens = torch.randint(3, vocab, (per,), generator=g).tolist()
        seqs.append(Sequence(tuple(tokens[:prompt_len]), tuple(tokens[prompt_len:]), 1.0 if i % 2 else -1.0))
    return seqs


def build_model_dir(shape: dict, out: Path, device: torch.device) -> int:
    """A random Qwen2 of `shape` saved (bf16) to `out`; returns N for the MFU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    del model
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process RSS (KiB on Linux)


def _logprobs(learner, micro_batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [learner.forward(mb, need_entropy=False)[0][0].float() for mb in micro_batches]


def _max_response_diff(a: list[torch.Tensor], b: list[torch.Tensor], micro_batches) -> float:
    return max(float(((x - y).abs().cpu() * mb.mask[0]).max()) for x, y, mb in zip(a, b, micro_batches))


def _timed(device: torch.device, fn):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def guarded(name: str, fn) -> Row:
    try:
        return Row(name, fn())
    except Exception as e:  # noqa: BLE001  one row's failure must not stop the others
        return Row(name, {}, failed=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


def run(device: torch.device, tiny: bool, megatron: bool, emit=lambda row: None, colocated: bool = True) -> list[Row]:
    """The rows, each handed to `emit` as soon as it is done (so a run cut short by the time
    limit still shows the rows it finished)."""
    HFLearner = _import_hf_learner()
    from justrl.learner.packing import build_micro_batch
    import justrl.learner.varlen_attention as varlen_attention

    shape = TINY if tiny else QWEN2_1_5B
    row_tokens = TINY_ROW_TOKENS if tiny else ROW_TOKENS
    workdir = Path(tempfile.mkdtemp(prefix="justrl-gpu-check-"))
    model_dir = workdir / "model"
    n_params = build_model_dir(shape, model_dir, device)
    sequences = make_sequences(ROWS, row_tokens, shape["vocab_size"])
    rows_of = [sequences[i * SEQUENCES_PER_ROW:(i + 1) * SEQUENCES_PER_ROW] for i in range(ROWS)]
    micro_batches = [build_micro_batch(r) for r in rows_of]
    tokens = sum(mb.input_ids.shape[1] for mb in micro_batches)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_bf16_flops(name) if device.type == "cuda" else None
    state: dict = {}
    table: list[Row] = []

    def add(row: Row) -> None:
        table.append(row)
        emit(row)

    def hf_step():
        learner_cfg, optim, algorithm = settings(row_tokens, True, len(sequences))
        _reset_peak(device)
        learner = HFLearner(model_dir, learner_cfg, optim, algorithm, len(sequences), temperature=1.0)
        state["hf"] = learner
        learner.train_step(sequences)  # warm-up: kernels, allocator, autotuning
        _reset_peak(device)
        metrics, seconds = _timed(device, lambda: learner.train_step(sequences))
        values = {"step_s": seconds, "peak_mem_GiB": _peak_gib(device), "tokens": tokens,
                  "attention": learner.model.config._attn_implementation,
                  "grad_norm": metrics["actor/grad_norm"]}
        values["MFU"] = 6 * n_params * tokens / seconds / peak if peak else f"n/a (no peak FLOP/s for {name!r})"
        return values

    def hf_logprobs():
        learner = state["hf"]
        bf16 = _logprobs(learner, micro_batches)
        saved = (learner.autocast_dtype, learner.compute_dtype, learner.bounds_device,
                 learner.model.config._attn_implementation)
        try:  # the same fp32 weights, fp32 compute (flash-attn has no fp32 kernel: justrl's SDPA path)
            learner.model.set_attn_implementation(varlen_attention.implementation(torch.float32))
            learner.autocast_dtype, learner.compute_dtype = None, torch.float32
            learner.bounds_device = torch.device("cpu")
            fp32 = _logprobs(learner, micro_batches)
        finally:
            learner.autocast_dtype, learner.compute_dtype, learner.bounds_device = saved[:3]
            learner.model.set_attn_implementation(saved[3])
        state["bf16_logprobs"] = bf16
        return {"max_abs_diff": _max_response_diff(bf16, fp32, micro_batches),
                "mean_logprob": float(torch.cat(fp32).mean())}

    def varlen_vs_dense():
        learner = state["hf"]
        varlen, t_varlen = _timed(device, lambda: _logprobs(learner, micro_batches))
        attention, bounds = learner.model.config._attn_implementation, learner.bounds_device
        forward = learner.forward
        def dense(block: bool):
            """Log-probs and time with transformers' sdpa and an explicit [1, 1, L, L] bool mask, True
            where a position may attend: with `block`, its own sequence's earlier positions
            (sequences start where the position ids restart at 0); without, every earlier position
            of the row (what ignoring the boundaries would give: the check's sensitivity)."""
            def dense_forward(mb, need_entropy, response_only=False):
                seq = torch.cumsum((mb.position_ids[0] == 0).long(), 0).to(learner.device)
                mask = torch.ones(seq.numel(), seq.numel(), dtype=torch.bool, device=learner.device).tril()
                if block:
                    mask &= seq[:, None] == seq[None, :]
                kwargs = varlen_attention.varlen_kwargs
                varlen_attention.varlen_kwargs = lambda position_ids, device=None: {"attention_mask": mask[None, None]}
                try:
                    return forward(mb, need_entropy, response_only)
                finally:
                    varlen_attention.varlen_kwargs = kwargs
            learner.forward = dense_forward
            try:
                _logprobs(learner, micro_batches)  # warm-up
                return _timed(device, lambda: _logprobs(learner, micro_batches))
            finally:
                learner.forward = forward

        try:
            learner.model.set_attn_implementation("sdpa")
            (dense_lp, t_dense), (one_sequence, _) = dense(block=True), dense(block=False)
        finally:
            learner.model.set_attn_implementation(attention)
            learner.bounds_device = bounds
        return {"varlen": attention, "max_abs_diff": _max_response_diff(varlen, dense_lp, micro_batches),
                "if_boundaries_ignored": _max_response_diff(varlen, one_sequence, micro_batches),
                "varlen_fwd_s": t_varlen, "dense_fwd_s": t_dense}

    def megatron_step():
        try:
            import megatron.core  # noqa: F401
        except ImportError as e:
            return {"skipped": f"megatron_core does not import ({e})"}
        import justrl.learner.megatron.learner as megatron_learner

        hf = state.pop("hf", None)  # its memory back before Megatron's model and optimizer
        del hf
        _reset_peak(device)
        mrow = min(row_tokens, MEGATRON_ROW_TOKENS)
        msequences = make_sequences(ROWS, mrow, shape["vocab_size"], seed=1)
        mmicro = [build_micro_batch(msequences[i * SEQUENCES_PER_ROW:(i + 1) * SEQUENCES_PER_ROW]) for i in range(ROWS)]
        # no recomputation: the recipe's default (docs/megatron.md), and Megatron's recompute saves
        # CUDA RNG states, which the CPU dry run cannot (tensor_parallel/random.py ~447)
        learner_cfg, optim, algorithm = settings(mrow, False, len(msequences))
        learner_cfg.name = "megatron"
        # the local spec on the GPU: no Transformer Engine on this machine (on a cluster: "te")
        spec = megatron_learner.layer_spec
        megatron_learner.layer_spec = lambda on_cpu: "local"
        try:
            learner = megatron_learner.MegatronLearner(model_dir, learner_cfg, optim, algorithm, len(msequences), 1.0)
        finally:
            megatron_learner.layer_spec = spec
        mega = _logprobs(learner, mmicro)
        learner_cfg.name = "hf"
        ref_learner = HFLearner(model_dir, learner_cfg, optim, algorithm, len(msequences), temperature=1.0)
        ref = _logprobs(ref_learner, mmicro)
        del ref_learner
        learner.train_step(msequences)  # warm-up
        _reset_peak(device)
        _, seconds = _timed(device, lambda: learner.train_step(msequences))
        mtokens = sum(mb.input_ids.shape[1] for mb in mmicro)
        values = {"step_s": seconds, "peak_mem_GiB": _peak_gib(device), "tokens": mtokens, "spec": "local",
                  "max_abs_diff_vs_hf": _max_response_diff(mega, ref, mmicro)}
        values["MFU"] = 6 * n_params * mtokens / seconds / peak if peak else f"n/a (no peak FLOP/s for {name!r})"
        return values

    def colocated_step():
        """An engine and a learner on one device, as cluster.placement=colocated runs them
        (justrl.rollout.phases): the engine serves, sleeps (level 1), the learner trains in the memory
        it gave back, the engine wakes for the weights, reloads the learner's export, wakes for its KV
        cache, and its probe log-probs are checked against the learner's."""
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            return {"skipped": f"vllm does not import ({e})"}
        from justrl.rollout.launch import SLEEP_MODE_ARGS
        from justrl.rollout.engine import EngineProcess, EngineSpec
        from justrl.model.tiny import build_tokenizer
        from justrl.weight_sync.ipc import IpcTransport
        from justrl.weight_sync.sync import learner_hf_state
        from justrl.weight_sync.probe import (DEFAULT_TOLERANCE, PROBE_TEXT, compare_probe, engine_probe_logprobs, learner_probe_logprobs)

        state.pop("hf", None)
        _reset_peak(device)
        tokenizer = build_tokenizer(0)  # no download: justrl's tiny tokenizer (ids < 1024)
        # vLLM's CPU attention has no kernel for TINY's head dim 16: the tiny model's 128 / 2 heads
        cshape = {**shape, **(TINY_ENGINE if tiny else {}), "vocab_size": max(shape["vocab_size"], len(tokenizer))}
        cdir = workdir / "colocated_model"
        build_model_dir(cshape, cdir, device)
        tokenizer.save_pretrained(cdir)
        cuda = device.type == "cuda"
        dtype = "bfloat16" if cuda else "float32"
        # On a GPU the engine also takes the weights by CUDA IPC (rollout.weight_sync=ipc, the colocated
        # default); the CPU dry run reloads the files only (vLLM's CPU build cannot take IPC handles).
        ipc = IpcTransport() if cuda else None
        spec = EngineSpec(max_model_len=2 * row_tokens, dtype=dtype, seed=0, gpu_ids=(device.index or 0,) if cuda else (),
                          gpu_memory_utilization=0.5, extra_args=SLEEP_MODE_ARGS + (ipc.engine_args if ipc else ()),
                          extra_env=ipc.engine_env if ipc else (), startup_timeout_s=600, request_timeout_s=600)
        engine = EngineProcess("engine0", spec, workdir / "engine0.log")
        engine.start(cdir)
        try:
            free = lambda: torch.cuda.mem_get_info(device)[0] / 2**30 if cuda else float("nan")  # noqa: E731
            before = free()
            _, sleep_s = _timed(device, lambda: engine.client.sleep(1))
            freed = free() - before
            learner_cfg, optim, algorithm = settings(row_tokens, True, len(sequences))
            optim.lr = 1e-2  # a step that moves the probe beyond twice the tolerance: a missed reload shows
            learner = HFLearner(cdir, learner_cfg, optim, algorithm, len(sequences), temperature=1.0)
            csequences = make_sequences(ROWS, row_tokens, cshape["vocab_size"], seed=2)
            probe = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
            initial = learner_probe_logprobs(learner, probe)
            _reset_peak(device)
            _, train_s = _timed(device, lambda: learner.train_step(csequences))
            peak_gib = _peak_gib(device)
            export = learner.export_hf(workdir / "colocated_step_1", tokenizer, dtype)
            reference = learner_probe_logprobs(learner, probe)
            _reset_peak(device)  # the learner's cached blocks back to the driver, as the trainer does
            _, wake_weights_s = _timed(device, lambda: engine.client.wake_up(("weights",)))
            ipc_values = {}
            if ipc is not None:  # the learner's bf16 copy on this GPU, handed over by CUDA IPC
                hf_state = learner_hf_state(learner, "bfloat16", every_rank=True)
                fleet = SimpleNamespace(live_engines=[engine], weights_dir=None)
                _, ipc_values["ipc_push_s"] = _timed(device, lambda: ipc.push(fleet, export, 1, hf_state))
                del hf_state
            _, wake_kv_s = _timed(device, lambda: engine.client.wake_up(("kv_cache",)))
            asleep = engine.client.is_sleeping()
            if ipc is not None:
                ipc_values["ipc_probe_diff"] = compare_probe(engine_probe_logprobs(engine.client, probe), reference)
            _, reload_s = _timed(device, lambda: engine.client.load_weights(export))
            diff = compare_probe(engine_probe_logprobs(engine.client, probe), reference)
        finally:
            engine.stop()
        tolerance = DEFAULT_TOLERANCE["bfloat16"]  # the learner computes in bf16 either way
        moved = compare_probe(initial, reference)
        ipc_diff = ipc_values.get("ipc_probe_diff", 0.0)
        if asleep or not diff <= tolerance or not ipc_diff <= tolerance or not moved > 2 * tolerance:
            raise RuntimeError(f"after the wake the engine is_sleeping={asleep}, its probe differs by {diff:.3g} from the "
                               f"learner's after the file reload and by {ipc_diff:.3g} after the IPC push (tolerance "
                               f"{tolerance:g}), the step moved it by {moved:.3g} (must be > {2 * tolerance:g}); "
                               f"log {workdir / 'engine0.log'}")
        return {"engine_freed_GiB": freed, "sleep_s": sleep_s, "train_s": train_s, "learner_peak_GiB": peak_gib,
                "wake_weights_s": wake_weights_s, **ipc_values, "wake_kv_s": wake_kv_s, "reload_s": reload_s,
                "probe_moved": moved, "probe_diff": diff, "tolerance": tolerance}

    if os.environ.get("JUSTRL_GPU_CHECK_TRACE"):
        globals()["guarded"] = lambda n, fn: Row(n, fn())  # noqa: E731  failures raise, with their traceback
    add(guarded("hf step (bf16)", hf_step))
    for label, fn in (("hf log-probs bf16 vs fp32", hf_logprobs), ("varlen vs dense SDPA", varlen_vs_dense)):
        add(guarded(label, fn) if "hf" in state else Row(label, {}, failed="the hf learner did not build"))
    if megatron:
        add(guarded("megatron step (local, TP=1)", megatron_step))
    else:
        add(Row("megatron step (local, TP=1)", {"skipped": "--no-megatron"}))
    if colocated:
        add(guarded("colocated step (vLLM sleep)", colocated_step))
    else:
        add(Row("colocated step (vLLM sleep)", {"skipped": "--no-colocated"}))
    return table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def render_row(row: Row) -> str:
    text = f"FAILED {row.failed}" if row.failed else ", ".join(f"{k}={_fmt(v)}" for k, v in row.values.items())
    return f"{row.name:<30} | {text}"


def render(table: list[Row], header: str) -> str:
    lines = [header, f"{'row':<30} | result", f"{'-' * 30}-+-{'-' * 60}"]
    return "\n".join(lines + [render_row(row) for row in table])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short rows (the CPU dry run)")
    parser.add_argument("--no-megatron", action="store_true", help="leave the Megatron row out")
    parser.add_argument("--no-colocated", action="store_true", help="leave the colocated (vLLM sleep) row out")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    header = (f"justrl GPU check: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
              f"{'tiny' if args.tiny else 'Qwen2-1.5B shape'}, {ROWS} rows of "
              f"{TINY_ROW_TOKENS if args.tiny else ROW_TOKENS} tokens")
    print(render([], header), flush=True)
    start = time.perf_counter()
    table = run(device, args.tiny, not args.no_megatron, emit=lambda row: print(render_row(row), flush=True),
                colocated=not args.no_colocated)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if any(row.failed for row in table) else 0


if __name__ == "__main__":
    sys.exit(main())
