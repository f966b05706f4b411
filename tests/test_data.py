"""Training data in both DAPO-Math-17k forms (with bad rows), prompts, sampler, benchmarks."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from justrl.data import (BENCHMARKS, SAMPLES_PER_PROBLEM, Problem, PromptSampler, build_prompts, encode_prompt,
                         load_benchmark, load_problems, render_prompt, toy_problems, unwrap_dapo_prompt)
from justrl.data.problems import DAPO_PREFIX, DAPO_SUFFIX


def dapo_wrap(problem: str) -> str:
    return f"{DAPO_PREFIX}\n\n{problem}\n\n{DAPO_SUFFIX}"


def write_original_dapo(path, problems, repeats=3, bad_rows=()):
    """A parquet file with the original release's schema; each problem repeated `repeats` times."""
    rows = []
    for _ in range(repeats):
        for i, (problem, answer) in enumerate(problems):
            rows.append({
                "data_source": "math_dapo",
                "prompt": [{"content": dapo_wrap(problem), "role": "user"}],
                "ability": "MATH",
                "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": f"id-{i}"},
            })
    for position, row in bad_rows:
        rows.insert(position, row)
    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.string())])),
    ])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


PROBLEMS = [("What is $1+1$?", "2"), ("Find $x$ if $2x = 6$.", "3"), ("Compute $\\frac{1}{2} + \\frac{1}{4}$.", "\\frac{3}{4}")]


def test_unwrap_dapo_prompt():
    assert unwrap_dapo_prompt(dapo_wrap("Find $x$.")) == ("Find $x$.", True)
    assert unwrap_dapo_prompt("  Find $x$.  ") == ("Find $x$.", False)
    # multi-paragraph problems keep their inner blank lines
    assert unwrap_dapo_prompt(dapo_wrap("Line one.\n\nLine two."))[0] == "Line one.\n\nLine two."


def test_original_form_dedup_unwrap_and_bad_rows(tmp_path):
    path = tmp_path / "dapo.parquet"
    bad = [
        (0, {"data_source": "math_dapo", "prompt": [{"content": dapo_wrap("No answer here."), "role": "user"}],
             "ability": "MATH", "reward_model": {"ground_truth": None, "style": "rule"}, "extra_info": None}),
        (4, {"data_source": "math_dapo", "prompt": [{"content": dapo_wrap("   "), "role": "user"}],
             "ability": "MATH", "reward_model": {"ground_truth": "5", "style": "rule"}, "extra_info": None}),
        (7, {"data_source": "math_dapo", "prompt": [], "ability": "MATH",
             "reward_model": {"ground_truth": "5", "style": "rule"}, "extra_info": None}),
    ]
    write_original_dapo(path, PROBLEMS, repeats=3, bad_rows=bad)
    table = load_problems(str(path), prompt_form="stripped", deduplicate=True)  # justrl's old reading
    problems, report = table.problems, table.report
    assert [(p.problem, p.answer) for p in problems] == PROBLEMS and list(table.rows) == [0, 1, 2]
    assert report.rows == 12 and report.kept == 3 and report.duplicates == 6 and report.unwrapped == 9
    assert dict(report.skipped) == {"missing answer": 1, "empty prompt": 1,
                                    "chat prompt has 0 user messages, expected 1": 1}
    assert [e.index for e in report.examples] == [0, 4, 7]
    assert all(e.file == str(path) for e in report.examples)
    assert str(report.examples[0]) == f"{path}:0: missing answer"
    assert problems[0].origin == f"{path}:1"


def test_processed_form_jsonl_with_bad_rows(tmp_path):
    path = tmp_path / "processed.jsonl"
    lines = [
        json.dumps({"prompt": "What is 2+2?", "solution": "4"}),
        json.dumps({"prompt": "What is 3+3?"}),                            # 1: missing answer
        json.dumps({"prompt": 42, "solution": "42"}),                      # 2: non-text problem
        json.dumps({"prompt": "   ", "solution": "1"}),                    # 3: empty prompt
        "{not json",                                                       # 4: malformed line
        json.dumps({"prompt": "What is 2+2?", "solution": "5"}),           # 5: duplicate, other answer
        json.dumps({"prompt": "What is 5*5?", "solution": 25}),            # 6: integer answer -> "25"
        json.dumps(["a", "list"]),                                         # 7: not an object
    ]
    path.write_text("\n".join(lines) + "\n")
    table = load_problems(str(path), deduplicate=True)
    problems, report = table.problems, table.report
    assert [(p.problem, p.answer) for p in problems] == [("What is 2+2?", "4"), ("What is 5*5?", "25")]
    assert report.duplicates == 1 and report.conflicting_duplicates == 1
    # as released (the default): the duplicate with another answer is a row of its own, with its answer
    kept = load_problems(str(path))
    assert [(kept.problems[i].problem, kept.problems[i].answer) for i in kept.rows] == \
        [("What is 2+2?", "4"), ("What is 2+2?", "5"), ("What is 5*5?", "25")]
    assert kept.report.conflicting_duplicates == 1 and kept.report.kept == 3 and kept.report.distinct == 3
    assert sum(report.skipped.values()) == 5
    assert [e.index for e in report.examples] == [1, 2, 3, 4, 7]
    assert report.examples[1].reason == "problem is not text (int)"
    assert report.examples[3].reason.startswith("not valid JSON")


