"""The nine evaluation benchmarks of the paper, shipped with justrl: <NAME>/test.parquet here.

This directory is the default of `data.benchmark_dir` (training validation) and of
`benchmark_dir` (`python -m justrl.eval`); an explicit override or JUSTRL_BENCHMARK_DIR wins.
It is a package only so that setuptools ships it and `DIR` finds it in a clone, an editable
install and a wheel alike. Source and row counts: README.md beside this file.
"""
from pathlib import Path

DIR = Path(__file__).resolve().parent

# Rows of each shipped file (checked by tests/test_data.py against the files themselves).
ROWS = {
    "AIME24": 30, "AIME25": 30, "AMC23": 40, "BRUMO25": 30, "CMIMC25": 40, "HMMT25": 30,
    "MATH-500": 500, "Minerva": 272, "Olympiad-Bench": 674,
}
