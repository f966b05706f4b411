"""`python -m justrl.eval`: the tiny model on two real benchmark files (both schemas) with a
real vLLM CPU engine, resume without regeneration, the optional judge pass, the summary's
numbers, and tools/compare_results.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from justrl.eval.sampling import SampleRecord, summarize

REPO = Path(__file__).resolve().parents[1]
CPU_ENGINE = ("engine.dtype=float32", "engine.gpu_memory_utilization=0.3", "engine.cpu_kv_cache_gb=1",
              "max_new_tokens=32", "max_prompt_length=768")


def evaluate(model_dir, out_dir, *overrides, timeout=600) -> subprocess.CompletedProcess:
    """Run from the output's parent, outside the repository, with the default benchmark_dir: the
    benchmarks shipped in the package must be found without the checkout's working directory."""
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "justrl.eval", f"model_path={model_dir}", f"output_dir={out_dir}",
         *CPU_ENGINE, *overrides],
        cwd=Path(out_dir).parent, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_summary_numbers():
    def rec(pid, k, correct, answer="1", length=10):
        return SampleRecord(pid, k, k, "r", answer, correct, length, False)

    groups = [[rec("a", 0, True), rec("a", 1, True)],                 # solved by all
              [rec("b", 0, True), rec("b", 1, False, answer=None)],   # solved by some
              [rec("c", 0, False, length=40), rec("c", 1, False)]]    # solved by none
    s = summarize(groups)
    assert s["avg"] == pytest.approx(50.0) and s["best_of_n"] == pytest.approx(200 / 3)
    assert (s["solved_by_none"], s["solved_by_all"], s["no_boxed_answer"]) == (1, 1, 1)
    assert s["mean_response_tokens"] == pytest.approx(15.0) and s["samples_per_problem"] == 2
    groups[2][0].judge = True  # a judge flip counts as correct
    assert summarize(groups)["avg"] == pytest.approx(200 / 3) and summarize(groups)["judge_flips"] == 1


@pytest.mark.slow
def test_tiny_model_on_two_real_benchmarks(tiny_model_dir, benchmark_dir, tmp_path):
    out = tmp_path / "eval"
    assert not tmp_path.is_relative_to(REPO)
    result = evaluate(tiny_model_dir, out, "benchmarks=[AIME24,BRUMO25]", "samples=2")
    assert Path(OmegaConf.load(out / "config.yaml").benchmark_dir) == benchmark_dir  # the packaged copy
    results = json.loads((out / "results.json").read_text())
    assert set(results["benchmarks"]) == {"AIME24", "BRUMO25"} and results["all_nine"] is False
    for name, problems in (("AIME24", 30), ("BRUMO25", 30)):  # veRL schema / plain schema
        records = lines(out / f"{name}.jsonl")
        assert len(records) == problems * 2
        assert {(r["problem_id"], r["sample"]) for r in records} == {(r["problem_id"], k) for r in records for k in (0, 1)}
        for r in records:
            assert set(r) == {"problem_id", "sample", "seed", "response", "answer", "correct", "length",
                              "truncated", "judge"}
            assert 1 <= r["length"] <= 32 and r["truncated"] == (r["length"] == 32)
        summary = results["benchmarks"][name]
        assert summary["problems"] == problems and summary["samples_per_problem"] == 2
        assert summary["avg"] == pytest.approx(100 * sum(r["correct"] for r in records) / len(records))
        assert summary["no_boxed_answer"] == sum(r["answer"] is None for r in records)
    assert results["average"] == pytest.approx(sum(b["avg"] for b in results["benchmarks"].values()) / 2)
    assert "| AIME24 | 2 | 30 |" in (out / "results.md").read_text()
    assert "AIME24 (N=2)" in result.stderr  # a progress bar per benchmark
    # the authors' template (evals/gen_vllm.py): the problem, ONE space, the instruction; the chat template around it
    assert results["prompt_template"] == "{problem} Please reason step by step, and put your final answer within \\boxed{{}}."
    aime = results["example_prompts"]["AIME24"]
    assert aime.startswith("<|im_start|>user\nEvery morning Aya goes for a $9$-kilometer-long walk")
    assert aime.endswith(" coffee shop. Please reason step by step, and put your final answer within \\boxed{}."
                         "<|im_end|>\n<|im_start|>assistant\n")
    assert results["example_prompts"]["BRUMO25"].startswith("<|im_start|>user\nOne hundred concentric circles")
    # on a CPU the judge does not run, and the results say so (and why)
    assert results["judge"] is None and results["judge_status"].startswith("did not run: no GPU (engine.gpus=0)")
    assert "judge: did not run: no GPU" in (out / "results.md").read_text()

    compared = subprocess.run([sys.executable, str(REPO / "tools" / "compare_results.py"), str(out / "results.json")],
                              capture_output=True, text=True)
    assert compared.returncode == 0
    assert "AIME24" in compared.stdout and "52.60" in compared.stdout and "(2 of 9 benchmarks evaluated)" in compared.stdout
    assert "rules only, the judge did not run" in compared.stdout


