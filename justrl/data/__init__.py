"""Data: training problems (DAPO-Math-17k in both forms, or a toy set), the recipe's prompt,
the resumable sampler, and the nine evaluation benchmarks."""
from justrl.data.benchmarks import BENCHMARKS, SAMPLES_PER_PROBLEM, Benchmark, BenchmarkProblem, load_benchmark
from justrl.data.problems import LoadReport, Problem, SkippedRow, load_problems, unwrap_dapo_prompt
from justrl.data.prompts import BOXED_SUFFIX, Prompt, build_prompts, encode_prompt, render_prompt
from justrl.data.sampler import PromptSampler
from justrl.data.toy import TOY_SETS, toy_problems

__all__ = [
    "BENCHMARKS", "SAMPLES_PER_PROBLEM", "Benchmark", "BenchmarkProblem", "load_benchmark",
    "LoadReport", "Problem", "SkippedRow", "load_problems", "unwrap_dapo_prompt",
    "BOXED_SUFFIX", "Prompt", "build_prompts", "encode_prompt", "render_prompt",
    "PromptSampler", "TOY_SETS", "toy_problems",
]
