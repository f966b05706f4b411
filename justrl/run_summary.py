"""What happened in a run, over all its starts: the fault counters (`faults/*`) and the one summary
printed when a run ends.

A run of ~4,400 steps over two weeks is started more than once (requeues, resubmissions). Each
start's own counters (the fleet's restarts and hung engines) begin at zero, so the run's totals
are carried in the checkpoint's trainer state (`RunFaults.state()`) and logged every step as
`faults/*`, the run's totals so far:

    faults/engine_restarts   engines restarted (died, or declared hung)
    faults/hung_engines      engines declared hung (rollout.stall_timeout_s without progress)
    faults/engines_lost      engines dropped after their restarts failed (a lost node), the run
                             going on with the others (RolloutFleet.lost)
    faults/requeues          starts of a requeued Slurm job (a lost node, every engine lost, a
                             pre-emption or time limit; SLURM_RESTART_COUNT > 0 at the start)
    faults/resumes           starts from a checkpoint after the first start
    faults/steps_redone      steps trained again after a resume (logged before the stop, after
                             the checkpoint it resumed from: the work a fault cost)

The checkpoint holds the totals at its step; `<run>/faults.json` holds them as they happen
(rewritten whenever rank 0 counts them: every step, and when every engine is lost), so that what
a start did after its last checkpoint (the restarts and drops that ended it, before a requeue)
still counts in the next start's totals. A resumed start takes the file where it is there, the
checkpoint's totals where it is not (a run from before the file).

The end-of-run summary is read back from the run's event file (TensorBoard's own reader), so it
covers every start of the run, not only the last one.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from justrl.tb import EVENT_FILE_NAME

FAULTS_FILE = "faults.json"
FAULT_TAGS = {"engine_restarts": "engine restarts (died or hung)", "hung_engines": "engines declared hung",
              "engines_lost": "engines dropped (restarts failed)",
              "requeues": "Slurm requeues of the job", "resumes": "resumes from a checkpoint",
              "steps_redone": "steps trained again after a resume"}


@dataclass
class RunFaults:
    """The run's fault totals before this start (from the checkpoint), plus this start's."""
    engine_restarts: int = 0
    hung_engines: int = 0
    engines_lost: int = 0
    resumes: int = 0
    steps_redone: int = 0
    requeues: int = 0

    @classmethod
    def from_state(cls, state: dict | None) -> "RunFaults":
        return cls(**{k: int(v) for k, v in (state or {}).items() if k in FAULT_TAGS})

    @classmethod
    def load(cls, path: Path, checkpoint_state: dict | None) -> "RunFaults":
        """The totals a resumed start begins from: `path` (faults.json) if it was written, else the
        checkpoint's."""
        try:
            return cls.from_state(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            return cls.from_state(checkpoint_state)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable fault totals ({exc}); delete it to start them from the "
                             f"checkpoint's") from exc

    def write(self, path: Path) -> None:
        """Write the totals to `path` atomically (a reader sees the old file or the new one)."""
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text(json.dumps(self.state(), sort_keys=True) + "\n")
        os.replace(tmp, path)

    def resumed(self, checkpoint_step: int, last_logged_step: int | None, requeued: bool = False) -> None:
        """A start from the checkpoint of `checkpoint_step`, when the event file had reached
        `last_logged_step`; `requeued`: this start is Slurm's requeue of the job (each requeue
        gives one start, so a start counts at most one)."""
        self.resumes += 1
        self.requeues += int(requeued)
        self.steps_redone += max(0, (last_logged_step or 0) - checkpoint_step)

    def totals(self, restarts_here: int, hung_here: int, lost_here: int = 0) -> "RunFaults":
        return RunFaults(self.engine_restarts + restarts_here, self.hung_engines + hung_here,
                         self.engines_lost + lost_here, self.resumes, self.steps_redone, self.requeues)

    def state(self) -> dict:
        return asdict(self)

    def scalars(self) -> dict[str, float]:
        return {f"faults/{k}": float(v) for k, v in asdict(self).items()}


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def summary(scalars: dict[str, list[tuple[int, float]]], run_root: Path, total_steps: int,
            latest_checkpoint: Path | None, stopped: str | None = None) -> str:
    """The end-of-run summary from the run's scalars (`justrl.tb.read_scalars` of its event file)."""
    steps = [s for s, _ in scalars.get("reward/mean", [])]
    last = max(steps) if steps else 0
    head = (f"justrl: run {run_root.name} stopped at step {last}/{total_steps} ({stopped}); relaunch the same "
            f"command to resume" if stopped else f"justrl: run {run_root.name} finished: step {last}/{total_steps}")
    lines = [head, f"  steps logged {len(steps)} (each once), run directory {run_root}"]
    benchmarks = sorted(t.split("/")[1] for t in scalars if t.startswith("val/") and t.endswith("/accuracy"))
    if benchmarks:
        rows = [("validation", "first step", "accuracy", "last step", "accuracy")]
        for b in benchmarks:
            points = scalars[f"val/{b}/accuracy"]
            (s0, a0), (s1, a1) = points[0], points[-1]
            rows.append((b, str(s0), f"{a0:.3f}", str(s1), f"{a1:.3f}"))
        lines += _table(rows)
    rows = [("faults over the run", "count")]
    for key, what in FAULT_TAGS.items():
        points = scalars.get(f"faults/{key}")
        rows.append((what, str(int(points[-1][1])) if points else "0"))
    lines += _table(rows)
    lines.append(f"  checkpoints {latest_checkpoint or '(none)'}")
    lines.append(f"  event file {run_root / EVENT_FILE_NAME}; "
                 f"tensorboard --logdir {run_root.parent}")
    return "\n".join(lines)
