"""Data: training problems (DAPO-Math-17k in both forms, or a toy set), the recipe's prompt,
the resumable sampler, and the nine evaluation benchmarks."""
from justrl.data.benchmarks import BENCHMARKS, SAMPLES_PER_PROBLEM, Benchmark, BenchmarkProblem, load_benchmark
from justrl.data.problems import LoadReport, Problem, SkippedRow, load_problem_files, unwrap_dapo_prompt
from justrl.data.prompts import BOXED_SUFFIX, Prompt, build_prompts, encode_prompt, render_prompt
from justrl.data.sampler import PromptSampler
from justrl.data.toy import TOY_SETS, toy_problems

__all__ = [
    "BENCHMARKS", "SAMPLES_PER_PROBLEM", "Benchmark", "BenchmarkProblem", "load_benchmark",
    "LoadReport", "Problem", "SkippedRow", "load_problems", "unwrap_dapo_prompt",
    "BOXED_SUFFIX", "Prompt", "build_prompts", "encode_prompt", "render_prompt",
    "PromptSampler", "TOY_SETS", "toy_problems", "load_problem_files",
]


def load_problems(source: str, problem_key: str | None = None,
                  answer_key: str | None = None) -> tuple[list[Problem], LoadReport]:
    """The training problems of `data.train_path`: one of justrl's generated toy sets by name
    ("toy", "toy_scratchpad": justrl.data.toy), otherwise DAPO-style files
    (justrl.data.problems.load_problem_files)."""
    if source in TOY_SETS:
        problems = toy_problems("train", task=source)
        return problems, LoadReport(rows=len(problems), kept=len(problems))
    return load_problem_files(source, problem_key, answer_key)
