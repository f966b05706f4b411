"""Optional second grading pass: a verifier model, served by vLLM, judges the samples the rules
rejected (the authors used CompassVerifier-3B). A sample it calls correct counts as correct; the
results say which judge was used and how many samples it flipped (`judge_flips`)."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# CompassVerifier's task format: question, reference, candidate; the verdict is one letter.
JUDGE_PROMPT = (
    "Please as a grading expert, judge whether the final answer given by the candidate below is consistent "
    "with the standard answer, that is, whether the candidate answered correctly.\n\n"
    "<Original Question Begin>: {question} <Original Question End>\n"
    "<Standard Answer Begin>: {answer} <Standard Answer End>\n"
    "<Candidate's Answer Begin>: {response} <Candidate's Answer End>\n\n"
    "Judging the correctness of the candidate's answer: A: CORRECT, B: INCORRECT, C: INVALID.\n"
    "Just return the letter \"A\", \"B\", or \"C\", with no text around it."
)


def verdict(text: str) -> bool:
    """True when the judge's reply starts with "A" (correct)."""
    return text.strip().upper().startswith("A")


def judge_rejected(cfg: DictConfig, records: dict[str, list[list]], questions: dict[str, dict[str, tuple[str, str]]],
                   out_dir: Path) -> int:
    """Set `judge` on every rejected, not yet judged sample; returns how many were judged."""
    from transformers import AutoTokenizer

    from justrl.engines import EngineSpec, SamplingSettings, build_engines
    from justrl.models import resolve_eval_model
    from justrl.placement import EnginePlacement
    from justrl.rollout import RolloutFleet

    pending = [(bench, r) for bench, groups in records.items() for g in groups for r in g
               if not r.correct and r.judge is None]
    if not pending:
        return 0
    model_dir = resolve_eval_model(cfg.judge.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for bench, r in pending:
        question, answer = questions[bench][r.problem_id]
        text = JUDGE_PROMPT.format(question=question, answer=answer, response=r.response[-cfg.judge.max_response_chars:])
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        prompts.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    longest = max(len(p) for p in prompts)
    spec = EngineSpec(max_model_len=longest + cfg.judge.max_new_tokens, dtype=cfg.judge.dtype, seed=cfg.seed,
                      gpu_memory_utilization=cfg.engine.gpu_memory_utilization,
                      cpu_kv_cache_gb=cfg.engine.cpu_kv_cache_gb, startup_timeout_s=cfg.engine.startup_timeout_s,
                      request_timeout_s=cfg.engine.request_timeout_s)
    placement = EnginePlacement(None, tuple(range(cfg.engine.gpus and 1)))  # one GPU, or the CPU
    fleet = RolloutFleet(build_engines([placement], spec, out_dir / "engines", names=["judge"]), model_dir)
    greedy = SamplingSettings(n=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=cfg.judge.max_new_tokens)
    try:
        fleet.start()
        replies = fleet.generate([list(p) for p in prompts], greedy, seeds=[cfg.seed] * len(prompts))
    finally:
        fleet.stop()
    texts = tokenizer.batch_decode([group[0].token_ids for group in replies], skip_special_tokens=True)
    for (_, record), text in zip(pending, texts):
        record.judge = verdict(text)
    log.info("judge %s: %d rejected samples judged, %d called correct", cfg.judge.model, len(pending),
             sum(r.judge for _, r in pending))
    return len(pending)
