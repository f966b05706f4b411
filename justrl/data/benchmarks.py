"""The nine evaluation benchmarks of the paper, from <benchmark_dir>/<NAME>/test.parquet.

The files ship with justrl (justrl/benchmark_data, the default benchmark_dir); `benchmark_file_errors`
checks them at start-up, before any engine or GPU is used.

Two schemas occur in the released files, both read here:
- veRL form (AIME24, AIME25, AMC23, MATH-500, Minerva, Olympiad-Bench): `prompt` (one user
  message holding the bare problem), `reward_model.ground_truth`, `extra_info.index`;
- plain form (BRUMO25, CMIMC25, HMMT25): `problem`, `answer`, `problem_idx`.
AIME24 stores its ground truths as "\\boxed{204}"; `answer` is the bare "204" and
`raw_answer` keeps the stored string.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from justrl.data.problems import LoadReport
from justrl.data.reading import iter_rows
from justrl.reward.dapo import last_boxed_content

log = logging.getLogger(__name__)

# avg@N of the paper: samples per problem for each benchmark.
SAMPLES_PER_PROBLEM = {
    "AIME24": 32, "AIME25": 32, "AMC23": 32, "BRUMO25": 32, "CMIMC25": 32, "HMMT25": 32,
    "MATH-500": 4, "Minerva": 4, "Olympiad-Bench": 4,
}
BENCHMARKS = tuple(SAMPLES_PER_PROBLEM)


@dataclass(frozen=True)
class BenchmarkProblem:
    id: str
    problem: str
    """As the file stores it, whitespace included: training's validation appends the suffix to it
    as the authors' dataset class does; evaluation trims it first, as their gen_vllm.py does."""
    answer: str
    raw_answer: str


@dataclass(frozen=True)
class Benchmark:
    name: str
    problems: list[BenchmarkProblem]
    samples_per_problem: int
    report: LoadReport


def strip_boxed(answer: str) -> str:
    """"\\boxed{x}" -> "x" when the whole string is one box; anything else unchanged."""
    text = answer.strip()
    content = last_boxed_content(text)
    if content is not None and text == f"\\boxed{{{content}}}":
        return content.strip()
    return text


def _parse(data, name: str, index: int) -> BenchmarkProblem | str:
    if not isinstance(data, dict):
        return "row is not an object"
    if "reward_model" in data:
        reward_model = data.get("reward_model") or {}
        raw_answer = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
        prompt = data.get("prompt")
        if isinstance(prompt, (list, tuple)) and len(prompt) == 1 and isinstance(prompt[0], dict):
            problem = prompt[0].get("content")
        else:
            problem = prompt
        extra = data.get("extra_info") or {}
        problem_id = extra.get("index") if isinstance(extra, dict) else None
    else:
        raw_answer, problem, problem_id = data.get("answer"), data.get("problem"), data.get("problem_idx")
    if isinstance(raw_answer, (int, float)) and not isinstance(raw_answer, bool):
        raw_answer = str(raw_answer)
    if not isinstance(raw_answer, str) or not raw_answer.strip():
        return "missing answer"
    if not isinstance(problem, str):
        return "missing problem" if problem is None else f"problem is not text ({type(problem).__name__})"
    if not problem.strip():
        return "empty prompt"
    if "reward_model" not in data or problem_id is None:  # veRL files carry "AIME24-0" already
        problem_id = f"{name}-{problem_id if problem_id is not None else index}"
    return BenchmarkProblem(problem_id, problem, strip_boxed(raw_answer), raw_answer)


def benchmark_path(name: str, benchmark_dir: str | Path) -> Path:
    return Path(benchmark_dir).expanduser() / name / "test.parquet"


def benchmark_file_errors(names, benchmark_dir: str | Path, setting: str) -> list[str]:
    """One message per benchmark of `names` whose file is missing or unreadable ([] if all are fine).

    Cheap (reads each parquet footer and schema, not the rows), so it runs at start-up; `setting`
    is the config key of `benchmark_dir` that the messages name. The toy sets (training validation
    in experiment=tiny) have no file. A name that is neither is reported too.
    """
    import pyarrow.parquet as pq

    from justrl.data.toy import TOY_SETS

    errors = []
    for name in names:
        if name in TOY_SETS:
            continue
        if name not in SAMPLES_PER_PROBLEM:
            errors.append(f"benchmark {name!r}: unknown; choose from {list(BENCHMARKS)} "
                          f"(or, for training validation, {list(TOY_SETS)})")
            continue
        path = benchmark_path(name, benchmark_dir)
        hint = f"({setting}={str(benchmark_dir)!r}; the default is the packaged copy, JUSTRL_BENCHMARK_DIR overrides it)"
        try:
            if not path.is_file():
                errors.append(f"benchmark {name!r}: {path} does not exist {hint}")
                continue
            columns = set(pq.ParquetFile(path).schema_arrow.names)
        except Exception as exc:  # permissions, truncated file, not parquet
            errors.append(f"benchmark {name!r}: {path} cannot be read ({type(exc).__name__}: {exc}) {hint}")
            continue
        if not ({"prompt", "reward_model"} <= columns or {"problem", "answer"} <= columns):
            errors.append(f"benchmark {name!r}: {path} has neither the veRL columns (prompt, reward_model) "
                          f"nor the plain ones (problem, answer), it has {sorted(columns)} {hint}")
    return errors


def load_benchmark(name: str, benchmark_dir: str | Path, samples_per_problem: int | None = None) -> Benchmark:
    """Load <benchmark_dir>/<name>/test.parquet; bad rows are skipped, counted and logged."""
    path = benchmark_path(name, benchmark_dir)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {name!r}: {path} does not exist "
                                f"(data.benchmark_dir={str(benchmark_dir)!r})")
    if samples_per_problem is None:
        if name not in SAMPLES_PER_PROBLEM:
            raise ValueError(f"benchmark {name!r} has no standard sample count; known: {list(BENCHMARKS)}")
        samples_per_problem = SAMPLES_PER_PROBLEM[name]
    report = LoadReport()
    problems = []
    for row in iter_rows(str(path)):
        report.rows += 1
        parsed = _parse(row.data, name, row.index)
        if isinstance(parsed, str):
            report.skip(row, parsed)
            continue
        problems.append(parsed)
    report.kept = len(problems)
    for example in report.examples:
        log.warning("benchmark %s: skipped %s", name, example)
    if not problems:
        raise ValueError(f"benchmark {name!r}: no usable rows in {path} ({report.summary()})")
    return Benchmark(name, problems, samples_per_problem, report)
