"""lorafit.training.callbacks' files: ``metrics.jsonl`` cut back to a checkpoint on resume, and
``loss.png``. The callbacks on real runs (stop on a signal, the non-finite guard, the run files)
are in test_checkpoints.py, test_run.py and test_cli.py."""

from __future__ import annotations

import json

import matplotlib.image

from lorafit.training import callbacks


def test_metrics_are_cut_back_to_the_checkpoint_a_run_resumes_from(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": step, "loss": 3.0 - step / 10} for step in (1, 2, 3, 4)]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    path.write_text(text + '{"step": 2, "eval_loss": 2.5}\n[1, 2]\n{"step": "x"}\n{"step": 5, "lo')  # a kill
    kept = callbacks.metrics_up_to(path, 2)
    assert kept == [rows[0], rows[1], {"step": 2, "eval_loss": 2.5}]
    assert [json.loads(line) for line in path.read_text().splitlines()] == kept  # the file reads as one run
    assert callbacks.metrics_up_to(tmp_path / "none.jsonl", 2) == []  # a run that logged nothing yet


def test_the_loss_plot_is_written_whole_and_only_with_a_loss_to_draw(tmp_path) -> None:
    path = tmp_path / "loss.png"
    callbacks.plot_loss([{"step": 1, "learning_rate": 1e-4}], path)
    assert not path.exists()
    history = [{"step": s, "loss": 2.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.6}]
    callbacks.plot_loss(history, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary file left
    callbacks.plot_loss([{"step": 3, "eval_loss": 0.5}], path)  # eval loss alone is drawn too
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_plot_adds_a_rewards_panel_for_preference_metrics(tmp_path) -> None:
    sft = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    callbacks.plot_loss(sft, tmp_path / "sft.png")
    assert matplotlib.image.imread(tmp_path / "sft.png").shape[:2] == (400, 700)
    dpo = [
        {"step": 1, "loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
        {"step": 2, "loss": 0.5, "rewards/margins": 0.4, "rewards/accuracies": 1.0},
        {"step": 2, "eval_loss": 0.6, "eval_rewards/margins": 0.2, "eval_rewards/accuracies": 0.5},
    ]
    callbacks.plot_loss(dpo, tmp_path / "dpo.png")
    image = matplotlib.image.imread(tmp_path / "dpo.png")
    assert image.shape[:2] == (400, 1200)
    assert not (tmp_path / "dpo.tmp.png").exists()
    # the right half is drawn on (the panel has lines), not left white
    right = image[40:360, 700:1150, :3]
    assert (right < 0.9).any()
