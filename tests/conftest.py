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
    """The embedded default's tiny model (warm-started), built once per test session."""
    from justrl.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def random_tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model with random weights (no warm start): it rarely stops before the limit."""
    from justrl.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_random") / "model", warm_start_steps=0)
