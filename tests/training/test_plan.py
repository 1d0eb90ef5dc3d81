"""The optimizer steps a run takes, and lorafit's recipe sizing its steps to small data."""

from __future__ import annotations

import pytest

from lorafit.config import load_config
from lorafit.training.plan import count_steps, describe_plan, plan_steps


def recipe(*overrides: str):
    """What `lorafit train --model.name_or_path M --data.train D [overrides]` starts from."""
    return load_config(None, ["--model.name_or_path", "some/model", "--data.train", "d.jsonl", *overrides])


def stats(examples: int, tokens: int, rows: int | None) -> dict:
    return {"examples": examples, "tokens": tokens, "packed_rows": rows}


def test_the_recipe_asks_for_100_steps_of_up_to_8k_tokens() -> None:
    tc = recipe().training_config
    assert tc["min_optimizer_steps"] == 100
    assert (
        tc["per_device_train_batch_size"] * tc["gradient_accumulation_steps"] == 4
        and tc["num_train_epochs"] == 3
    )


def test_count_steps_as_trainer_counts_them() -> None:
    assert count_steps(10, 3, 1, 4) == (9, 3)  # 10 batches -> 3 steps an epoch (the last of 2 batches)
    assert count_steps(10, 1.5, 1, 4) == (5, 3)
    assert count_steps(7, 1, 2, 1, world=2) == (2, 2)  # each of 2 processes: 4 rows, 2 batches
    assert count_steps(1, 3, 8, 4) == (3, 1)  # never less than a step an epoch


def test_a_large_dataset_keeps_8k_token_steps() -> None:
    cfg = recipe()
    sized, plan = plan_steps(cfg, stats(40_000, 2_000_000, 1_000))
    assert sized.training_config == cfg.training_config and sized.data.packing
    assert (plan.steps, plan.per_epoch, plan.batch * plan.accumulation, plan.packed) == (750, 250, 4, True)
    assert describe_plan(plan) == (
        "plan: 750 optimizer steps = 3 epochs x 250 steps of 4 packed rows of up to 2,048 tokens"
    )


def test_a_medium_dataset_takes_fewer_packed_rows_a_step() -> None:
    sized, plan = plan_steps(recipe(), stats(1_500, 80_000, 40))
    # 40 rows: 4 a step -> 30 steps, 3 -> 42, 2 -> 60, 1 -> 120: the first to reach 100
    assert sized.training_config["gradient_accumulation_steps"] == 1 and sized.data.packing
    assert (plan.steps, plan.batch, plan.accumulation, plan.packed) == (120, 1, 1, True)
    assert describe_plan(plan) == (
        "plan: 120 optimizer steps = 3 epochs x 40 steps of 1 packed row of up to 2,048 tokens "
        "(steps of 4 packed rows would make 30 for 1,500 examples (80,000 tokens), fewer than "
        "min_optimizer_steps 100)"
    )


def test_a_few_hundred_short_chats_get_a_few_examples_a_step() -> None:
    """The issue's case: 120 short chats, about 5k tokens, 3 packed rows: 3 steps of 8k tokens."""
    sized, plan = plan_steps(recipe(), stats(120, 5_000, 3))
    # whole examples: 3 a step -> 40 an epoch, 120 steps; 4 a step would make 90
    assert sized.data.packing is False
    assert sized.training_config["per_device_train_batch_size"] == 3
    assert sized.training_config["gradient_accumulation_steps"] == 1
    assert (plan.steps, plan.per_epoch, plan.batch, plan.packed) == (120, 40, 3, False)
    assert describe_plan(plan).startswith("plan: 120 optimizer steps = 3 epochs x 40 steps of 3 examples (")
    assert "steps of 4 packed rows would make 3 for 120 examples (5,000 tokens)" in describe_plan(plan)


def test_tiny_data_gets_one_example_a_step_and_says_it_is_short() -> None:
    sized, plan = plan_steps(recipe(), stats(20, 800, 1))
    assert (plan.steps, plan.batch) == (60, 1) and sized.training_config["per_device_train_batch_size"] == 1
    assert describe_plan(plan).endswith("; 60 is the most, at one example a step)")


def test_the_users_epochs_count() -> None:
    sized, plan = plan_steps(recipe("--training_config.num_train_epochs", "10"), stats(120, 5_000, 3))
    assert sized.training_config["num_train_epochs"] == 10
    # 13 a step: 10 an epoch (the last of 3 examples), 100 steps; 14 a step would make 90
    assert (plan.steps, plan.batch) == (100, 13)


@pytest.mark.parametrize(
    "given",
    [
        ["--training_config.per_device_train_batch_size", "2"],
        ["--training_config.gradient_accumulation_steps", "4"],
        ["--data.packing", "true"],
    ],
)
def test_a_step_the_user_gives_is_kept_and_the_line_says_so(given) -> None:
    cfg = recipe(*given)
    sized, plan = plan_steps(cfg, stats(120, 5_000, 3))
    assert sized.training_config == cfg.training_config and sized.data == cfg.data
    key = given[0].rpartition(".")[2]
    assert describe_plan(plan).endswith(
        f"(fewer than min_optimizer_steps 100, but the step is yours ({key}))"
    )


def test_max_steps_decides() -> None:
    sized, plan = plan_steps(recipe("--training_config.max_steps", "16"), stats(120, 5_000, 3))
    assert sized.data.packing and plan.steps == 16
    assert describe_plan(plan) == (
        "plan: 16 optimizer steps (training_config.max_steps) of 4 packed rows of up to 2,048 tokens"
    )


def test_without_min_optimizer_steps_nothing_changes(tmp_path) -> None:
    """A config file of one's own (or the demo's recipe) asks for no sizing: the step is as written."""
    path = tmp_path / "run.yaml"
    path.write_text("training_config: {per_device_train_batch_size: 1, gradient_accumulation_steps: 4}\n")
    cfg = load_config(path)
    sized, plan = plan_steps(cfg, stats(120, 5_000, 3))
    assert sized == cfg and plan.steps == 3 and plan.reason == ""
    demo = load_config(None)
    assert plan_steps(demo, stats(120, 5_000, 3))[0] == demo


def test_processes_share_the_steps() -> None:
    """Under DDP every process reads its share: the steps are counted over all of them."""
    sized, plan = plan_steps(recipe(), stats(120, 5_000, 3), world=2)
    # 2 processes x b examples a step: b = 1 -> 60 an epoch, 180 steps; b = 2 -> 30, 90 steps
    assert (plan.steps, plan.batch) == (180, 1)
    assert "of 2 examples" in describe_plan(plan, world=2)
