from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def benchmark_dir() -> Path:
    """The nine benchmark files shipped in the package (justrl/benchmark_data); never skipped."""
    from justrl.benchmark_data import DIR

    return DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded default's tiny model (warm-started), built once per test session."""
    from justrl.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def random_tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny model with random weights (no warm start): it rarely stops before the limit."""
    from justrl.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_random") / "model", warm_start_steps=0)
