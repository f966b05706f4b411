"""The set a run trains on: its prompts, the rows one pass goes over, and what was left out.

`load_training_set(cfg.data, tokenizer)` reads `data.train_path` (justrl.data.problems: every row
as released by default), builds each distinct prompt once (justrl.data.prompts) and drops the rows
whose prompt is too long, as the authors' dataset does before its sampler sees the rows. The
sampler (justrl.data.sampler) draws row positions; `prompt(i)` is the prompt of row i. Only
learner rank 0 holds it.
"""
from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass

from justrl.data.problems import LoadReport, ProblemTable, load_problem_files
from justrl.data.prompts import Prompt, fit_prompts
from justrl.data.toy import TOY_SETS, toy_problems

log = logging.getLogger(__name__)


def load_problems(source: str, problem_key: str | None = None, answer_key: str | None = None,
                  prompt_form: str = "as_released", deduplicate: bool = False) -> ProblemTable:
    """The training problems of `data.train_path`: one of justrl's generated toy sets by name
    ("toy", "toy_scratchpad": justrl.data.toy, one row per problem), otherwise DAPO-style files
    (justrl.data.problems.load_problem_files)."""
    if source in TOY_SETS:
        problems = toy_problems("train", task=source)
        n = len(problems)
        return ProblemTable(problems, array("i", range(n)), LoadReport(rows=n, kept=n, distinct=n))
    return load_problem_files(source, problem_key, answer_key, prompt_form, deduplicate)


@dataclass
class TrainingSet:
    source: str
    prompts: list[Prompt]
    """Each distinct prompt that fits data.max_prompt_length, once."""
    rows: array
    """array('i'): per row one pass goes over, in file order, its index into `prompts`."""
    report: LoadReport
    dropped_problems: int
    """Distinct prompts longer than data.max_prompt_length."""
    dropped_rows: int
    """Rows of those prompts."""

    def __len__(self) -> int:
        return len(self.rows)

    def prompt(self, row: int) -> Prompt:
        return self.prompts[self.rows[row]]

    def steps_per_pass(self, prompts_per_step: int) -> int:
        """Steps of one pass (the tail shorter than a step is skipped, as a DataLoader with
        drop_last=True does)."""
        return len(self.rows) // prompts_per_step

    def summary(self, prompts_per_step: int, total_steps: int | None) -> str:
        r = self.report
        steps = self.steps_per_pass(prompts_per_step)
        if total_steps is None:
            length = f"trainer.total_steps null: one pass, {steps} steps"
        else:
            passes = total_steps / steps if steps else float("inf")
            length = f"trainer.total_steps {total_steps} ({passes:.2f} passes)"
        skipped = sum(r.skipped.values())
        return (f"{self.source}: {r.rows} rows, {r.distinct} distinct problems"
                f"{f', {skipped} bad rows skipped' if skipped else ''}; "
                f"{self.dropped_rows} rows ({self.dropped_problems} problems) dropped as longer than "
                f"data.max_prompt_length; {len(self.rows)} rows in a pass of {steps} steps of "
                f"{prompts_per_step} prompts; {length}")


def load_training_set(data, tokenizer) -> TrainingSet:
    """The training set of the `data` config section (see the module docstring)."""
    table = load_problems(data.train_path, data.problem_key, data.answer_key, data.prompt_form,
                          data.deduplicate)
    fitted = fit_prompts(table.problems, tokenizer, data.max_prompt_length, data.prompt_suffix)
    new_index, prompts = [], []
    for prompt in fitted:
        new_index.append(-1 if prompt is None else len(prompts))
        if prompt is not None:
            prompts.append(prompt)
    rows = array("i", (j for j in (new_index[i] for i in table.rows) if j >= 0))
    return TrainingSet(data.train_path, prompts, rows, table.report,
                       dropped_problems=len(fitted) - len(prompts), dropped_rows=len(table.rows) - len(rows))
