"""What the model will see, before any GPU time is spent:

    python -m justrl.data.preview [--prompts N] <the launch's overrides>
    python -m justrl.data.preview --prompts 3 model=openmath_nemotron_1.5b data.train_path=/data/dapo-math-17k.parquet

Composes the same config `python -m justrl.launch <overrides>` would, reads the training data as
the run does (justrl.data.training_set) and prints: the data summary (rows, distinct problems,
rows dropped as too long, steps per pass, trainer.total_steps), the first N training prompts in
the order step 1 draws them, the first prompt of each validation set, and the first evaluation
prompt (hydra_conf/evaluate.yaml's template), each as the engines receive it (the token ids
decoded: the chat template, the generation prompt) with its token count.
"""
from __future__ import annotations

import argparse
import sys

RULE = "-" * 100


def _show(title: str, tokenizer, token_ids) -> str:
    return f"{RULE}\n{title} ({len(token_ids)} tokens)\n{RULE}\n{tokenizer.decode(list(token_ids))}\n"


def evaluation_template(model_path: str) -> str:
    """The evaluation's prompt template, from the evaluation config as `justrl.eval.command` composes it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import justrl.eval.command  # noqa: F401  (registers the evaluation schema)

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="justrl.hydra_conf", version_base=None):
        return compose(config_name="evaluate", overrides=[f"model_path={model_path}"]).prompt_template


def preview(overrides: list[str], prompts: int = 3) -> str:
    from transformers import AutoTokenizer

    from justrl.config import compose
    from justrl.data import (BENCHMARKS, PromptSampler, encode_prompt, load_benchmark, load_training_set,
                             validation_sets)
    from justrl.eval.command import eval_problem
    from justrl.model.sources import resolve_model_path

    cfg = compose(overrides)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
    train_set = load_training_set(cfg.data, tokenizer)
    per_step = cfg.algorithm.prompts_per_step
    total = cfg.trainer.total_steps or train_set.steps_per_pass(per_step)
    out = [f"model: {cfg.model.path}; data.prompt_form={cfg.data.prompt_form}, "
           f"data.deduplicate={cfg.data.deduplicate}",
           f"training data: {train_set.summary(per_step, cfg.trainer.total_steps)}",
           f"steps: {total}, {per_step} prompts x {cfg.rollout.n} responses each"]
    sampler = PromptSampler(len(train_set), cfg.data.seed)
    for k, row in enumerate(sampler.next_batch(min(prompts, len(train_set))), 1):
        prompt = train_set.prompt(row)
        out.append(_show(f"training prompt {k} of step 1 (row {row}, {prompt.problem.origin}; answer "
                         f"{prompt.problem.answer!r})", tokenizer, prompt.token_ids))
    for name, val_prompts in validation_sets(cfg.data, tokenizer).items():
        if val_prompts:
            out.append(_show(f"validation {name}: first of {len(val_prompts)} prompts", tokenizer,
                             val_prompts[0].token_ids))
    template = evaluation_template(cfg.model.path)
    first = load_benchmark(BENCHMARKS[0], cfg.data.benchmark_dir).problems[0]
    out.append(_show(f"evaluation {BENCHMARKS[0]}: first prompt (template {template!r})", tokenizer,
                     encode_prompt(tokenizer, eval_problem(first, template).problem, suffix="")))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=3, help="training prompts to show (default 3)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m justrl.launch")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(preview(args.overrides, args.prompts))
    except (ValueError, FileNotFoundError) as exc:  # ConfigError is a ValueError
        print(f"justrl.data.preview: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
