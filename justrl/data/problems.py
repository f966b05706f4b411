"""Training problems from DAPO-Math-17k in either form, every row kept as released, every bad row
counted.

Forms recognised per row:
- the original release (BytedTsinghua-SIA/DAPO-Math-17k, `dapo-math-17k.parquet`): `prompt` is a
  one-message chat whose content wraps the problem in DAPO's "Answer: $Answer" instruction, the
  ground truth is in `reward_model.ground_truth`; ~1.79M rows repeating ~17.9k problems;
- processed copies: a problem column (`problem`, `prompt`, `question`, or `data.problem_key`) and
  an answer column (`answer`, `solution`, `ground_truth`, or `data.answer_key`).

What a prompt is built from (`data.prompt_form`):
- `as_released` (the recipe): the file's user message exactly as it is, DAPO's instruction
  included; the authors' dataset class appends the boxed suffix to `doc["prompt"][0]["content"]`
  (thunlp/JustRL `train/verl/utils/dataset/rl_dataset.py`, `use_boxed_suffix_prompt`);
- `stripped`: DAPO's instruction removed, the bare problem (what justrl did before).
A processed copy's problem column is the bare problem in both forms (its whitespace trimmed).

Rows (`data.deduplicate`): by default every usable row is kept, in file order, as the authors'
run sees them: one pass over all ~1.79M rows is their epoch, and a problem is drawn as often as
the release repeats it. The table holds each distinct (prompt text, answer) pair once and one
32-bit index per row (~7 MB for the release, not a copy of the text per row). With
`deduplicate=true` a prompt text is kept once (first occurrence, its answer wins).

A row without a usable problem or answer is skipped and recorded with its file and row index.
"""
from __future__ import annotations

import logging
from array import array
from collections import Counter
from dataclasses import dataclass, field

from justrl.data.reading import Row, BadJsonLine, iter_rows

log = logging.getLogger(__name__)

DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be "
               "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.")
DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'
PROBLEM_KEYS = ("problem", "prompt", "question")
ANSWER_KEYS = ("answer", "solution", "ground_truth")
MAX_EXAMPLES_KEPT = 20  # bad-row examples kept in a report (the counts are always complete)
PROMPT_FORMS = ("as_released", "stripped")


@dataclass(frozen=True)
class Problem:
    problem: str
    """The text the prompt is built from (the suffix is appended to it): the file's user message
    as released, or the bare problem (data.prompt_form, the module docstring)."""
    answer: str
    """The ground truth, as a string (compared exactly by the `dapo` verifier)."""
    origin: str
    """`file:row` of the first row that held this problem."""


@dataclass(frozen=True)
class SkippedRow:
    file: str
    index: int
    """0-based row index within `file`."""
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.index}: {self.reason}"


@dataclass
class LoadReport:
    rows: int = 0
    """Rows read, bad ones included."""
    kept: int = 0
    """Rows kept (what one pass goes over)."""
    distinct: int = 0
    """Distinct (prompt text, answer) pairs among the kept rows."""
    duplicates: int = 0
    """Usable rows repeating a prompt text seen before (kept unless data.deduplicate)."""
    conflicting_duplicates: int = 0
    """Duplicates whose answer differs from the first occurrence's."""
    unwrapped: int = 0
    """Original-form rows whose DAPO instruction was removed."""
    skipped: Counter = field(default_factory=Counter)
    """Reason -> number of rows skipped for it."""
    examples: list[SkippedRow] = field(default_factory=list)
    """The first skipped rows (file, row index, reason)."""

    def skip(self, row: Row, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES_KEPT:
            self.examples.append(SkippedRow(row.file, row.index, reason))

    def summary(self) -> str:
        parts = [f"{self.rows} rows read, {self.kept} kept, {self.distinct} distinct problems",
                 f"{self.duplicates} repeat a problem seen before"]
        if self.conflicting_duplicates:
            parts.append(f"{self.conflicting_duplicates} of them with a different answer")
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())))
        return "; ".join(parts)


def unwrap_dapo_prompt(text: str) -> tuple[str, bool]:
    """Remove DAPO's "Answer: $Answer" instruction around a problem; (problem, was_wrapped)."""
    stripped = text.strip()
    if not stripped.startswith(DAPO_PREFIX):
        return stripped, False
    body = stripped[len(DAPO_PREFIX):]
    if body.rstrip().endswith(DAPO_SUFFIX):
        body = body.rstrip()[: -len(DAPO_SUFFIX)]
    return body.strip(), True


