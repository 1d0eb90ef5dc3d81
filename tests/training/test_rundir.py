"""lorafit.training.rundir on real folders: which folder a run writes to, what a fresh run in a
used folder removes, and the files written at the top of a run folder.

Checks of the folder and the disk before loading (check_output_dir, check_free_space,
write_errors_reported) are in test_checkpoints.py; the same rules through the real CLI in test_cli.py.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from lorafit.config import load_config
from lorafit.errors import LorafitError
from lorafit.training import rundir


def config(*overrides: str):
    return load_config(None, ["--model.name_or_path", "lorafit-demo", *overrides])


def complete_checkpoint(run: Path, step: int) -> Path:
    """A checkpoint-N folder with the three files a resume reads."""
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_a_new_run_folder_is_never_an_old_one(tmp_path, monkeypatch) -> None:
    class FixedClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 28, 10, 15, 0)

    monkeypatch.setattr(rundir, "datetime", FixedClock)
    first = rundir.new_run_dir(tmp_path)
    assert first == tmp_path / "20261128-101500" and not first.exists()
    first.mkdir()
    second = rundir.new_run_dir(tmp_path)
    assert second == tmp_path / "20261128-101500-2"
    second.mkdir()
    assert rundir.new_run_dir(tmp_path).name == "20261128-101500-3"


def test_output_dir_is_new_empty_or_explicitly_overwritten(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path, checkpoint = rundir.resolve_run_dir(config(), None)
    assert path.parent == Path("runs") and checkpoint is None  # no output_dir: runs/<timestamp>
    out = tmp_path / "out"
    assert rundir.resolve_run_dir(config("--training_config.output_dir", str(out)), None) == (out, None)
    out.mkdir()
    assert rundir.resolve_run_dir(config("--training_config.output_dir", str(out)), None) == (out, None)
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(LorafitError, match="already holds files.*--resume.*overwrite_output_dir: true"):
        rundir.resolve_run_dir(config("--training_config.output_dir", str(out)), None)
    cfg = config("--training_config.output_dir", str(out), "--training_config.overwrite_output_dir", "true")
    assert rundir.resolve_run_dir(cfg, None) == (out, None)


def test_resume_takes_the_newest_complete_checkpoint_of_the_run_named(tmp_path) -> None:
    run = tmp_path / "run"
    with pytest.raises(LorafitError, match="no such run or checkpoint folder"):
        rundir.resolve_run_dir(config(), str(run))
    run.mkdir()
    with pytest.raises(LorafitError, match="holds no complete checkpoint-N/"):
        rundir.resolve_run_dir(config(), str(run))
    complete_checkpoint(run, 2)
    newest = complete_checkpoint(run, 4)
    (run / "checkpoint-6").mkdir()  # a save cut short: not resumed from
    assert rundir.resolve_run_dir(config(), str(run)) == (run, str(newest))
    # a checkpoint named directly: its run folder, that checkpoint (train() checks it whole)
    assert rundir.resolve_run_dir(config(), str(run / "checkpoint-2")) == (run, str(run / "checkpoint-2"))
    # a bare --resume reads training_config.output_dir
    with pytest.raises(LorafitError, match="--resume needs the run folder"):
        rundir.resolve_run_dir(config(), True)
    named = config("--training_config.output_dir", str(run))
    assert rundir.resolve_run_dir(named, True) == (run, str(newest))


def test_a_fresh_run_in_a_used_folder_removes_only_the_old_runs_files(tmp_path) -> None:
    run = tmp_path / "run"
    complete_checkpoint(run, 2)
    for name in (rundir.METRICS_NAME, rundir.LOSS_PLOT_NAME, rundir.SAMPLES_NAME):
        (run / name).write_text("old")
    (run / "tensorboard").mkdir()
    (run / "notes.txt").write_text("the user's own file")
    (run / ".partial-checkpoint-4").mkdir()  # what a kill during a save leaves
    said: list[str] = []
    rundir.prepare_run_dir(run, fresh=False, echo=said.append)  # a resume keeps the run's files
    assert not (run / ".partial-checkpoint-4").exists() and (run / "checkpoint-2").is_dir() and not said
    rundir.prepare_run_dir(run, fresh=True, echo=said.append)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert said == [
        "overwrite_output_dir: removed the previous run's checkpoint-2, loss.png, metrics.jsonl, "
        "samples.md, tensorboard"
    ]


def test_skipped_records_name_their_split(tmp_path) -> None:
    stats = {
        "skipped": [{"where": "train.jsonl line 3", "reason": "empty turn"}],
        "eval": {"skipped": [{"where": "eval.jsonl line 1", "reason": "bad JSON"}]},
    }
    n, path = rundir.write_skipped_records(tmp_path, stats)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == 2 and path.name == rundir.SKIPPED_NAME
    assert rows == [
        {"split": "train", "where": "train.jsonl line 3", "reason": "empty turn"},
        {"split": "eval", "where": "eval.jsonl line 1", "reason": "bad JSON"},
    ]


def test_samples_hold_each_prompt_its_reference_and_both_answers(tmp_path) -> None:
    conversations = [
        [{"role": "user", "content": "Who is the mayor?"}, {"role": "assistant", "content": "Tobiah Venn"}],
        [{"role": "user", "content": "Which island?"}, {"role": "assistant", "content": "Caddow"}],
    ]
    summary = {"exact_match": 0.5, "contains": 1.0, "rouge_l": 0.75}
    after = (summary, [{"answer": "Tobiah Venn"}, {"answer": "It is Caddow."}])
    path = tmp_path / rundir.SAMPLES_NAME
    rundir.write_samples(path, conversations, None, after)  # resumed: no answers from before
    text = path.read_text()
    assert "| before | - | - | - |" in text and "| after | 0.500 | 1.000 | 0.750 |" in text
    assert "## 2. Which island?\n\n**reference:** Caddow\n\n**before:** (not run: resumed)" in text
    assert "**after:** It is Caddow." in text
