"""Names and values shared across lorafit's packages; imports nothing of lorafit.

Each enumeration is written once here and validated against where it is read.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
"""Label value that the causal-LM loss skips."""

DEMO_MODEL = "lorafit-demo"
"""The ``model.name_or_path`` that selects the embedded demo model."""

DTYPE_NAMES = ("bfloat16", "float16", "float32")
"""Floating-point dtypes by the names configs use (``model.torch_dtype`` also takes ``auto``)."""

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
"""The record formats ``detect_format`` recognises (``format: auto`` picks one of them)."""

OVERLONG = ("truncate", "drop")
"""What ``data.overlong`` does with an example longer than ``max_length``."""

REASONING = ("train", "mask", "drop")
"""What ``data.reasoning`` does with an assistant's reasoning trace: learn it, keep it as context
without loss, or remove it."""

TRAIN_ON = ("all", "last")
"""Which assistant turns ``data.train_on`` trains: all of them, or only those answering the last
user turn (its tool calls and final answer)."""

BIAS_MODES = ("none", "all", "lora_only")
"""Which biases train beside LoRA (loralib's and PEFT's ``bias``)."""

RUN_CONFIG_NAME = "lorafit_run.yaml"
"""The resolved config a run writes into its folder, to reproduce it (and to find its base model)."""


def torch_dtype(name: str) -> Any:
    """``torch.bfloat16`` for ``"bfloat16"`` and so on; ``"auto"`` stays ``"auto"``."""
    if name == "auto":
        return "auto"
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)} or auto")
    import torch

    return getattr(torch, name)
