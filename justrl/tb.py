"""One TensorBoard event file per run, resumable.

torch's SummaryWriter starts a new event file at every start, so a run resumed from step 50 after
reaching step 63 would show steps 51-63 twice. This writer keeps one file per run
(`<run>/events.out.tfevents.justrl`, in TensorBoard's record format, written with
tensorboard's own protos and record writer) and, on resume, first rewrites it without the events
logged after the checkpoint's step (write to a temporary file, then rename), then appends.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

EVENT_FILE_NAME = "events.out.tfevents.justrl"


def _file_version_event() -> event_pb2.Event:
    return event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")


class ScalarLog:
    """Appends scalar summaries to the run's event file."""

    def __init__(self, log_dir: str | Path, resume_step: int | None = None):
        """`resume_step`: drop what was logged after this step (None: a fresh run; any old file
        is kept whole and appended to)."""
        self.path = Path(log_dir) / EVENT_FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last_step_before: int | None = None
        """The last step the file held when this writer opened it (a resume: before it dropped
        the steps after `resume_step`)."""
        if resume_step is not None and self.path.exists():
            self.last_step_before = self._truncate_after(resume_step)
        new = not self.path.exists()
        self._records = RecordWriter(open(self.path, "ab"))
        if new:
            self._write(_file_version_event())

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def _truncate_after(self, step: int) -> int | None:
        """Rewrite the file without the summaries logged after `step`; returns the last step it held."""
        last = None
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            writer = RecordWriter(out)
            # raw records, copied byte for byte (the parsing loader would migrate the values)
            for record in RawEventFileLoader(str(self.path)).Load():
                event = event_pb2.Event.FromString(record)
                if event.HasField("summary"):
                    last = event.step if last is None else max(last, event.step)
                    if event.step > step:
                        continue
                writer.write(record)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        return last

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log `values` (tag -> number) at `step` and flush (a crash loses nothing logged)."""
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                                             for tag, value in values.items()])
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()


def read_scalars(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of an event file or a directory holding one, with
    tensorboard's own reader (EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
