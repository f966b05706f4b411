"""Atomic checkpoints and the resume pointer; the resumable TensorBoard event file."""
import pytest

from justrl import checkpoint as ckpt
from justrl.tb import EVENT_FILE_NAME, ScalarLog, read_scalars


def write_files(content: str):
    def write(tmp):
        (tmp / "weights.bin").write_text(content)
    return write


def test_save_is_atomic_and_latest_points_to_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    first = ckpt.save_checkpoint(root, 10, write_files("ten"))
    assert first.name == "step_000010" and ckpt.is_complete(first)
    assert ckpt.latest_checkpoint(root) == first and ckpt.checkpoint_step(first) == 10
    second = ckpt.save_checkpoint(root, 20, write_files("twenty"))
    assert ckpt.latest_checkpoint(root) == second
    assert (root / "latest").read_text().strip() == "step_000020"
    assert not list(root.glob("*.tmp"))


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    good = ckpt.save_checkpoint(root, 10, write_files("ten"))

    def crash(tmp):
        (tmp / "weights.bin").write_text("half")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 20, crash)
    assert ckpt.latest_checkpoint(root) == good
    assert (good / "weights.bin").read_text() == "ten"
    assert (root / "step_000020.tmp").exists() and not (root / "step_000020").exists()
    # the next save clears the debris
    ckpt.save_checkpoint(root, 20, write_files("twenty"))
    assert not (root / "step_000020.tmp").exists()


def test_damaged_pointer_falls_back_to_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 10, write_files("a"))
    newest = ckpt.save_checkpoint(root, 20, write_files("b"))
    (root / "latest").write_text("step_000030\n")  # names something that does not exist
    assert ckpt.latest_checkpoint(root) == newest
    (newest / ckpt.COMPLETE).unlink()  # incomplete checkpoints are never resumed from
    (root / "latest").unlink()
    assert ckpt.latest_checkpoint(root).name == "step_000010"
    assert ckpt.latest_checkpoint(tmp_path / "none") is None


def test_keep_deletes_the_oldest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, write_files(str(step)), keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000002", "step_000003"]


def test_event_file_reads_back_and_resume_drops_steps_after_the_checkpoint(tmp_path):
    log = ScalarLog(tmp_path)
    for step in range(1, 6):
        log.scalars(step, {"reward/mean": step / 10, "actor/lr": 1e-6})
    log.close()
    values = read_scalars(tmp_path)
    assert values["reward/mean"] == [(s, pytest.approx(s / 10)) for s in range(1, 6)]
    # a crash after step 5, resumed from the checkpoint of step 3: steps 4-5 are logged again
    log = ScalarLog(tmp_path, resume_step=3)
    for step in (4, 5, 6):
        log.scalars(step, {"reward/mean": -step})
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == [EVENT_FILE_NAME]  # one file per run
    values = read_scalars(tmp_path / EVENT_FILE_NAME)
    assert values["reward/mean"] == [(1, pytest.approx(.1)), (2, pytest.approx(.2)), (3, pytest.approx(.3)),
                                     (4, -4.0), (5, -5.0), (6, -6.0)]
    assert [s for s, _ in values["actor/lr"]] == [1, 2, 3]