def test_processed_parquet_with_custom_columns(tmp_path):
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"q": ["A?", "B?"], "final": ["1", "2"]}), path)
    problems = load_problems(str(path), problem_key="q", answer_key="final").problems
    assert [(p.problem, p.answer) for p in problems] == [("A?", "1"), ("B?", "2")]
    with pytest.raises(ValueError, match="no usable rows"):
        load_problems(str(path))


def test_directory_of_files_and_missing_path(tmp_path):
    write_original_dapo(tmp_path / "a.parquet", PROBLEMS[:2], repeats=1)
    (tmp_path / "b.jsonl").write_text(json.dumps({"problem": "New one?", "answer": "7"}) + "\n")
    table = load_problems(str(tmp_path))
    assert len(table.problems) == 3 and table.report.rows == 3 and len(table.rows) == 3
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_problems(str(tmp_path / "no_such_dir"))


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="BytedTsinghua-SIA/DAPO-Math-17k.*HF_HUB_OFFLINE"):
        load_problems("BytedTsinghua-SIA/DAPO-Math-17k")


def test_prompts_use_chat_template_suffix_and_filter(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = render_prompt(tok, "What is 1+1?")
    assert text == ("<|im_start|>user\nWhat is 1+1?\n\nPlease reason step by step, and put your final answer "
                    "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    ids = encode_prompt(tok, "What is 1+1?")
    assert tok.decode(ids) == text
    short = load_problems("toy").problems[:5]
    long_one = Problem("word " * 400, "1", "test:0")
    prompts, dropped = build_prompts(short + [long_one], tok, max_prompt_length=128)
    assert dropped == 1 and [p.problem for p in prompts] == short
    assert all(len(p.token_ids) <= 128 for p in prompts)
    with pytest.raises(ValueError, match="max_prompt_length=3"):
        build_prompts(short, tok, max_prompt_length=3)


def test_sampler_is_seeded_and_resumes_exactly():
    full = PromptSampler(10, seed=3)
    drawn = [full.next_batch(4) for _ in range(6)]  # 2 batches per epoch; tail of 2 skipped
    for batch in drawn:
        assert len(set(batch)) == 4
    assert not set(drawn[0]) & set(drawn[1])  # within an epoch, no prompt twice
    assert drawn[0] != drawn[2]  # a new permutation each epoch
    assert PromptSampler(10, seed=3).next_batch(4) == drawn[0]
    assert PromptSampler(10, seed=4).next_batch(4) != drawn[0]

    resumed = PromptSampler(10, seed=3)
    first = [resumed.next_batch(4) for _ in range(3)]
    state = resumed.state_dict()
    fresh = PromptSampler(10, seed=3)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    assert first + [fresh.next_batch(4) for _ in range(3)] == drawn
    with pytest.raises(ValueError, match="data set or data.seed changed"):
        PromptSampler(11, seed=3).load_state_dict(state)


def test_toy_problems_are_deterministic_and_disjoint():
    train, val = toy_problems("train"), toy_problems("val")
    assert train == toy_problems("train") and (len(train), len(val)) == (74, 16)
    assert not {p.problem for p in train} & {p.problem for p in val}
    for p in train + val:
        a, b = p.problem.removeprefix("Which number is larger, ").removesuffix("?").split(" or ")
        assert a != b and p.answer == str(max(int(a), int(b)))


EXPECTED_SIZES = {"AIME24": 30, "AIME25": 30, "AMC23": 40, "BRUMO25": 30, "CMIMC25": 40, "HMMT25": 30,
                  "MATH-500": 500, "Minerva": 272, "Olympiad-Bench": 674}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_real_benchmarks_both_schemas(name, benchmark_dir):
    bench = load_benchmark(name, benchmark_dir)
    assert len(bench.problems) == EXPECTED_SIZES[name] and bench.report.rows == EXPECTED_SIZES[name]
    assert bench.samples_per_problem == SAMPLES_PER_PROBLEM[name]
    assert bench.samples_per_problem == (4 if name in ("MATH-500", "Minerva", "Olympiad-Bench") else 32)
    assert len({p.id for p in bench.problems}) == len(bench.problems)
    assert all(p.problem and p.answer and not p.answer.startswith("\\boxed{") for p in bench.problems)


def test_real_benchmark_values(benchmark_dir):
    aime24 = load_benchmark("AIME24", benchmark_dir)
    first = aime24.problems[0]
    assert first.id == "AIME24-0" and first.raw_answer == "\\boxed{204}" and first.answer == "204"
    assert first.problem.startswith("Every morning Aya goes for a $9$-kilometer-long walk")
    brumo = load_benchmark("BRUMO25", benchmark_dir)
    assert brumo.problems[0].id == "BRUMO25-1" and brumo.problems[0].answer == "2^{99}"


def test_benchmark_bad_rows_and_missing_file(tmp_path):
    (tmp_path / "MINE").mkdir()
    pq.write_table(pa.table({"problem_idx": [1, 2, 3, 4], "problem": ["P1", None, "  ", "P4"],
                             "answer": ["1", "2", "3", None]}), tmp_path / "MINE" / "test.parquet")
    bench = load_benchmark("MINE", tmp_path, samples_per_problem=2)
    assert [p.id for p in bench.problems] == ["MINE-1"]
    assert dict(bench.report.skipped) == {"missing problem": 1, "empty prompt": 1, "missing answer": 1}
    with pytest.raises(FileNotFoundError, match="AIME99"):
        load_benchmark("AIME99", tmp_path)
    with pytest.raises(ValueError, match="no standard sample count"):
        load_benchmark("MINE", tmp_path)
