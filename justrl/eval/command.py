"""Evaluate a model the way the paper does: `python -m justrl.eval model_path=<path>`.

    python -m justrl.eval model_path=outputs/justrl-tiny-none                        # a run's latest checkpoint
    python -m justrl.eval model_path=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B engine.gpus=8
    python -m justrl.eval model_path=models/tiny benchmarks=[AIME24,AMC23] samples=2 max_new_tokens=64

Writes into `output_dir` (default outputs/eval/<name>): one `<BENCHMARK>.jsonl` per benchmark (a
line per sample: problem id, sample index and seed, response, extracted answer, correct, length in
tokens), `results.json` and `results.md` (per benchmark: avg@N, best-of-N, problems solved by none
/ by all, mean response length, samples without a boxed answer; and the average over the nine).
Rerunning the same command resumes: finished problems are read back, never regenerated.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from justrl.config import (ENGINE_KEYS, ConfigError, Key, at_least, in_unit_interval, key_errors, nonempty,
                           positive, schema_dataclass, typed)

log = logging.getLogger("justrl.eval")

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


# Each key's type and rule (justrl.config.Key); the values and what they mean: hydra_conf/evaluate.yaml.
# The engine section shares its keys with training's rollout.* (justrl.config.ENGINE_KEYS).
EVAL_SCHEMA = {
    "model_path": nonempty(),
    "name": typed(Optional[str]),
    "benchmarks": typed(list[str]),  # known, with readable files (check)
    "benchmark_dir": typed(str),
    "samples": Key(Optional[int], lambda v: v is None or v >= 1, "must be null (the paper's) or >= 1"),
    "limit": Key(Optional[int], lambda v: v is None or v >= 1, "must be null (all) or >= 1"),
    "temperature": at_least(float, 0),
    "top_p": in_unit_interval(),
    "max_new_tokens": at_least(int, 1),
    "max_prompt_length": at_least(int, 1),
    "prompt_template": Key(str, lambda v: "{problem}" in v, "must contain {problem}"),
    "seed": typed(int),
    "output_dir": typed(Optional[str]),
    "chunk_problems": at_least(int, 1),
    "engine": {"count": at_least(int, 1), "gpus": at_least(int, 0), **ENGINE_KEYS},
    "grader": {"num_workers": at_least(int, 1), "timeout_s": positive(float)},
    "judge": {
        "enable": typed(Optional[bool]),
        "model": typed(str),
        "with_question": typed(bool),
        "max_new_tokens": at_least(int, 1),
        "dtype": ENGINE_KEYS["dtype"],
    },
}
ConfigStore.instance().store(name="justrl_eval_schema", node=schema_dataclass("EvalConfig", EVAL_SCHEMA))


def check(cfg: DictConfig) -> None:
    from justrl.data import BENCHMARKS

    errors = key_errors(cfg, EVAL_SCHEMA)
    unknown = [b for b in cfg.benchmarks if b not in BENCHMARKS]
    if unknown:
        errors.append(f"benchmarks: unknown {unknown}; choose from {list(BENCHMARKS)}")
    else:  # every file is checked before the engines start
        from justrl.data.benchmarks import benchmark_file_errors

        errors += [f"benchmarks: {msg}" for msg in benchmark_file_errors(cfg.benchmarks, cfg.benchmark_dir,
                                                                          "benchmark_dir")]
    if errors:
        raise ConfigError("invalid evaluation configuration:\n  " + "\n  ".join(errors))


def eval_problem(problem, template: str):
    """`problem` with its text put into the authors' template: `template.format(problem=...)` of
    the whitespace-trimmed problem (evals/gen_vllm.py: `PROMPT_TEMPLATE.format(problem=...)` of
    `content.strip()`)."""
    from dataclasses import replace

    return replace(problem, problem=template.format(problem=problem.problem.strip()))


def default_name(model: str, model_dir: Path) -> str:
    """`<run>-step_N` for a run or checkpoint, the last path component otherwise."""
    if model_dir.name == "hf" and (model_dir.parent / "COMPLETE").is_file():
        return f"{model_dir.parent.parent.parent.name}-{model_dir.parent.name}"
    return Path(model).name


def read_done(path: Path, samples: int) -> dict[str, list]:
    """Complete problems already in a jsonl file (all `samples` samples present); the file is
    rewritten without anything else (a half-written line or a half-finished problem)."""
    from justrl.eval.sampling import SampleRecord

    if not path.exists():
        return {}
    by_problem: dict[str, list] = {}
    for line in path.read_text().splitlines():
        try:
            record = SampleRecord(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue  # the line an interruption cut short
        by_problem.setdefault(record.problem_id, []).append(record)
    done = {pid: sorted(recs, key=lambda r: r.sample) for pid, recs in by_problem.items()
            if sorted(r.sample for r in recs) == list(range(samples))}
    write_jsonl(path, [r for recs in done.values() for r in recs])
    return done


def write_jsonl(path: Path, records: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as out:
        for r in records:
            out.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, records: list) -> None:
    with open(path, "a") as out:
        for r in records:
            out.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())


def markdown_table(results: dict) -> str:
    rows = ["| benchmark | N | problems | avg@N | best-of-N | solved by none | solved by all | mean tokens | no box |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["benchmarks"].items():
        rows.append(f"| {name} | {r['samples_per_problem']} | {r['problems']} | {r['avg']:.2f} | {r['best_of_n']:.2f} | "
                    f"{r['solved_by_none']} | {r['solved_by_all']} | {r['mean_response_tokens']:.0f} | "
                    f"{r['no_boxed_answer']} |")
    avg = results.get("average")
    lines = [f"# {results['name']}", "", f"model: `{results['model']}`; grader: {results['grader']}", "",
             f"judge: {results['judge_status']}", "", f"prompt: `{results['prompt_template']}`", "", *rows]
    if avg is not None:
        lines += ["", f"Average avg@N over {len(results['benchmarks'])} benchmarks: **{avg:.2f}**"
                  + ("" if results.get("all_nine") else " (not the paper's nine-benchmark Avg: some are missing)")]
    return "\n".join(lines) + "\n"


def run_evaluation(cfg: DictConfig) -> dict:
    """Evaluate; returns the results dict (also written to results.json / results.md)."""
    import transformers
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from justrl.data import BENCHMARKS, build_prompts, load_benchmark, render_prompt
    from justrl.eval.sampling import EvalItem, problem_seed, sample_and_grade, summarize
    from justrl.reward import ScorerPool
    from justrl.rollout.engine import build_engines, engine_spec
    from justrl.rollout.client import SamplingSettings
    from justrl.model.sources import resolve_eval_model
    from justrl.cluster.placement import EnginePlacement, gpu_groups
    from justrl.rollout.fleet import RolloutFleet

    transformers.utils.logging.disable_progress_bar()
    check(cfg)
    model_dir = resolve_eval_model(cfg.model_path)
    name = cfg.name or default_name(cfg.model_path, model_dir)
    out_dir = Path(cfg.output_dir or f"outputs/eval/{name}").absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    tp = cfg.engine.tensor_parallel_size
    placements = ([EnginePlacement(None, g) for g in gpu_groups(list(range(cfg.engine.gpus)), tp)] if cfg.engine.gpus
                  else [EnginePlacement(None) for _ in range(cfg.engine.count)])
    spec = engine_spec(cfg.engine, max_model_len=cfg.max_prompt_length + cfg.max_new_tokens, seed=cfg.seed,
                       tensor_parallel_size=tp)
    engines = build_engines(placements, spec, out_dir / "engines")
    fleet = RolloutFleet(engines, model_dir)
    grader = ScorerPool("grader", cfg.grader.num_workers, cfg.grader.timeout_s)
    all_records: dict[str, list[list]] = {}
    questions: dict[str, dict[str, tuple[str, str]]] = {}
    example_prompts: dict[str, str] = {}
    try:
        fleet.start()
        for bench_name in cfg.benchmarks:
            bench = load_benchmark(bench_name, cfg.benchmark_dir, cfg.samples)
            problems = bench.problems[:cfg.limit] if cfg.limit else bench.problems
            prompts, dropped = build_prompts([eval_problem(p, cfg.prompt_template) for p in problems], tokenizer,
                                             cfg.max_prompt_length, suffix="")
            if prompts:
                example_prompts[bench_name] = render_prompt(tokenizer, prompts[0].problem.problem, suffix="")
            if dropped:
                log.warning("%s: %d prompts longer than max_prompt_length=%d left out", bench_name, dropped,
                            cfg.max_prompt_length)
            n = bench.samples_per_problem
            path = out_dir / f"{bench_name}.jsonl"
            done = read_done(path, n)
            todo = [p for p in prompts if p.problem.id not in done]
            if done:
                log.info("%s: %d of %d problems already done in %s", bench_name, len(prompts) - len(todo),
                         len(prompts), path)
            settings = SamplingSettings(n, cfg.temperature, cfg.top_p, -1, cfg.max_new_tokens)
            with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=f"{bench_name} (N={n})",
                      unit="problem", dynamic_ncols=True) as bar:
                per_chunk = cfg.chunk_problems * len(engines)  # every engine gets chunk_problems
                for start in range(0, len(todo), per_chunk):
                    chunk = todo[start:start + per_chunk]
                    items = [EvalItem(p.problem.id, p.token_ids, p.problem.answer) for p in chunk]
                    seeds = [problem_seed(cfg.seed, bench_name, item.problem_id) for item in items]
                    graded = sample_and_grade(fleet, grader, tokenizer, items, settings, seeds)
                    append_jsonl(path, [r for group in graded for r in group])
                    done.update({item.problem_id: group for item, group in zip(items, graded)})
                    bar.update(len(chunk))
            all_records[bench_name] = [done[p.problem.id] for p in prompts]
            # The judge's question and reference: the bare problem, and the answer as the file
            # stores it (AIME24's "\\boxed{204}"), as grade.py passes it.
            questions[bench_name] = {p.id: (p.problem.strip(), p.raw_answer.strip()) for p in problems}
    finally:
        fleet.stop()
        grader.close()

    from justrl.eval.judge import judge_enabled, judge_rejected

    judge_name = None
    run_judge, judge_status = judge_enabled(cfg.judge.enable, cfg.engine.gpus, cfg.judge.model)
    if run_judge:
        judge_name = cfg.judge.model
        judged = judge_rejected(cfg, all_records, questions, out_dir)
        judge_status = f"ran: {cfg.judge.model} on {judged.judged} samples the rules rejected" + (
            f", {judged.too_long} left unjudged (prompt longer than the judge's context)" if judged.too_long else "")
        for bench_name, groups in all_records.items():
            write_jsonl(out_dir / f"{bench_name}.jsonl", [r for g in groups for r in g])
    log.info("judge: %s", judge_status)

    per_bench = {b: summarize(groups) for b, groups in all_records.items()}
    averages = [r["avg"] for r in per_bench.values() if r.get("problems")]
    results = {
        "name": name, "model": str(model_dir),
        "grader": "rules (justrl.eval.grading)" + (f" + judge {judge_name}" if judge_name else ""),
        "judge": judge_name,
        "judge_status": judge_status,
        "prompt_template": cfg.prompt_template,
        "example_prompts": example_prompts,
        "settings": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                     "seed": cfg.seed},
        "benchmarks": per_bench,
        "average": sum(averages) / len(averages) if averages else None,
        "all_nine": set(per_bench) == set(BENCHMARKS) and cfg.limit is None and cfg.samples is None,
    }
    tmp = out_dir / (RESULTS_JSON + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out_dir / RESULTS_JSON)
    (out_dir / RESULTS_MD).write_text(markdown_table(results))
    print(markdown_table(results))
    print(f"results: {out_dir / RESULTS_JSON}")
    return results


@hydra.main(config_path="pkg://justrl.hydra_conf", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    from justrl.rollout.client import EngineError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    OmegaConf.resolve(cfg)
    try:
        run_evaluation(cfg)
    except (ConfigError, EngineError, FileNotFoundError) as exc:
        log.error("%s", exc)
        sys.exit(f"justrl.eval: {exc}")


if __name__ == "__main__":
    main()
