"""docs/conformance.md's table, checked: every recipe setting of the composed default config (both
models) against the value the authors' code sets, the training prompt built from a row in the
original release's schema, and the evaluation's template and judge prompt against the authors'
text (tests/fixtures/authors: verbatim from thunlp/JustRL at cf444e9)."""
import re
import runpy
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from justrl.config import compose

REPO = Path(__file__).resolve().parents[1]
AUTHORS = Path(__file__).parent / "fixtures" / "authors"
MODELS = {"deepseek_r1_distill_qwen_1.5b": 4380, "openmath_nemotron_1.5b": 3440}


def table_rows(text: str) -> list[tuple[str, object, str]]:
    """(justrl key, value, source) of each row of the settings table."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) == 4 and re.fullmatch(r"`[\w.:]+`", cells[1]) and cells[1] != "`trainer.total_steps`":
            rows.append((cells[1].strip("`"), yaml.safe_load(cells[2]), cells[3]))
    return rows


ROWS = table_rows((REPO / "docs" / "conformance.md").read_text())


def eval_config():
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import justrl.eval.command  # noqa: F401  (the evaluation schema)

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="justrl.hydra_conf", version_base=None):
        return hydra_compose(config_name="evaluate", overrides=["model_path=x"])


def test_the_table_is_complete():
    keys = {k for k, _, _ in ROWS}
    assert len(ROWS) >= 40 and all(source for _, _, source in ROWS)
    assert {"data.prompt_form", "data.deduplicate", "reward.val_verifier", "eval:prompt_template",
            "eval:judge.with_question"} <= keys


@pytest.mark.parametrize("model", MODELS)
def test_every_setting_is_the_authors(model):
    cfg, ev = compose([f"model={model}"]), eval_config()
    wrong = []
    for key, value, source in ROWS:
        ours = OmegaConf.select(ev, key[5:]) if key.startswith("eval:") else OmegaConf.select(cfg, key)
        if OmegaConf.is_list(ours):
            ours = list(ours)
        if ours != value:
            wrong.append(f"{key}: justrl {ours!r}, authors {value!r} ({source})")
    assert not wrong, "\n".join(wrong)
    assert cfg.trainer.total_steps == MODELS[model]
    doc = (REPO / "docs" / "conformance.md").read_text()
    assert f"| `{model}` | {MODELS[model]} |" in doc


def test_training_prompt_from_a_release_row(tmp_path, tiny_model_dir):
    """rl_dataset.py, use_boxed_suffix_prompt: the row's message + suffix_prompt, then the chat template."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from justrl.data import load_training_set
    from test_data_as_released import write_release

    path = tmp_path / "dapo-math-17k.parquet"
    write_release(path, [("Find the sum of all integers $n$ with $n^2 < 10$.", "0")], repeats=1)
    row = pq.read_table(path).to_pylist()[0]
    suffix_prompt = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."  # rl_dataset.py:141
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    theirs = tok.apply_chat_template([{"role": "user", "content": row["prompt"][0]["content"] + suffix_prompt}],
                                     add_generation_prompt=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs  # transformers 5
    cfg = compose(["experiment=tiny", f"data.train_path={path}", "data.max_prompt_length=1024"])
    assert list(load_training_set(cfg.data, tok).prompt(0).token_ids) == list(theirs)


def test_evaluation_template_and_judge_prompt_are_the_authors():
    from justrl.eval.judge import CV_PROMPT, judge_text, verdict

    gen = runpy.run_path(str(AUTHORS / "gen_vllm_settings.py"))
    assert eval_config().prompt_template == gen["PROMPT_TEMPLATE"]
    assert eval_config().prompt_template.format(problem="Find $x$.") == \
        "Find $x$. Please reason step by step, and put your final answer within \\boxed{}."
    assert CV_PROMPT == runpy.run_path(str(AUTHORS / "grade_cv_prompt.py"))["CV_PROMPT"]
    text = judge_text("What is 1+1?", "\\boxed{2}", "... so \\boxed{2}")
    assert "<Original Question Begin>:\n\n<Original Question End>" in text  # the empty question, as theirs
    assert "<Standard Answer Begin>:\n\\boxed{2}\n<Standard Answer End>" in text
    assert "<Original Question Begin>:\nWhat is 1+1?\n" in judge_text("What is 1+1?", "2", "r", with_question=True)
    assert [verdict(r) for r in ("A", " A\n", "A: CORRECT", "a", "B", "C", "")] == [True, True, False, False, False,
                                                                                 False, False]
