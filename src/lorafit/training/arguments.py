"""``training_config`` -> ``TrainingArguments``: the run's settings, then the plumbing.

:func:`resolve_training_config` turns the user's keys into the settings the run applies, which
``lorafit_run.yaml`` records and ``train`` prints once: keys transformers 5 renamed take their
new names, keys left out take lorafit's defaults, and settings this machine cannot run are
replaced, each with a note. :func:`training_arguments` adds what is plumbing, not a setting
(the output folder, lorafit's progress bar, the data columns, DDP's graph search).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from lorafit.config import LORAFIT_TRAINING_KEYS
from lorafit.errors import LorafitError
from lorafit.methods import ALL_METHOD_KEYS
from lorafit.models.precision import Precision
from lorafit.training.tracking import prepare_trackers

# Keys lorafit reads itself and never hands to TrainingArguments: the ones config.py accepts
# beside TrainingArguments' own (warmup_ratio is turned into warmup_steps before that).
LORAFIT_ONLY = frozenset(LORAFIT_TRAINING_KEYS)
# Where no memory plan was made (lorafit.training.memory plans single-process CPU runs), a model
# above this many parameters trains with activation checkpointing unless told otherwise: its
# activations at 2048 tokens (32 layers of Phi-3-mini: tens of GB) outweigh its weights, while
# below it they fit and recomputing them would only cost a third more time.
CHECKPOINTING_ABOVE = 1_000_000_000
_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
# transformers 5 renamed gradient checkpointing; the old names warn on every run.
_CHECKPOINTING = next(k for k in ("activation_checkpointing", "gradient_checkpointing") if k in _FIELDS)


def resolve_training_config(
    values: dict[str, Any], precision: Precision, *, has_eval: bool, n_params: int
) -> tuple[dict[str, Any], list[str]]:
    """The settings the run applies, and one note per setting replaced for this machine.

    ``bf16`` and ``fp16`` are ``precision``'s (whose notes say what it changed); a paged optimizer
    on a CPU becomes AdamW."""
    tc = dict(values)
    notes: list[str] = []  # each a setting replaced, and why
    if "warmup_ratio" in tc:  # dropped by transformers 5: a warmup_steps below 1 is a ratio there
        ratio = tc.pop("warmup_ratio")
        tc.setdefault("warmup_steps", float(ratio or 0))
    for old in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):
        new = old.replace("gradient_checkpointing", _CHECKPOINTING)
        if old in tc and new != old:
            tc.setdefault(new, tc.pop(old))
    if tc.get("checkpoint_layers"):  # some layers recomputed (lorafit.training.run.checkpoint_some_layers)
        if tc.get(_CHECKPOINTING):
            raise LorafitError(
                "training_config: checkpoint_layers recomputes some decoder layers and "
                f"{_CHECKPOINTING} all of them; set one of the two"
            )
        tc[_CHECKPOINTING] = False
    if "checkpoint_layers" in tc:  # the user's or the memory planner's (training.memory) choice
        tc.setdefault(_CHECKPOINTING, False)
    tc.setdefault(_CHECKPOINTING, n_params > CHECKPOINTING_ABOVE)  # where no plan was made (GPU, DDP)
    tc.setdefault("logging_steps", 10)
    tc.setdefault("save_strategy", "steps")
    if str(tc["save_strategy"]) == "steps":
        tc.setdefault("save_steps", 0.25)
    if has_eval and "eval_strategy" not in tc and tc.get("do_eval", True) is not False:
        tc["eval_strategy"] = "steps"
        tc.setdefault("eval_steps", 0.25)
    if not has_eval and str(tc.get("eval_strategy", "no")) not in ("no", "IntervalStrategy.NO"):
        # as the Phi-3 cookbook's script asks with no eval set: run without evaluation, and say so
        notes.append(
            f"eval_strategy: {tc['eval_strategy']} -> no (there is no eval data; to evaluate, set data.eval "
            "to a file or data.eval_fraction, e.g. 0.05)"
        )
        tc["eval_strategy"] = "no"
    for flag in ("bf16", "fp16"):  # the autocast the precision decided (its notes say any change)
        if bool(tc.get(flag)) != getattr(precision, flag):
            tc[flag] = getattr(precision, flag)
    optim = str(tc.get("optim", ""))
    if precision.on_cpu and optim.startswith("paged_"):  # the Phi-3 cookbook's script asks for one
        tc["optim"] = "adamw_torch"
        notes.append(f"optim: {optim} -> adamw_torch (paging is for GPU memory; on CPU it is plain AdamW)")
    return tc, notes


def training_arguments(resolved: dict[str, Any], run_dir: Path) -> TrainingArguments:
    """``TrainingArguments`` for the settings of :func:`resolve_training_config`, run in ``run_dir``."""
    # the preference methods' TRL keys (beta, loss_type, ...) are read by lorafit.training.preference
    tc = {k: v for k, v in resolved.items() if k not in LORAFIT_ONLY and k not in ALL_METHOD_KEYS}
    tc["output_dir"] = str(run_dir)
    if "report_to" not in tc:
        tc["report_to"] = ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
    prepare_trackers(tc["report_to"], run_dir, resolved.get("logging_dir"))  # in the run folder, offline
    from lorafit.models.device import has_accelerator

    if not has_accelerator():
        tc.setdefault("use_cpu", True)  # so that bf16: true (the Phi-3 sample) means CPU bf16 autocast
    tc.setdefault("disable_tqdm", True)  # lorafit's own bar shows loss, lr and tokens/s
    tc.setdefault("dataloader_num_workers", 0)
    tc["remove_unused_columns"] = False  # our rows carry only model inputs
    tc["label_names"] = ["labels"]
    # Every LoRA parameter takes part in every forward, so DDP need not search the graph for
    # unused ones each step (Trainer's default turns that search on without checkpointing).
    tc.setdefault("ddp_find_unused_parameters", False)
    # Non-reentrant checkpointing: works under DDP and FSDP with frozen base weights, where the
    # reentrant kind needs inputs that require grad.
    for key in ("gradient_checkpointing", "activation_checkpointing"):
        if tc.get(key) and f"{key}_kwargs" not in tc:
            tc[f"{key}_kwargs"] = {"use_reentrant": False}
    try:
        return TrainingArguments(**tc)
    except (ValueError, TypeError) as e:
        raise LorafitError(f"training_config: {e}") from None
