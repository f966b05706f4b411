"""The evaluation's second grading pass, as the authors ran it (thunlp/JustRL `evals/grade.py`):
every sample the rules reject goes to a verifier model (CompassVerifier-3B), served by vLLM, with
their `CV_PROMPT`; a greedy reply (temperature 0, at most 2,048 tokens) that is exactly "A" after
stripping whitespace counts as correct. A sample the judge calls correct counts as correct; the
results say whether the judge ran, on how many samples, and how many it flipped (`judge_flips`).

As theirs, and written down because it is surprising: the prompt's question is empty (their
generation files have no `question` key, and `grade.py` reads `data.get("question", "")`), the
reference is the answer as the benchmark file stores it (AIME24's "\\boxed{204}"), and the
candidate is the whole response. `judge.with_question=true` puts the problem in.

Where it runs: on a GPU by default (`judge.enable: null` means engine.gpus > 0). On a CPU it does
not, and the results say so: a 3B judge over thousands of 30k-token responses is not a CPU job.
A prompt longer than the judge's context (theirs would stop vLLM with an error) is left unjudged,
counted as rejected, and counted in the results.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# evals/grade.py's CV_PROMPT, character for character (tests/fixtures/authors/grade_cv_prompt.py
# holds their text; a test compares). Python str.format fields: question, gold_answer, llm_response.
CV_PROMPT = """
Please as a grading expert, judge whether the final answers given by the candidates below are consistent with the standard answers, that is, whether the candidates answered correctly. 
Here are some evaluation criteria:
1. Please refer to the given standard answer. You don't need to re-generate the answer to the question because the standard answer has been given. You only need to judge whether the candidate's answer is consistent with the standard answer according to the form of the question. THE STANDARD ANSWER IS ALWAYS CORRECT AND THE QUESTION IS PERFECTLY VALID. NEVER QUESTION THEM.
2. ONLY compare the FINAL ANSWER - COMPLETELY IGNORE any potential errors in the REASONING PROCESSES.
3. Some answers may be expressed in different ways, such as some answers may be a mathematical expression, some answers may be a textual description, as long as the meaning expressed is the same. Before making a judgment, please understand the question and the standard answer first, and then judge whether the candidate's answer is correct.
4. Some answers may consist of multiple items, such as multiple-choice questions, multiple-select questions, fill-in-the-blank questions, etc. Regardless of the question type, the final answer will be considered correct as long as it matches the standard answer, regardless of whether the reasoning process is correct. For multiple-select questions and multi-blank fill-in-the-blank questions, all corresponding options or blanks must be answered correctly and match the standard answer exactly to be deemed correct.
5. If the prediction is given with \\boxed{{}}, please ignore the \\boxed{{}} and only judge whether the candidate's answer is consistent with the standard answer.
6. If the candidate's answer is invalid (e.g., incomplete (cut off mid-response), lots of unnormal repetitive content, or irrelevant to the question, saying it can't answer the question because some irresistible factors, like ethical issues, no enough information, etc.), select option C (INVALID).Please judge whether the following answers are consistent with the standard answer based on the above criteria. Grade the predicted answer of this new question as one of:
A: CORRECT 
B: INCORRECT
C: INVALID
Just return the letters "A", "B", or "C", with no text around it.
Here is your task. Simply reply with either CORRECT, INCORRECT, or INVALID. Don't apologize or correct yourself if there was a mistake; we are just trying to grade the answer.
<Original Question Begin>:
{question}
<Original Question End>
<Standard Answer Begin>:
{gold_answer}
<Standard Answer End>
<Candidate's Answer Begin>: 
{llm_response}
<Candidate's Answer End>
Judging the correctness of the candidate's answer:
"""


def judge_text(question: str, gold_answer: str, response: str, with_question: bool = False) -> str:
    """The judge's user message for one sample (before the judge's chat template)."""
    return CV_PROMPT.format(question=question if with_question else "", gold_answer=gold_answer,
                            llm_response=response)


def verdict(reply: str) -> bool:
    """grade.py's rule: correct only when the stripped reply is exactly "A"."""
    return reply.strip() == "A"


def judge_enabled(enable: bool | None, gpus: int, model: str) -> tuple[bool, str]:
    """(whether the judge runs, what the results say when it does not)."""
    if enable is None:
        if gpus > 0:
            return True, ""
        return False, (f"did not run: no GPU (engine.gpus=0); the authors' scores are rules + {model} "
                       "on the rejected samples, these are rules only (judge.enable=true forces it)")
    if enable:
        return True, ""
    return False, "did not run: off (judge.enable=false); these scores are rules only"


@dataclass
class JudgeCount:
    judged: int = 0
    too_long: int = 0


def judge_rejected(cfg: DictConfig, records: dict[str, list[list]], questions: dict[str, dict[str, tuple[str, str]]],
                   out_dir: Path) -> JudgeCount:
    """Set `judge` on every rejected, not yet judged sample that fits the judge's context."""
    from transformers import AutoTokenizer

    from justrl.rollout.engine import build_engines, engine_spec
    from justrl.rollout.client import SamplingSettings
    from justrl.model.sources import resolve_eval_model
    from justrl.cluster.placement import EnginePlacement
    from justrl.rollout.fleet import RolloutFleet

    count = JudgeCount()
    pending = [(bench, r) for bench, groups in records.items() for g in groups for r in g
               if not r.correct and r.judge is None]
    if not pending:
        return count
    model_dir = resolve_eval_model(cfg.judge.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    limit = None if context is None else context - cfg.judge.max_new_tokens
    if limit is not None and limit < 1:
        from justrl.config import ConfigError

        raise ConfigError(f"judge.max_new_tokens={cfg.judge.max_new_tokens} leaves no room for a prompt in the "
                          f"judge's context of {context} tokens ({model_dir}/config.json max_position_embeddings)")
    prompts, fits = [], []
    for bench, r in pending:
        question, answer = questions[bench][r.problem_id]
        text = judge_text(question, answer, r.response, cfg.judge.with_question)
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if limit is not None and len(ids) > limit:
            count.too_long += 1
            continue
        prompts.append(ids)
        fits.append(r)
    if not prompts:
        return count
    longest = max(len(p) for p in prompts)
    spec = engine_spec(cfg.engine, max_model_len=longest + cfg.judge.max_new_tokens, seed=cfg.seed,
                       dtype=cfg.judge.dtype, tensor_parallel_size=1, extra_args=())
    placement = EnginePlacement(None, tuple(range(cfg.engine.gpus and 1)))  # one GPU, or the CPU
    fleet = RolloutFleet(build_engines([placement], spec, out_dir / "engines", names=["judge"]), model_dir)
    greedy = SamplingSettings(n=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=cfg.judge.max_new_tokens)
    try:
        fleet.start()
        replies = fleet.generate([list(p) for p in prompts], greedy, seeds=[cfg.seed] * len(prompts))
    finally:
        fleet.stop()
    texts = tokenizer.batch_decode([group[0].token_ids for group in replies], skip_special_tokens=True)
    for record, text in zip(fits, texts):
        record.judge = verdict(text)
    count.judged = len(fits)
    log.info("judge %s: %d rejected samples judged, %d called correct, %d too long for its context",
             cfg.judge.model, count.judged, sum(r.judge for r in fits), count.too_long)
    return count
