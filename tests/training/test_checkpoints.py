"""lorafit.safety on real folders: which checkpoints count, atomic publishing, rotation that never
deletes the only good checkpoint, leftovers of a killed save, output-folder and disk checks.

The same pieces on real training processes (SIGKILL, SIGTERM, a full disk) are in test_train.py.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from lorafit.errors import LorafitError
from lorafit.training import callbacks, checkpoints, rundir


def checkpoint(run: Path, step: int, *, complete: bool = True) -> Path:
    """A checkpoint-N folder with the files a resume reads (the trainer state left out if not complete)."""
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_only_complete_checkpoints_count_in_step_order(tmp_path) -> None:
    for step in (10, 2, 4):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-14").mkdir()
    checkpoint(tmp_path, 16)
    (tmp_path / "checkpoint-16" / "trainer_state.json").write_text('{"global_st')  # cut short
    (tmp_path / ".partial-checkpoint-18").mkdir()
    names = [p.name for p in checkpoints.complete_checkpoints(tmp_path)]
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert checkpoints.last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert checkpoints.missing_from_checkpoint(tmp_path / "checkpoint-16") == ["trainer_state.json"]
    assert checkpoints.last_checkpoint(tmp_path / "nothing-here") is None


def test_rotation_never_deletes_the_newest_complete_or_the_best_checkpoint(tmp_path) -> None:
    for step in (2, 4, 6):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 8, complete=False)  # e.g. copied in part: must not count as "the newest"
    deleted = checkpoints.rotate_checkpoints(tmp_path, 1, keep=[str(tmp_path / "checkpoint-2")])
    assert [p.name for p in deleted] == ["checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert checkpoints.rotate_checkpoints(tmp_path, 1) == [tmp_path / "checkpoint-2"]
    assert checkpoints.rotate_checkpoints(tmp_path, 1) == []  # the only good one stays
    assert checkpoints.rotate_checkpoints(tmp_path, None) == checkpoints.rotate_checkpoints(tmp_path, 0) == []
    assert (tmp_path / "checkpoint-6").is_dir() and (tmp_path / "checkpoint-8").is_dir()


def test_publish_replaces_a_checkpoint_of_the_same_step_whole(tmp_path) -> None:
    old = checkpoint(tmp_path, 4)
    staged = checkpoint(tmp_path / ".partial-checkpoint-4", 4)
    (staged / "adapter_model.safetensors").write_bytes(b"new weights")
    checkpoints.publish_checkpoint(staged, old)
    assert (old / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-checkpoint-4", "checkpoint-4"]
    assert not list((tmp_path / ".partial-checkpoint-4").iterdir())


def test_leftovers_of_a_killed_save_are_cleared_or_restored(tmp_path) -> None:
    checkpoint(tmp_path / ".partial-checkpoint-6", 6, complete=False)
    # killed between moving the old checkpoint-4 aside and renaming the new one in
    checkpoint(tmp_path, 4).rename(tmp_path / ".replaced-checkpoint-4")
    checkpoint(tmp_path, 2)
    checkpoints.remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_checkpoint_checks_name_what_is_missing_or_unreadable(tmp_path) -> None:
    with pytest.raises(LorafitError, match="no such folder"):
        checkpoints.check_checkpoint(tmp_path / "checkpoint-9")
    incomplete = checkpoint(tmp_path, 2, complete=False)
    with pytest.raises(LorafitError, match=r"checkpoint-2 is incomplete \(no readable trainer_state.json\)"):
        checkpoints.check_checkpoint(incomplete)
    cut = checkpoint(tmp_path, 4)
    (cut / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(LorafitError, match=r"optimizer.pt is not a readable PyTorch file"):
        checkpoints.check_checkpoint(cut)


def test_output_folder_check_leaves_nothing_behind(tmp_path) -> None:
    run = tmp_path / "a" / "b" / "run"
    rundir.check_output_dir(run)
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(LorafitError, match=r"cannot be created: .*file is a file, not a folder"):
        rundir.check_output_dir(tmp_path / "file" / "run")


def test_free_space_check(tmp_path) -> None:
    with pytest.raises(LorafitError, match=r"MiB free on its disk, and this run needs about .* MiB"):
        rundir.check_free_space(tmp_path / "new" / "run", 1 << 62)
    rundir.check_free_space(tmp_path / "new" / "run", 1)
    assert not (tmp_path / "new").exists()


def test_a_failed_write_names_the_file_and_the_last_good_checkpoint(tmp_path) -> None:
    checkpoint(tmp_path, 2)
    full = r"writing /x/metrics.jsonl in .* failed: No space left on device\. The last good checkpoint"
    with pytest.raises(LorafitError, match=full):
        with rundir.write_errors_reported(tmp_path):
            raise OSError(28, "No space left on device", "/x/metrics.jsonl")
    with pytest.raises(ValueError, match="^a bug$"):  # not a disk problem: it goes through unchanged
        with rundir.write_errors_reported(tmp_path):
            raise ValueError("a bug")


def test_stop_on_signal_handler_is_installed_only_while_training() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = callbacks.StopOnSignal(echo=lambda message: None)
    with stop.installed():
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == before  # a second SIGTERM acts at once
    assert signal.getsignal(signal.SIGTERM) == before


def test_pause_at_step_reads_its_steps_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(callbacks.PAUSE_ENV, raising=False)
    assert callbacks.PauseAtStep.from_environment() is None  # the usual case: no pause
    monkeypatch.setenv(callbacks.PAUSE_ENV, "2, 8")
    assert callbacks.PauseAtStep.from_environment().steps == {2, 8}
    monkeypatch.setenv(callbacks.PAUSE_ENV, "two")
    with pytest.raises(LorafitError, match="LORAFIT_PAUSE_AT_STEP='two': expected step numbers"):
        callbacks.PauseAtStep.from_environment()
