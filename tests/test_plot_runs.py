"""tools/plot_runs.py draws one line per run from event files written by justrl's ScalarLog."""
import subprocess
import sys
from pathlib import Path

import pytest

from justrl.tb import ScalarLog

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from plot_runs import plot_runs  # noqa: E402


def fake_run(run_dir: Path, offset: float, steps: int = 12) -> None:
    log = ScalarLog(run_dir)
    log.scalars(0, {"val/AIME24/accuracy": 0.1 + offset, "val/AMC23/accuracy": 0.3 + offset})
    for step in range(1, steps + 1):
        log.scalars(step, {"actor/entropy": 1.3 - 0.01 * step, "reward/mean": -0.6 + 0.05 * step + offset,
                           "response_length/mean": 8000 - 100 * step})
    log.scalars(steps, {"val/AIME24/accuracy": 0.3 + offset, "val/AMC23/accuracy": 0.5 + offset})
    log.close()


def test_plot_runs_draws_every_run_on_every_panel(tmp_path):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0-length_penalty", 0.0)
    fake_run(sweep / "1-lenient", 0.1)
    out = tmp_path / "dynamics.png"
    fig, summary = plot_runs([sweep], out, smooth_window=3)
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert set(summary) == {"0-length_penalty", "1-lenient"}
    for counts in summary.values():
        assert counts == {"actor/entropy": 12, "reward/mean": 12, "response_length/mean": 12, "val/*/accuracy": 2}
    axes = fig.axes
    assert len(axes) == 4 and all(len(ax.get_lines()) == 2 for ax in axes)
    val_line = axes[3].get_lines()[1]
    assert list(val_line.get_xdata()) == [0, 12]
    assert list(val_line.get_ydata()) == pytest.approx([0.3, 0.5])  # mean of the two benchmarks, +0.1


def test_plot_runs_cli_reports_missing_input(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "plot_runs.py"), str(tmp_path), "--out",
                             str(tmp_path / "x.png")], capture_output=True, text=True)
    assert result.returncode == 2 and "no TensorBoard event files" in result.stderr


def test_plot_runs_adds_the_verifier_panels_when_runs_log_them(tmp_path):
    # a run written before the event file moved to the run directory (<run>/tensorboard/)
    log = ScalarLog(tmp_path / "sweep" / "2-lenient" / "tensorboard")
    for step, strict in enumerate([0.4, float("nan"), 0.5], start=1):
        log.scalars(step, {"actor/entropy": 1.0, "reward/mean": 0.0, "response_length/mean": 30.0,
                           "reward/strict_format": strict, "reward/verifier_disagreement": 0.3})
    log.close()
    fake_run(tmp_path / "sweep" / "0-none", 0.0, steps=3)  # an older run without them
    fig, summary = plot_runs([tmp_path / "sweep"], tmp_path / "x.png", smooth_window=2)
    assert len(fig.axes) == 6 and summary["2-lenient"]["reward/strict_format"] == 3
    assert summary["0-none"]["reward/verifier_disagreement"] == 0
    strict_line = fig.axes[4].get_lines()[0]
    assert list(strict_line.get_ydata()) == pytest.approx([0.4, 0.4, 0.5])  # the NaN left out of the average
