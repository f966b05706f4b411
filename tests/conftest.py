import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The nine benchmark files: ../shared/data/benchmarks beside the checkout, or JUSTRL_BENCHMARK_DIR.
BENCHMARK_DIR = Path(os.environ.get("JUSTRL_BENCHMARK_DIR", REPO.parent / "shared" / "data" / "benchmarks"))


@pytest.fixture(scope="session")
def benchmark_dir() -> Path:
    if not (BENCHMARK_DIR / "AIME24" / "test.parquet").is_file():
        pytest.skip(f"benchmark files not found in {BENCHMARK_DIR} (set JUSTRL_BENCHMARK_DIR)")
    return BENCHMARK_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model built once per test session with tools/make_tiny_model.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "tools" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
