"""Rank 0's side of a step, the `Controller`: it owns the engines and the reward workers, and turns
a step's prompts into the learner's batch (generate, score, penalise, advantages) and its
metrics; it also runs the validation. The loop around it is justrl.trainer's.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from justrl.rollout.launch import SLEEP_MODE_ARGS
from justrl.rollout.engine import build_engines, engine_spec
from justrl.rollout.client import SamplingSettings
from justrl.eval.sampling import EvalItem, problem_seed, sample_and_grade, summarize
from justrl.grpo import Sequence, group_advantages
from justrl.cluster.placement import EnginePlacement
from justrl.reward import ScorerPool, overlong_penalty
from justrl.rollout.fleet import RolloutFleet
from justrl.weight_sync.registry import engine_args_for, engine_env_for

log = logging.getLogger("justrl")


def step_seeds(seed: int, step: int, num_prompts: int, n: int) -> list[int]:
    """Per-prompt sampling seeds of a step; vLLM gives sample i of a prompt seed + i, so prompts
    are spaced n apart and no two samples of a step share a seed."""
    base = random.Random(f"justrl:{seed}:{step}").getrandbits(30)
    return [base + i * n for i in range(num_prompts)]


class Controller:
    """Rank 0's side of the loop: engines, reward workers, metrics."""

    def __init__(self, cfg: DictConfig, tokenizer, serve_dir: Path, placements: list[EnginePlacement],
                 engine_logs: Path, secret: str | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        r = cfg.rollout
        spec = engine_spec(r, max_model_len=cfg.data.max_prompt_length + max(r.max_response_length, r.val_max_new_tokens),
                           seed=cfg.trainer.seed, srun_args=tuple(cfg.cluster.engine_srun_args),
                           extra_env=engine_env_for(r.weight_sync),
                           extra_args=tuple(r.engine_args) + engine_args_for(r.weight_sync)
                           + (SLEEP_MODE_ARGS if cfg.cluster.placement == "colocated" else ()))
        engines = build_engines(placements, spec, engine_logs, node_gpus=cfg.cluster.gpus_per_node, secret=secret)
        self.fleet = RolloutFleet(engines, serve_dir, max_restarts=r.max_restarts,
                                  max_requests_per_engine=r.max_requests_per_engine,
                                  stall_timeout_s=r.stall_timeout_s)
        self.scorer = ScorerPool(cfg.reward.verifier, cfg.reward.num_workers, cfg.reward.timeout_s)
        # The other training verifier scores every response too, for the log only: how often the
        # strict and the lenient verdicts differ (what the lenient ablation changes).
        self.shadow_scorer = ScorerPool(OTHER_VERIFIER[cfg.reward.verifier], cfg.reward.num_workers,
                                        cfg.reward.timeout_s)
        # Validation: val/<benchmark>/accuracy by reward.val_verifier, on the whole response (the
        # authors' in-training validation of AIME24/AIME25/AMC23 routes to veRL's math_verify
        # reward: thunlp/JustRL train/verl/utils/reward_score/__init__.py, `default_compute_score`;
        # justrl's `lenient` verifier is that reward), and val/<benchmark>/accuracy_grader by the
        # evaluation grader (the number `python -m justrl.eval` reports). Both training
        # verifiers' pools run anyway; the one named by reward.val_verifier scores validation too.
        self.grader = ScorerPool("grader", 1, cfg.reward.timeout_s)
        self.val_scorer = {p.verifier: p for p in (self.scorer, self.shadow_scorer)}[cfg.reward.val_verifier]
        o = cfg.reward.overlong
        log.info("reward: verifier %s; overlong penalty %s", cfg.reward.verifier,
                 f"on (buffer {o.buffer}, factor {o.factor})" if o.enable else "off")
        self.train_settings = SamplingSettings(r.n, r.temperature, r.top_p, r.top_k, r.max_response_length)
        self.val_settings = SamplingSettings(r.val_samples, r.val_temperature, r.val_top_p, -1, r.val_max_new_tokens)

    def start(self) -> None:
        self.fleet.start()

    def close(self) -> None:
        self.fleet.stop()
        self.scorer.close()
        self.shadow_scorer.close()
        self.grader.close()

    def training_batch(self, prompts: list, step: int, weights_step: int) -> tuple[list[Sequence], dict[str, float]]:
        """One step's batch for the learner: generate, score, penalise, advantages; and the
        step's rollout metrics. `weights_step`: the step whose weights the engines serve
        (justrl.weight_sync.WeightSync.served_step, set once the sync's push is done)."""
        t0 = time.perf_counter()
        restarts_before = self.fleet.restarts
        flat = self.generate(prompts, step)
        t1 = time.perf_counter()
        scores, shadow, stats = self.score(flat)
        lengths = [len(c.token_ids) for _, c in flat]
        rewards, penalties = self.penalise(scores, lengths)
        advantages = group_advantages(torch.tensor(rewards, dtype=torch.float32),
                                      torch.arange(len(prompts)).repeat_interleave(self.cfg.rollout.n),
                                      self.cfg.algorithm.adv_eps)
        t2 = time.perf_counter()
        sequences = [Sequence(tuple(p.token_ids), c.token_ids, float(a))
                     for (p, c), a in zip(flat, advantages.tolist())]
        metrics = self.metrics(prompts, flat, lengths, scores, shadow, rewards, penalties, stats)
        fleet = self.fleet
        if fleet.lost:  # degraded: said every step, not only when it happened
            log.warning("step %d: running degraded on %d of %d rollout engines; lost: %s", step,
                        len(fleet.live_engines), len(fleet.engines),
                        "; ".join(f"{name} ({why})" for name, why in fleet.lost.items()))
        metrics.update({"rollout/engine_restarts": float(self.fleet.restarts - restarts_before),
                        "rollout/engines_alive": float(len(fleet.live_engines)),
                        "rollout/weights_step": float(weights_step),
                        "perf/time_rollout": t1 - t0, "perf/time_reward": t2 - t1})
        if stats.first_error:
            log.warning("step %d: %d responses could not be scored (first error: %s)", step, stats.errors,
                        stats.first_error)
        return sequences, metrics

    def generate(self, prompts: list, step: int) -> list:
        """(prompt, completion) pairs, n per prompt in prompt order, sampled with the step's seeds."""
        n = self.cfg.rollout.n
        completions = self.fleet.generate([list(p.token_ids) for p in prompts], self.train_settings,
                                          step_seeds(self.cfg.trainer.seed, step, len(prompts), n))
        return [(p, c) for p, group in zip(prompts, completions) for c in group]

    def score(self, flat: list):
        """(the run's verifier's scores, the other training verifier's, the scoring stats) of the
        decoded responses (special tokens skipped, as veRL's reward manager does)."""
        texts = self.tokenizer.batch_decode([c.token_ids for _, c in flat], skip_special_tokens=True)
        answers = [p.problem.answer for p, _ in flat]
        scores, stats = self.scorer.score(texts, answers)
        shadow, _ = self.shadow_scorer.score(texts, answers)
        return scores, shadow, stats

    def penalise(self, scores: list[float], lengths: list[int]) -> tuple[list[float], list[float]]:
        """(rewards, penalties): the scores plus the overlong penalty where reward.overlong is on
        (the length_penalty ablation); no penalties otherwise."""
        o = self.cfg.reward.overlong
        if not o.enable:
            return list(scores), []
        penalties = [overlong_penalty(L, self.cfg.rollout.max_response_length, o.buffer, o.factor) for L in lengths]
        return [r + q for r, q in zip(scores, penalties)], penalties

    def metrics(self, prompts, flat, lengths, scores, shadow, rewards, penalties, stats) -> dict[str, float]:
        """The batch's reward/, response_length/ and prompt_length/ metrics."""
        per_group = torch.tensor(scores).view(len(prompts), self.cfg.rollout.n) > 0
        metrics = {
            "reward/mean": sum(rewards) / len(rewards),
            "reward/accuracy": sum(s > 0 for s in scores) / len(scores),
            "reward/solved_none": per_group.any(dim=1).logical_not().float().mean().item(),
            "reward/solved_all": per_group.all(dim=1).float().mean().item(),
            "reward/timeouts": float(stats.timeouts),
            "reward/errors": float(stats.errors),
            "response_length/mean": sum(lengths) / len(lengths),
            "response_length/max": float(max(lengths)),
            "response_length/min": float(min(lengths)),
            "response_length/clip_ratio": sum(c.truncated for _, c in flat) / len(flat),
            "prompt_length/mean": sum(len(p.token_ids) for p in prompts) / len(prompts),
        }
        metrics.update(verifier_metrics(scores, shadow, self.cfg.reward.verifier))
        if penalties:
            metrics["reward/overlong_penalty"] = sum(penalties) / len(penalties)
        return metrics

    def validate(self, val_sets: dict[str, list]) -> dict[str, float]:
        """avg@N of each validation set, by reward.val_verifier (`accuracy`) and by the evaluation
        grader (`accuracy_grader`: the same code and seeds as `justrl.eval.command`)."""
        metrics = {}
        r, train_stall = self.cfg.rollout, self.fleet.stall_timeout_s
        if train_stall is not None:  # longer responses: the first completion may take longer too
            self.fleet.stall_timeout_s = train_stall * max(1.0, r.val_max_new_tokens / r.max_response_length)
        try:
            return self._validate(val_sets, metrics)
        finally:
            self.fleet.stall_timeout_s = train_stall

    def _validate(self, val_sets: dict[str, list], metrics: dict[str, float]) -> dict[str, float]:
        for name, prompts in val_sets.items():
            items = [EvalItem(getattr(p.problem, "id", None) or p.problem.origin, p.token_ids, p.problem.answer)
                     for p in prompts]
            seeds = [problem_seed(self.cfg.trainer.seed, name, item.problem_id) for item in items]
            graded = sample_and_grade(self.fleet, self.grader, self.tokenizer, items, self.val_settings, seeds)
            summary = summarize(graded)
            responses = [r.response for group in graded for r in group]
            # The ground truth as the file stores it (AIME24's "\\boxed{204}"), as veRL's reward gets it.
            truths = [getattr(p.problem, "raw_answer", p.problem.answer) for p in prompts]
            answers = [truth for truth, group in zip(truths, graded) for _ in group]
            scores, _ = self.val_scorer.score(responses, answers)
            metrics[f"val/{name}/accuracy"] = sum(s > 0 for s in scores) / len(scores)
            metrics[f"val/{name}/accuracy_grader"] = summary["avg"] / 100.0
            metrics[f"val/{name}/response_length"] = summary["mean_response_tokens"]
        return metrics


OTHER_VERIFIER = {"dapo": "lenient", "lenient": "dapo"}


def verifier_metrics(scores: list[float], shadow: list[float], verifier: str) -> dict[str, float]:
    """The two training verifiers side by side, from `scores` (the run's `verifier`) and `shadow`
    (the other one's) for the same responses:
    reward/accuracy_dapo, reward/accuracy_lenient: the share each accepts;
    reward/verifier_disagreement: the share on which their verdicts differ;
    reward/strict_format: of the responses `lenient` accepts (right value), the share `dapo`
    accepts too (written exactly as the ground truth); NaN when `lenient` accepts none."""
    by_name = {verifier: scores, OTHER_VERIFIER[verifier]: shadow}
    dapo, lenient = [s > 0 for s in by_name["dapo"]], [s > 0 for s in by_name["lenient"]]
    n, n_lenient = len(dapo), sum(lenient)
    return {
        "reward/accuracy_dapo": sum(dapo) / n,
        "reward/accuracy_lenient": n_lenient / n,
        "reward/verifier_disagreement": sum(a != b for a, b in zip(dapo, lenient)) / n,
        "reward/strict_format": sum(a and b for a, b in zip(dapo, lenient)) / n_lenient if n_lenient else float("nan"),
    }