def _answer_text(value) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):  # jsonl copies often store integer answers as numbers
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def parse_row(row: Row, problem_key: str | None, answer_key: str | None,
              prompt_form: str = "as_released") -> tuple[str, str, bool] | str:
    """(prompt text, answer, was_wrapped) for a usable row, else the reason it is skipped."""
    data = row.data
    if isinstance(data, BadJsonLine):
        return f"not valid JSON ({data.error})"
    if not isinstance(data, dict):
        return f"row is a {type(data).__name__}, not an object"

    reward_model = data.get("reward_model")
    if answer_key is not None:
        answer = data.get(answer_key)
    elif isinstance(reward_model, dict) and "ground_truth" in reward_model:
        answer = reward_model.get("ground_truth")
    else:
        answer = next((data[k] for k in ANSWER_KEYS if data.get(k) is not None), None)
    answer = _answer_text(answer)
    if answer is None:
        return "missing answer"

    keys = (problem_key,) if problem_key is not None else PROBLEM_KEYS
    raw = next((data[k] for k in keys if data.get(k) is not None), None)
    chat = isinstance(raw, (list, tuple))
    if chat:  # the original form
        users = [m for m in raw if isinstance(m, dict) and m.get("role", "user") == "user"]
        if len(users) != 1:
            return f"chat prompt has {len(users)} user messages, expected 1"
        raw = users[0].get("content")
    if raw is None:
        return "missing problem"
    if not isinstance(raw, str):
        return f"problem is not text ({type(raw).__name__})"
    problem, wrapped = unwrap_dapo_prompt(raw)
    if not problem:
        return "empty prompt"
    if chat and prompt_form == "as_released":
        return raw, answer, False  # the message exactly as released
    return problem, answer, wrapped


@dataclass
class ProblemTable:
    """The usable rows of a training source: each distinct (prompt text, answer) pair once, and
    per row, in file order, the index of its pair."""

    problems: list[Problem]
    rows: array
    """array('i'): one index into `problems` per kept row."""
    report: LoadReport


def load_problem_files(source: str, problem_key: str | None = None, answer_key: str | None = None,
                       prompt_form: str = "as_released", deduplicate: bool = False) -> ProblemTable:
    """Load and validate training problems from files; see the module docstring.
    (`justrl.data.load_problems` also knows justrl's generated toy sets by name.)"""
    if prompt_form not in PROMPT_FORMS:
        raise ValueError(f"data.prompt_form: must be one of {list(PROMPT_FORMS)}, got {prompt_form!r}")
    report = LoadReport()
    problems: list[Problem] = []
    by_pair: dict[tuple[str, str], int] = {}
    first_answer: dict[str, str] = {}
    rows = array("i")
    columns = ["prompt", "problem", "question", "answer", "solution", "ground_truth", "reward_model"]
    columns += [k for k in (problem_key, answer_key) if k]
    for row in iter_rows(source, columns=columns):
        report.rows += 1
        parsed = parse_row(row, problem_key, answer_key, prompt_form)
        if isinstance(parsed, str):
            report.skip(row, parsed)
            continue
        text, answer, wrapped = parsed
        report.unwrapped += wrapped
        seen = first_answer.get(text)
        if seen is not None:
            report.duplicates += 1
            report.conflicting_duplicates += seen != answer
            if deduplicate:
                continue
        else:
            first_answer[text] = answer
        index = by_pair.get((text, answer))
        if index is None:
            index = by_pair[(text, answer)] = len(problems)
            problems.append(Problem(text, answer, f"{row.file}:{row.index}"))
        rows.append(index)
    report.kept, report.distinct = len(rows), len(problems)
    if report.rows == 0:
        raise ValueError(f"{source}: no rows")
    if not problems:
        raise ValueError(f"{source}: no usable rows ({report.summary()}); first: {[str(e) for e in report.examples[:3]]}")
    log.info("training data %s: %s", source, report.summary())
    for example in report.examples:
        log.warning("skipped %s", example)
    return ProblemTable(problems, rows, report)
