"""The nine benchmarks ship inside the package (justrl/benchmark_data) and are the default
benchmark_dir; JUSTRL_BENCHMARK_DIR or an override wins; a missing or unreadable file stops
training and evaluation at start-up, naming the benchmark, the path and the setting."""
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from justrl.benchmark_data import DIR, ROWS
from justrl.config import ConfigError, compose
from justrl.data.benchmarks import BENCHMARKS, benchmark_file_errors

REPO = Path(__file__).resolve().parents[1]


def test_the_nine_files_are_in_the_package_with_their_row_counts():
    assert DIR == REPO / "justrl" / "benchmark_data"  # this checkout's copy, not one beside it
    assert set(ROWS) == set(BENCHMARKS)
    for name, rows in ROWS.items():
        assert pq.ParquetFile(DIR / name / "test.parquet").metadata.num_rows == rows, name
        assert f"| {name} | {rows} |" in (DIR / "README.md").read_text()
    assert benchmark_file_errors(BENCHMARKS, DIR, "benchmark_dir") == []


def test_default_is_the_packaged_copy_and_overrides_win(tmp_path, monkeypatch):
    monkeypatch.delenv("JUSTRL_BENCHMARK_DIR", raising=False)
    assert compose([]).data.benchmark_dir == str(DIR)
    other = tmp_path / "mine"
    (other / "AIME24").mkdir(parents=True)
    for name in ("AIME24", "AIME25", "AMC23"):
        (other / name).mkdir(exist_ok=True)
        (other / name / "test.parquet").write_bytes((DIR / name / "test.parquet").read_bytes())
    assert compose([f"data.benchmark_dir={other}"]).data.benchmark_dir == str(other)
    monkeypatch.setenv("JUSTRL_BENCHMARK_DIR", str(other))
    assert compose([]).data.benchmark_dir == str(other)


def test_missing_unreadable_and_foreign_files_are_named(tmp_path):
    (tmp_path / "AIME25").mkdir()
    (tmp_path / "AIME25" / "test.parquet").write_bytes(b"not a parquet file")
    (tmp_path / "AMC23").mkdir()
    pq.write_table(pa.table({"question": ["1+1"], "label": ["2"]}), tmp_path / "AMC23" / "test.parquet")
    errors = benchmark_file_errors(["AIME24", "AIME25", "AMC23", "toy", "AIME99"], tmp_path, "data.benchmark_dir")
    assert len(errors) == 4
    missing, unreadable, foreign, unknown = errors
    assert missing.startswith(f"benchmark 'AIME24': {tmp_path}/AIME24/test.parquet does not exist")
    assert f"(data.benchmark_dir='{tmp_path}'" in missing
    assert unreadable.startswith(f"benchmark 'AIME25': {tmp_path}/AIME25/test.parquet cannot be read (ArrowInvalid")
    assert foreign.startswith("benchmark 'AMC23': ") and "it has ['label', 'question']" in foreign
    assert unknown.startswith("benchmark 'AIME99': unknown")


def test_training_config_with_a_missing_benchmark_fails_validation(tmp_path):
    with pytest.raises(ConfigError) as info:
        compose([f"data.benchmark_dir={tmp_path}", "data.val_benchmarks=[AMC23]"])
    assert f"data.val_benchmarks: benchmark 'AMC23': {tmp_path}/AMC23/test.parquet does not exist " \
           f"(data.benchmark_dir='{tmp_path}'" in str(info.value)
    compose([f"data.benchmark_dir={tmp_path}", "data.val_benchmarks=[toy]"])  # the toy set needs no file


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "JUSTRL_BENCHMARK_DIR"}


def test_launch_and_evaluate_stop_at_start_up(tmp_path):
    """Both entry points exit before a model is built or an engine started (no engine log, no
    train.log), from a directory outside the repository."""
    empty = tmp_path / "empty"
    empty.mkdir()
    run = tmp_path / "run"
    launch = subprocess.run([sys.executable, "-m", "justrl.launch", "experiment=tiny", "data.val_benchmarks=[AIME24]",
                             f"data.benchmark_dir={empty}", f"trainer.output_dir={run}"],
                            cwd=tmp_path, capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert launch.returncode == 1
    assert f"benchmark 'AIME24': {empty}/AIME24/test.parquet does not exist (data.benchmark_dir='{empty}'" \
        in launch.stderr
    assert not (run / "train.log").exists() and not (run / "engines").exists()

    out = tmp_path / "eval"
    evaluate = subprocess.run([sys.executable, "-m", "justrl.eval", f"model_path={tmp_path / 'no_model'}",
                               "benchmarks=[AIME24,HMMT25]", f"benchmark_dir={empty}", f"output_dir={out}"],
                              cwd=tmp_path, capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert evaluate.returncode == 1
    for name in ("AIME24", "HMMT25"):
        assert f"benchmark '{name}': {empty}/{name}/test.parquet does not exist (benchmark_dir='{empty}'" \
            in evaluate.stderr
    assert not out.exists()
