"""The training data as the authors' run reads it (thunlp/JustRL train/verl/utils/dataset/rl_dataset.py,
train/verl/trainer/main_ppo.py `create_rl_sampler`): every row of the original release kept, the
prompt built from the file's own user message + the boxed suffix, one seeded permutation over all
rows in veRL's order, a new pass announced; and the preview that shows it."""
import logging
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import RandomSampler

from justrl.config import compose
from justrl.data import PromptSampler, load_problems, load_training_set
from justrl.data.problems import DAPO_PREFIX, DAPO_SUFFIX

SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
# The original release's schema (BytedTsinghua-SIA/DAPO-Math-17k, dapo-math-17k.parquet), column for column.
RELEASE_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct([("index", pa.string())])),
])


def release_message(problem: str) -> str:
    """A user message as the release writes it: DAPO's instruction, the problem, the reminder."""
    return f"{DAPO_PREFIX}\n\n{problem}\n\n{DAPO_SUFFIX}"


def write_release(path, problems, repeats):
    rows = [{"data_source": "math_dapo", "prompt": [{"content": release_message(p), "role": "user"}],
             "ability": "MATH", "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
             "extra_info": {"index": f"id-{i}"}}
            for _ in range(repeats) for i, (p, a) in enumerate(problems)]
    pq.write_table(pa.Table.from_pylist(rows, schema=RELEASE_SCHEMA), path)
    return rows


PROBLEMS = [("What is $1+1$?", "2"), ("Find $x$ if $2x = 6$.", "3"), ("Compute $3 \\cdot 4$.", "12")]


def tiny_data_cfg(path, *more):
    return compose(["experiment=tiny", f"data.train_path={path}", "data.max_prompt_length=1024", *more])


def test_every_row_is_kept_as_one_index(tmp_path):
    path = tmp_path / "dapo-math-17k.parquet"
    write_release(path, PROBLEMS, repeats=4)
    table = load_problems(str(path))
    assert len(table.problems) == 3 and table.rows.itemsize == 4  # one 32-bit index per row
    assert list(table.rows) == [0, 1, 2] * 4
    r = table.report
    assert (r.rows, r.kept, r.distinct, r.duplicates) == (12, 12, 3, 9)
    assert r.summary().startswith("12 rows read, 12 kept, 3 distinct problems")
    assert table.problems[0].problem == release_message(PROBLEMS[0][0])  # the message, not the bare problem
    assert table.problems[1].origin == f"{path}:1"
    dedup = load_problems(str(path), deduplicate=True)
    assert list(dedup.rows) == [0, 1, 2] and dedup.report.kept == 3


def test_prompt_is_the_release_message_plus_suffix(tmp_path, tiny_model_dir):
    """rl_dataset.py: `doc[prompt_key][0]['content'] + suffix_prompt`, then the chat template."""
    from transformers import AutoTokenizer

    path = tmp_path / "dapo-math-17k.parquet"
    rows = write_release(path, PROBLEMS, repeats=2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train_set = load_training_set(tiny_data_cfg(path).data, tok)
    assert len(train_set) == 6 and len(train_set.prompts) == 3
    for i, row in enumerate(rows):
        expected = tok.apply_chat_template([{"role": "user", "content": row["prompt"][0]["content"] + SUFFIX}],
                                           add_generation_prompt=True, tokenize=False)
        assert tok.decode(list(train_set.prompt(i).token_ids)) == expected
        assert train_set.prompt(i).problem.answer == row["reward_model"]["ground_truth"]
    stripped = load_training_set(tiny_data_cfg(path, "data.prompt_form=stripped").data, tok)
    assert tok.decode(list(stripped.prompt(1).token_ids)) == tok.apply_chat_template(
        [{"role": "user", "content": PROBLEMS[1][0] + SUFFIX}], add_generation_prompt=True, tokenize=False)


def test_too_long_prompts_drop_every_row_of_theirs(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    path = tmp_path / "dapo-math-17k.parquet"
    write_release(path, PROBLEMS + [("word " * 600, "1")], repeats=3)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train_set = load_training_set(tiny_data_cfg(path).data, tok)
    assert (train_set.dropped_problems, train_set.dropped_rows, len(train_set)) == (1, 3, 9)
    assert {train_set.prompt(i).problem.answer for i in range(len(train_set))} == {"2", "3", "12"}
    summary = train_set.summary(prompts_per_step=2, total_steps=None)
    assert "12 rows, 4 distinct problems" in summary and "3 rows (1 problems) dropped" in summary
    assert "9 rows in a pass of 4 steps of 2 prompts" in summary


def test_first_pass_is_verl_random_sampler_order(caplog):
    """veRL: RandomSampler(dataset, generator=torch.Generator().manual_seed(data.seed=1)), drop_last."""
    n, batch = 1000, 64
    verl = list(RandomSampler(range(n), generator=torch.Generator().manual_seed(1)))
    sampler = PromptSampler(n, seed=1)
    drawn = [i for _ in range(n // batch) for i in sampler.next_batch(batch)]
    assert drawn == verl[:len(drawn)]
    with caplog.at_level(logging.WARNING, logger="justrl.data.sampler"):
        after = sampler.next_batch(batch)  # the tail of 1000 % 64 rows is skipped, pass 2 begins
    assert sorted(set(after)) == sorted(after) and after != verl[:batch]
    assert "pass 1 over the 1000 rows ended; pass 2 starts" in caplog.text


def test_preview_prints_what_the_engines_receive(tmp_path, tiny_model_dir):
    path = tmp_path / "dapo-math-17k.parquet"
    write_release(path, PROBLEMS, repeats=40)  # 120 rows: 7 steps of 16 prompts
    result = subprocess.run(
        [sys.executable, "-m", "justrl.data.preview", "--prompts", "2", "experiment=tiny", f"model.path={tiny_model_dir}",
         f"data.train_path={path}", "data.max_prompt_length=1024", "trainer.total_steps=null"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "training data: " in out and "120 rows, 3 distinct problems" in out
    assert "120 rows in a pass of 7 steps of 16 prompts; trainer.total_steps null: one pass, 7 steps" in out
    first = PromptSampler(120, seed=1).next_batch(2)
    assert f"training prompt 1 of step 1 (row {first[0]}," in out and "training prompt 2 of step 1" in out
    assert "training prompt 3" not in out
    assert "<|im_start|>user\n" + DAPO_PREFIX in out and DAPO_SUFFIX + SUFFIX + "<|im_end|>\n<|im_start|>assistant\n" in out
    assert "validation toy_scratchpad: first of" in out
    assert "evaluation AIME24: first prompt" in out
    assert "Every morning Aya goes for a $9$-kilometer-long walk" in out
    assert "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>" in out
    bad = subprocess.run([sys.executable, "-m", "justrl.data.preview", "experiment=tiny", "data.prompt_form=bare"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "data.prompt_form" in bad.stderr


@pytest.mark.parametrize("model, steps", [("deepseek_r1_distill_qwen_1.5b", 4380), ("openmath_nemotron_1.5b", 3440)])
def test_recipe_length_is_the_released_checkpoints(model, steps):
    cfg = compose([f"model={model}"])
    assert cfg.trainer.total_steps == steps and cfg.trainer.save_every == 50
    assert cfg.data.deduplicate is False and cfg.data.prompt_form == "as_released"
    assert compose(["experiment=tiny"]).trainer.total_steps == 40
    assert compose(["model=tiny"]).trainer.total_steps is None  # one pass
