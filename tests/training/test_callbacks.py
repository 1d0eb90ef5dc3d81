"""training/callbacks.py: loss.png's panels."""

from __future__ import annotations

import matplotlib.image

from lorafit.training.callbacks import plot_loss


def test_loss_plot_adds_a_rewards_panel_for_preference_metrics(tmp_path) -> None:
    sft = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    plot_loss(sft, tmp_path / "sft.png")
    assert matplotlib.image.imread(tmp_path / "sft.png").shape[:2] == (400, 700)
    dpo = [
        {"step": 1, "loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
        {"step": 2, "loss": 0.5, "rewards/margins": 0.4, "rewards/accuracies": 1.0},
        {"step": 2, "eval_loss": 0.6, "eval_rewards/margins": 0.2, "eval_rewards/accuracies": 0.5},
    ]
    plot_loss(dpo, tmp_path / "dpo.png")
    image = matplotlib.image.imread(tmp_path / "dpo.png")
    assert image.shape[:2] == (400, 1200)
    assert not (tmp_path / "dpo.tmp.png").exists()
    # the right half is drawn on (the panel has lines), not left white
    right = image[40:360, 700:1150, :3]
    assert (right < 0.9).any()
