"""How many optimizer steps a run takes, and steps sized to small data.

lorafit's recipe takes optimizer steps of 8,192 tokens (``per_device_train_batch_size: 1`` packed
row of ``max_length`` 2,048 tokens x ``gradient_accumulation_steps: 4``): right for a large
dataset, but a few hundred short chats (5,000 tokens: 3 packed rows) then make one step per
epoch, and three steps learn nothing. With ``training_config.min_optimizer_steps: M`` (the
recipe sets it), a run takes smaller steps until it takes at least M of them:

1. the step as configured, when the run takes M steps with it (large data keeps 8k-token steps);
2. else fewer packed rows a step: ``gradient_accumulation_steps`` lowered, the largest value
   that gives M steps;
3. else (fewer than M / epochs packed rows): whole examples a step, not packed, the largest
   number of them that gives M steps, at least 1 (``data.packing: false``; a batch then pads to
   its longest example, little for short chats).

Only keys the user left out are changed: a user who gives ``per_device_train_batch_size``,
``gradient_accumulation_steps``, ``max_steps`` or ``data.packing`` has chosen the step, and it
stays as given; ``num_train_epochs`` (the user's or the recipe's) is kept and counted.
:func:`describe_plan` says the number of steps and why in one line at the start of every run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lorafit.config import RunConfig

# The keys that make a step: a user who gives one of them has chosen the step.
STEP_KEYS = (
    "training_config.per_device_train_batch_size",
    "training_config.gradient_accumulation_steps",
    "training_config.max_steps",
    "data.packing",
)


@dataclass(frozen=True)
class Plan:
    """``steps`` optimizer steps: ``epochs`` x ``per_epoch`` (or ``max_steps`` when
    ``by_max_steps``), each of ``batch`` x ``accumulation`` rows per process (packed rows of up
    to ``row_tokens`` tokens, or whole examples), and why, when the step was sized or too few."""

    steps: int
    per_epoch: int
    epochs: float
    batch: int
    accumulation: int
    packed: bool
    row_tokens: int
    by_max_steps: bool = False
    reason: str = ""


def count_steps(rows: int, epochs: float, batch: int, accumulation: int, world: int = 1) -> tuple[int, int]:
    """``(steps, steps per epoch)`` as Trainer counts them: each of ``world`` processes reads
    ``ceil(rows / world)`` rows in batches of ``batch`` (the last one short), and every
    ``accumulation`` batches, and an epoch's last short group, make one optimizer step."""
    batches = math.ceil(math.ceil(rows / world) / batch)
    per_epoch = max(math.ceil(batches / accumulation), 1)
    return math.ceil(per_epoch * epochs), per_epoch


def plan_steps(cfg: RunConfig, stats: dict[str, Any], world: int = 1) -> tuple[RunConfig, Plan]:
    """``cfg`` with its step sized to the data where ``min_optimizer_steps`` asks for it (see the
    module), and the plan. ``stats`` are ``build_datasets``'s for the rows built with ``cfg``;
    when the plan turns packing off, the rows must be built again."""
    tc = cfg.training_config
    epochs = float(tc.get("num_train_epochs", 3.0))
    batch = int(tc.get("per_device_train_batch_size", 8))
    accumulation = int(tc.get("gradient_accumulation_steps", 1))
    packed = bool(cfg.data.packing and stats.get("packed_rows"))
    rows = stats["packed_rows"] if packed else stats["examples"]
    plan = Plan(0, 0, epochs, batch, accumulation, packed, cfg.data.max_length)
    steps, per_epoch = count_steps(rows, epochs, batch, accumulation, world)
    max_steps = int(tc.get("max_steps") or -1)
    if max_steps > 0:
        return cfg, dataclasses.replace(plan, steps=max_steps, per_epoch=per_epoch, by_max_steps=True)
    plan = dataclasses.replace(plan, steps=steps, per_epoch=per_epoch)
    wanted = int(tc.get("min_optimizer_steps") or 0)
    if steps >= wanted:
        return cfg, plan
    given = [key.split(".")[1] for key in STEP_KEYS if key in cfg.user_keys]
    if given:
        why = f"fewer than min_optimizer_steps {wanted}, but the step is yours ({', '.join(given)})"
        return cfg, dataclasses.replace(plan, reason=why)
    too_few = (
        f"steps of {_rows(batch * accumulation * world, packed)} would make {steps} for "
        f"{stats['examples']:,} examples ({stats['tokens']:,} tokens), "
        f"fewer than min_optimizer_steps {wanted}"
    )
    if packed:  # 2. fewer packed rows a step
        for fewer in range(accumulation - 1, 0, -1):
            steps, per_epoch = count_steps(rows, epochs, batch, fewer, world)
            if steps >= wanted:
                plan = dataclasses.replace(
                    plan, steps=steps, per_epoch=per_epoch, accumulation=fewer, reason=too_few
                )
                tc = {**tc, "gradient_accumulation_steps": fewer}
                return dataclasses.replace(cfg, training_config=tc), plan
    # 3. whole examples, the most a step that still make the steps wanted
    examples = stats["examples"]
    fits = [b for b in range(1, examples + 1) if count_steps(examples, epochs, b, 1, world)[0] >= wanted]
    b = max(fits, default=1)
    steps, per_epoch = count_steps(examples, epochs, b, 1, world)
    if steps < wanted:
        too_few += f"; {steps} is the most, at one example a step"
    plan = Plan(steps, per_epoch, epochs, b, 1, False, cfg.data.max_length, reason=too_few)
    tc = {**tc, "per_device_train_batch_size": b, "gradient_accumulation_steps": 1}
    unpacked = dataclasses.replace(cfg.data, packing=False)
    return dataclasses.replace(cfg, training_config=tc, data=unpacked), plan


def _rows(n: int, packed: bool, row_tokens: int | None = None) -> str:
    what = "packed row" if packed else "example"
    text = f"{n} {what}{'s' if n != 1 else ''}"
    return text + (f" of up to {row_tokens:,} tokens" if packed and row_tokens else "")


def describe_plan(plan: Plan, world: int = 1) -> str:
    """One line: the optimizer steps the run takes, of what, and why that step."""
    step = _rows(plan.batch * plan.accumulation * world, plan.packed, plan.row_tokens)
    line = f"plan: {plan.steps:,} optimizer steps"
    if plan.by_max_steps:
        line += f" (training_config.max_steps) of {step}"
    else:
        line += f" = {plan.epochs:g} epochs x {plan.per_epoch:,} steps of {step}"
    return line + (f" ({plan.reason})" if plan.reason else "")
