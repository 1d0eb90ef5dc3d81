"""``training_config`` -> ``TrainingArguments``, with lorafit's defaults for the keys not given."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import TrainingArguments

from lorafit.config import RunConfig
from lorafit.errors import LorafitError
from lorafit.training.distributed import has_accelerator


def training_arguments(cfg: RunConfig, run_dir: Path, has_eval: bool) -> TrainingArguments:
    """TrainingArguments from ``training_config`` with lorafit's defaults for keys not given."""
    tc = dict(cfg.training_config)
    tc.pop("overwrite_output_dir", None)
    tc.pop("save_safetensors", None)
    tc.pop("skip_nonfinite", None)
    logging_dir = tc.pop("logging_dir", None)
    if "warmup_ratio" in tc:
        ratio = tc.pop("warmup_ratio")
        tc.setdefault("warmup_steps", float(ratio or 0))
    # TensorBoard events go to run_dir/tensorboard unless logging_dir says otherwise.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(logging_dir or run_dir / "tensorboard")
    tc["output_dir"] = str(run_dir)
    tc.setdefault("logging_steps", 10)
    tc.setdefault("save_strategy", "steps")
    tc.setdefault("save_steps", 0.25)
    if has_eval and "eval_strategy" not in tc and tc.get("do_eval", True) is not False:
        tc.setdefault("eval_strategy", "steps")
        tc.setdefault("eval_steps", 0.25)
    if not has_eval and str(tc.get("eval_strategy", "no")) not in ("no", "IntervalStrategy.NO"):
        raise LorafitError(
            f"training_config.eval_strategy is {tc['eval_strategy']!r} but there is no eval data; set "
            "data.eval (a file), data.eval_fraction (e.g. 0.05), or training_config.eval_strategy: no"
        )
    if "report_to" not in tc:
        import importlib.util

        tc["report_to"] = ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
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
    # reentrant kind needs inputs that require grad. transformers 5 renamed the key.
    for key in ("gradient_checkpointing", "activation_checkpointing"):
        if tc.get(key) and f"{key}_kwargs" not in tc:
            tc[f"{key}_kwargs"] = {"use_reentrant": False}
    try:
        return TrainingArguments(**tc)
    except (ValueError, TypeError) as e:
        raise LorafitError(f"training_config: {e}") from None
