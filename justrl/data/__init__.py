"""Data: training problems (DAPO-Math-17k in both forms, or a toy set), the recipe's prompt,
the set a run trains on, the resumable sampler, and the nine evaluation benchmarks."""
from justrl.data.benchmarks import BENCHMARKS, SAMPLES_PER_PROBLEM, Benchmark, BenchmarkProblem, load_benchmark
from justrl.data.problems import (PROMPT_FORMS, LoadReport, Problem, ProblemTable, SkippedRow, load_problem_files,
                                  unwrap_dapo_prompt)
from justrl.data.prompts import BOXED_SUFFIX, Prompt, build_prompts, encode_prompt, fit_prompts, render_prompt
from justrl.data.sampler import PromptSampler
from justrl.data.toy import TOY_SETS, toy_problems
from justrl.data.training_set import TrainingSet, load_problems, load_training_set

__all__ = [
    "BENCHMARKS", "SAMPLES_PER_PROBLEM", "Benchmark", "BenchmarkProblem", "load_benchmark",
    "PROMPT_FORMS", "LoadReport", "Problem", "ProblemTable", "SkippedRow", "load_problem_files",
    "unwrap_dapo_prompt", "BOXED_SUFFIX", "Prompt", "build_prompts", "encode_prompt", "fit_prompts",
    "render_prompt", "PromptSampler", "TOY_SETS", "toy_problems", "TrainingSet", "load_problems",
    "load_training_set", "validation_sets",
]


def validation_sets(data, tokenizer) -> dict[str, list[Prompt]]:
    """name -> prompts of each of `data.val_benchmarks` ("toy", "toy_scratchpad": the held-out toy
    split), built like the training prompts (the authors' validation files go through the same
    dataset class)."""
    import logging

    sets = {}
    for name in data.val_benchmarks:
        if name in TOY_SETS:
            problems = toy_problems("val", task=name)
        else:
            problems = load_benchmark(name, data.benchmark_dir).problems
        sets[name], dropped = build_prompts(problems, tokenizer, data.max_prompt_length, data.prompt_suffix)
        if dropped:
            logging.getLogger("justrl").warning(
                "validation %s: %d prompts longer than data.max_prompt_length left out", name, dropped)
    return sets
