"""The recipe's prompt: one user message, problem + boxed suffix, in the model's chat template.

Rendered as text with the generation prompt, then tokenised without extra special tokens (the
template already holds them), as the reference's dataset does. Prompts longer than the limit are
dropped and counted, never truncated.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from justrl.data.problems import Problem

log = logging.getLogger(__name__)

BOXED_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def render_prompt(tokenizer, problem: str, suffix: str = BOXED_SUFFIX) -> str:
    """The chat-template text of the recipe's prompt for `problem`."""
    messages = [{"role": "user", "content": problem + suffix}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer, problem: str, suffix: str = BOXED_SUFFIX) -> list[int]:
    """Token ids of the recipe's prompt for `problem`."""
    return list(tokenizer(render_prompt(tokenizer, problem, suffix), add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Prompt:
    problem: Problem
    token_ids: tuple[int, ...]


def build_prompts(problems: list[Problem], tokenizer, max_prompt_length: int,
                  suffix: str = BOXED_SUFFIX) -> tuple[list[Prompt], int]:
    """Encode every problem; drop those whose prompt exceeds `max_prompt_length` tokens.

    Returns (prompts, number dropped). The order of `problems` is kept.
    """
    fitted = fit_prompts(problems, tokenizer, max_prompt_length, suffix)
    prompts = [p for p in fitted if p is not None]
    return prompts, len(fitted) - len(prompts)


def fit_prompts(problems: list[Problem], tokenizer, max_prompt_length: int,
                suffix: str = BOXED_SUFFIX) -> list[Prompt | None]:
    """The prompt of each problem, None for one longer than `max_prompt_length` tokens (the
    authors' `filter_overlong_prompts`: the chat template's token count, generation prompt
    included, at most `data.max_prompt_length`)."""
    fitted: list[Prompt | None] = []
    for problem in problems:
        ids = encode_prompt(tokenizer, problem.problem, suffix)
        fitted.append(Prompt(problem, tuple(ids)) if len(ids) <= max_prompt_length else None)
    dropped = sum(p is None for p in fitted)
    log.info("prompts: %d kept, %d dropped as longer than %d tokens", len(fitted) - dropped, dropped,
             max_prompt_length)
    if dropped == len(fitted):
        raise ValueError(f"every one of {len(problems)} prompts is longer than "
                         f"data.max_prompt_length={max_prompt_length} tokens")
    return fitted
