"""Sampling and grading a set of problems, and the avg@N summary of the paper's table.

Shared by `python -m justrl.eval` and the training loop's validation, so that a number in
TensorBoard and a number in a results table mean the same thing.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from justrl.eval.grading import extract_answer
from justrl.rollout.client import SamplingSettings
from justrl.rollout.fleet import RolloutFleet


@dataclass
class SampleRecord:
    """One graded sample; one line of an evaluation's jsonl file."""

    problem_id: str
    sample: int
    seed: int
    response: str
    answer: str | None
    """The extracted final answer (content of the last \\boxed{}), None without one."""
    correct: bool
    length: int
    """Response length in tokens."""
    truncated: bool
    judge: bool | None = None
    """The judge model's verdict on a sample the rules rejected (None: not judged)."""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvalItem:
    problem_id: str
    token_ids: tuple[int, ...]
    answer: str


def problem_seed(seed: int, benchmark: str, problem_id: str) -> int:
    """The sampling seed of a problem's first sample (sample j uses seed + j, vLLM's rule)."""
    return random.Random(f"justrl-eval:{seed}:{benchmark}:{problem_id}").getrandbits(30)


def sample_and_grade(fleet: RolloutFleet, pool, tokenizer, items: list[EvalItem], settings: SamplingSettings,
                     seeds: list[int]) -> list[list[SampleRecord]]:
    """`settings.n` samples per item, graded by `pool` (a ScorerPool running "grader")."""
    completions = fleet.generate([list(i.token_ids) for i in items], settings, seeds)
    flat = [(item, seed, j, c) for item, seed, group in zip(items, seeds, completions) for j, c in enumerate(group)]
    texts = tokenizer.batch_decode([c.token_ids for *_, c in flat], skip_special_tokens=True)
    answers = [extract_answer(t) for t in texts]
    scores, _ = pool.score([a or "" for a in answers], [item.answer for item, *_ in flat])
    records = [SampleRecord(item.problem_id, j, seed + j, text, answer, score > 0, len(c.token_ids), c.truncated)
               for (item, seed, j, c), text, answer, score in zip(flat, texts, answers, scores)]
    n = settings.n
    return [records[i * n:(i + 1) * n] for i in range(len(items))]


def summarize(by_problem: list[list[SampleRecord]]) -> dict:
    """The table's figures for one benchmark: avg@N and best-of-N in percent, problems solved by
    no sample and by every sample, mean response length in tokens, samples without a boxed answer."""
    samples = [r for group in by_problem for r in group]
    if not samples:
        return {"problems": 0}
    correct = [r.correct or bool(r.judge) for r in samples]
    solved = [[r.correct or bool(r.judge) for r in group] for group in by_problem]
    return {
        "problems": len(by_problem),
        "samples_per_problem": len(by_problem[0]),
        "avg": 100.0 * sum(correct) / len(correct),
        "best_of_n": 100.0 * sum(any(s) for s in solved) / len(solved),
        "solved_by_none": sum(not any(s) for s in solved),
        "solved_by_all": sum(all(s) for s in solved),
        "mean_response_tokens": sum(r.length for r in samples) / len(samples),
        "no_boxed_answer": sum(r.answer is None for r in samples),
        "truncated": sum(r.truncated for r in samples),
        "judge_flips": sum(bool(r.judge) and not r.correct for r in samples),
    }