@pytest.mark.slow
def test_interrupted_evaluation_resumes_without_regenerating(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    evaluate(tiny_model_dir, out, "benchmarks=[AMC23]", "samples=3", "limit=4", "chunk_problems=2")
    path = out / "AMC23.jsonl"
    records = lines(path)
    assert len(records) == 12
    # mark a finished problem: it must come back untouched, not be generated again
    records[0]["response"] = "SENTINEL (written before the interruption)"
    # and leave what an interruption mid-write leaves: a problem with 2 of its 3 samples, half a line
    kept = [r for r in records if not (r["problem_id"] == records[-1]["problem_id"] and r["sample"] == 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"problem_id": "cut', encoding="utf-8")

    result = evaluate(tiny_model_dir, out, "benchmarks=[AMC23]", "samples=3", "limit=8",
                      "chunk_problems=2")
    assert "AMC23: 3 of 8 problems already done" in result.stderr
    after = lines(path)
    assert len(after) == 24 and len({(r["problem_id"], r["sample"]) for r in after}) == 24
    assert after[0]["response"] == "SENTINEL (written before the interruption)"
    regenerated = [r for r in after if r["problem_id"] == records[-1]["problem_id"]]
    assert sorted(r["sample"] for r in regenerated) == [0, 1, 2]
    assert [r["response"] for r in sorted(regenerated, key=lambda r: r["sample"])] == \
        [r["response"] for r in records if r["problem_id"] == records[-1]["problem_id"]]  # same seeds


@pytest.mark.slow
def test_judge_pass_is_named_and_records_verdicts(tiny_model_dir, tmp_path):
    """The tiny model stands in for the judge (CompassVerifier-3B cannot be downloaded here): the
    pass runs, every rejected sample gets a verdict, and the results name the judge."""
    out = tmp_path / "eval"
    evaluate(tiny_model_dir, out, "benchmarks=[AIME25]", "samples=2", "limit=3", "judge.enable=true",
             f"judge.model={tiny_model_dir}", "judge.dtype=float32", "judge.max_new_tokens=8")
    results = json.loads((out / "results.json").read_text())
    assert results["judge"] == str(tiny_model_dir) and "judge" in results["grader"]
    rejected = sum(not r["correct"] for r in lines(out / "AIME25.jsonl"))
    assert results["judge_status"] == f"ran: {tiny_model_dir} on {rejected} samples the rules rejected"
    records = lines(out / "AIME25.jsonl")
    assert all(isinstance(r["judge"], bool) for r in records if not r["correct"])
    assert results["benchmarks"]["AIME25"]["judge_flips"] == sum(r["judge"] and not r["correct"] for r in records)
    assert (out / "engines" / "judge.log").is_file()
