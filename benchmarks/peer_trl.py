"""justrl against TRL's GRPOTrainer on the embedded default: same model, prompts, reward, batch.

    .venv/bin/python benchmarks/peer_trl.py                      # 64-token responses
    .venv/bin/python benchmarks/peer_trl.py --response-length 256 --force-length   # ~256 tokens

Both systems train the tiny model (justrl's `models/tiny`, built if missing) on the `toy` prompts
in the same order (justrl's seeded sampler; TRL gets them unshuffled), rewarded by the `dapo`
verifier (justrl/reward/dapo.py, loaded by file in TRL's environment), 16 prompts x 8 samples
per GRPO step, 2 AdamW steps per GRPO step (mini-batches of 8 prompts), old log-probs recomputed
before the updates in both, no KL, clip 0.2/0.28, token-mean loss, lr 1e-4 constant, float32.

TRL (1.16, with torch 2.13.0 CPU) runs in a virtual environment of its own, created by this script
on first use in `$JUSTRL_TRL_VENV` (default /tmp/justrl-trl-venv); justrl's .venv is not touched.
The two systems run alternately in one invocation (justrl, TRL, justrl, TRL, ...: `--rounds`), each
run a fresh process of `--steps` GRPO steps; the first step of every run is left out (warm-up), and
the median seconds per GRPO step of the rest is reported, with justrl's split (rollout = generation
and reward, train, sync) and each system's start-up (process start to the first step).

Differences that remain (they are the systems' designs, not settings):
- generation: justrl asks a vLLM server (CPU build, separate processes, continuous batching);
  TRL calls transformers' `generate` on the training model in its own process (one padded batch of
  128 sequences, KV cache);
- the dual clip (justrl's clip_c=10 on negative advantages) has no TRL counterpart; TRL's
  `delta` is another bound, left off. It changes no cost;
- weight sync: justrl writes safetensors and the engine reloads them (the issue's "sync"); TRL's
  generator is the trained model itself;
- packing: justrl packs a mini-batch's sequences into rows without padding; TRL pads to the
  longest prompt and completion of its batch;
- justrl verifies after each sync that the engine serves the new weights (rollout.weight_check,
  its default), TRL has nothing to check;
- scoring: both call `dapo` in-process; justrl also scores every response with its other training
  verifier (`lenient`, in worker processes with a timeout) for `reward/verifier_disagreement`;
- TRL's GRPOConfig turns gradient checkpointing on by default (its update recomputes activations);
  justrl's experiment=tiny trains without it. TRL runs both ways, alternating with justrl:
  "TRL" is TRL as configured above with its default, "TRL no-GC" with gradient_checkpointing=False
  (the same work as justrl's learner); a ratio is printed for each.
With --force-length both systems serve a copy of the model whose end-of-sequence token is
`<|endoftext|>` (never generated), so that every response runs to --response-length tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_VENV = Path(os.environ.get("JUSTRL_TRL_VENV", "/tmp/justrl-trl-venv"))
TRL_REQUIREMENTS = ("torch==2.13.0", "trl==1.16.*")
PROMPTS_PER_STEP, SAMPLES, MINI_BATCH_PROMPTS, LR, SEED = 16, 8, 8, 1e-4, 1


def justrl_overrides(model: Path, steps: int, length: int, out: Path, engines: int = 1) -> list[str]:
    """Every setting the comparison depends on, pinned (experiment=tiny's defaults may change)."""
    return ["experiment=tiny", f"model.path={model}", "data.train_path=toy", "data.max_prompt_length=128",
            f"data.seed={SEED}", f"rollout.n={SAMPLES}", f"rollout.max_response_length={length}",
            "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=-1", f"rollout.engines={engines}",
            "rollout.max_policy_lag=0", "rollout.dtype=float32",
            f"algorithm.prompts_per_step={PROMPTS_PER_STEP}", f"algorithm.mini_batch_prompts={MINI_BATCH_PROMPTS}",
            "algorithm.ppo_epochs=1", "algorithm.entropy_coef=0.0", f"optim.lr={LR}", "optim.warmup_steps=0",
            "optim.weight_decay=0.1", "optim.grad_clip=1.0", "learner.dtype=float32",
            "learner.gradient_checkpointing=false", "reward.verifier=dapo", "reward.overlong.enable=false",
            f"trainer.total_steps={steps}", "trainer.val_every=0", "trainer.val_before_train=false",
            f"trainer.save_every={steps + 1}", f"trainer.seed={SEED}", f"trainer.output_dir={out}"]


# -- the TRL side (runs under TRL's own Python; standard library imports only at module level) ------

def trl_worker(spec_path: str) -> None:
    import importlib.util

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    t_start = time.time()
    spec = json.loads(Path(spec_path).read_text())
    loader = importlib.util.spec_from_file_location("justrl_dapo", REPO / "justrl" / "reward" / "dapo.py")
    dapo = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(dapo)

    def dapo_reward(completions, answer, **_):
        return [dapo.dapo_score(c, a) for c, a in zip(completions, answer)]

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    data = Dataset.from_list([{"prompt": p["text"], "answer": p["answer"]} for p in spec["prompts"]])
    args = GRPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=MINI_BATCH_PROMPTS * SAMPLES,
        gradient_accumulation_steps=1, steps_per_generation=PROMPTS_PER_STEP // MINI_BATCH_PROMPTS,
        num_generations=SAMPLES, num_iterations=1, max_completion_length=spec["length"],
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        scale_rewards="group", learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.1, max_grad_norm=1.0, max_steps=spec["steps"] * PROMPTS_PER_STEP // MINI_BATCH_PROMPTS,
        shuffle_dataset=False, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        seed=SEED, disable_dropout=True, log_completions=False,
        mask_truncated_completions=False, dataloader_num_workers=0,
        gradient_checkpointing=spec["gradient_checkpointing"])
    marks = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.time())

        def on_step_end(self, *a, **k):
            marks.append(time.time())

    trainer = GRPOTrainer(model=model, reward_funcs=dapo_reward, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    per_grpo = args.steps_per_generation
    steps = [marks[i + per_grpo] - marks[i] for i in range(0, len(marks) - 1, per_grpo)]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    print("TRL_RESULT " + json.dumps({"steps": steps, "startup": marks[0] - spec["t0"], "import_to_train":
                                      marks[0] - t_start, "mean_length": lengths}), flush=True)


# -- the driver (justrl's environment) ---------------------------------------------------------------

def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    probe = [str(python), "-c", "import trl, torch; assert trl.__version__.startswith('1.16'), trl.__version__"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating TRL's environment in {TRL_VENV} ({', '.join(TRL_REQUIREMENTS)})", flush=True)
    subprocess.run([shutil.which("python3.11") or "python3", "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--progress-bar", "off", *TRL_REQUIREMENTS], check=True)
    subprocess.run(probe, check=True)
    return python


def force_length_copy(model: Path, out: Path) -> Path:
    """The model with `<|endoftext|>` as its end-of-sequence token: responses run to the limit."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(model, out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(out)
    for name in ("config.json", "generation_config.json"):
        path = out / name
        if path.exists():
            data = json.loads(path.read_text())
            data["eos_token_id"] = eos
            path.write_text(json.dumps(data, indent=2))
    return out


def prompts_in_order(cfg, model: Path, steps: int) -> list[dict]:
    """The prompts justrl's sampler draws for steps 1..steps, as chat-template text + answer."""
    from transformers import AutoTokenizer

    from justrl.data import PromptSampler, load_training_set, render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    train_set = load_training_set(cfg.data, tokenizer)
    sampler = PromptSampler(len(train_set), cfg.data.seed)
    out = []
    for _ in range(steps):
        for i in sampler.next_batch(PROMPTS_PER_STEP):
            p = train_set.prompt(i)
            text = render_prompt(tokenizer, p.problem.problem, cfg.data.prompt_suffix)
            assert tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) == p.token_ids
            out.append({"text": text, "answer": p.problem.answer})
    return out


STEP_LINE = re.compile(r"^(\S+ \S+) INFO justrl\.steps: step (\d+)/\d+ (.*)$")


def run_justrl(model: Path, steps: int, length: int, out: Path, engines: int = 1) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUSTRL_")}
    subprocess.run([sys.executable, "-m", "justrl.launch", *justrl_overrides(model, steps, length, out, engines)],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    for line in (out / "train.log").read_text().splitlines():
        m = STEP_LINE.match(line)
        if m:
            values = dict(kv.split("=", 1) for kv in m.group(3).split())
            stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            rows.append({"end": stamp, **{k: float(v) for k, v in values.items()}})
    if len(rows) != steps:
        raise RuntimeError(f"{out}/train.log has {len(rows)} step lines, expected {steps}")
    return {"steps": [r["perf/time_step"] for r in rows], "startup": rows[0]["end"] - rows[0]["perf/time_step"] - t0,
            "rollout": [r["perf/time_rollout"] + r.get("perf/time_reward", 0.0) for r in rows],
            "train": [r["perf/time_train"] for r in rows], "sync": [r["perf/time_sync"] for r in rows],
            "mean_length": [r["response_length/mean"] for r in rows]}


def run_trl(python: Path, model: Path, prompts: list[dict], steps: int, length: int, out: Path,
            gradient_checkpointing: bool) -> dict:
    """One TRL run; `gradient_checkpointing`: True is GRPOConfig's default."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"model": str(model), "prompts": prompts, "steps": steps, "length": length,
                                "out": str(out / "trainer"), "t0": time.time(),
                                "gradient_checkpointing": gradient_checkpointing}))
    env = dict(os.environ, PYTHONPATH="", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(python), __file__, "--trl-worker", str(spec)], cwd="/tmp", env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TRL_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"TRL run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("TRL_RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating (justrl, TRL, TRL no-GC) runs")
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per run (the first is left out)")
    parser.add_argument("--response-length", type=int, default=64)
    parser.add_argument("--force-length", action="store_true", help="every response runs to the limit")
    parser.add_argument("--engines", type=int, default=1,
                        help="justrl's rollout.engines (2 on a 2-core machine: one one-core engine per core)")
    parser.add_argument("--workdir", default="/tmp/justrl_peer_trl")
    parser.add_argument("--model", default=str(REPO / "models" / "tiny"),
                        help="the tiny model's directory (built there if missing, as experiment=tiny does)")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.trl_worker:
        return trl_worker(opts.trl_worker)

    sys.path.insert(0, str(REPO))
    from justrl.config import compose
    from justrl.model.sources import resolve_model_path

    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    length = opts.response_length
    cfg = compose(justrl_overrides(Path(opts.model).absolute(), opts.steps, length, work / "probe"))
    model = resolve_model_path(cfg.model)
    if opts.force_length:
        model = force_length_copy(model, work / "model_forced_length")
    cfg = compose(justrl_overrides(model, opts.steps, length, work / "probe"))
    prompts = prompts_in_order(cfg, model, opts.steps)
    python = ensure_trl_venv()

    results = {"justrl": [], "trl": [], "trl_nogc": []}
    for r in range(opts.rounds):
        for name in ("justrl", "trl", "trl_nogc"):
            t = time.time()
            if name == "justrl":
                res = run_justrl(model, opts.steps, length, work / f"justrl_{r}", opts.engines)
            else:
                res = run_trl(python, model, prompts, opts.steps, length, work / f"{name}_{r}",
                              gradient_checkpointing=name == "trl")
            results[name].append(res)
            print(f"round {r} {name}: {time.time() - t:.0f} s, steps {[round(s, 2) for s in res['steps']]}, "
                  f"start-up {res['startup']:.1f} s", flush=True)

    def med(name, key="steps"):
        return statistics.median(v for res in results[name] for v in res[key][1:])

    j, t, t_nogc = med("justrl"), med("trl"), med("trl_nogc")
    load = os.getloadavg()
    print(f"\n{datetime.now():%Y-%m-%d %H:%M} {os.cpu_count()} CPUs, load average {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f}; {opts.rounds} alternating rounds x {opts.steps} GRPO steps "
          f"(first of each run left out); {PROMPTS_PER_STEP} prompts x {SAMPLES} samples, "
          f"{length}-token responses{' (forced)' if opts.force_length else ''}; justrl rollout.engines={opts.engines}")
    print(f"response length (mean)  justrl {med('justrl', 'mean_length'):.0f}  TRL {med('trl', 'mean_length'):.0f}")
    print(f"median s / GRPO step    justrl {j:.2f} (rollout+reward {med('justrl', 'rollout'):.2f}, "
          f"train {med('justrl', 'train'):.2f}, sync {med('justrl', 'sync'):.2f})  TRL {t:.2f}  "
          f"TRL no-GC {t_nogc:.2f}")
    print(f"start-up (s)            justrl {statistics.median(r['startup'] for r in results['justrl']):.1f}  "
          f"TRL {statistics.median(r['startup'] for r in results['trl']):.1f}")
    print(f"ratio TRL / justrl      {t / j:.2f}  (TRL no-GC / justrl {t_nogc / j:.2f})")


if __name__ == "__main__":
    main()
