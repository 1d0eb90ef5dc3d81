"""lorafit: LoRA and QLoRA fine-tuning for Phi-3 and other Hugging Face causal LMs.

``from lorafit import lora`` is a drop-in for ``import loralib as lora``. The Hugging Face
side (``LoraConfig``, ``apply_lora``, adapters, merging) is imported lazily so that the
layer library alone needs only torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

# bitsandbytes (imported by transformers' Trainer when installed) warns at import on CPUs with
# AVX-512 BF16 that an optional hub kernel is missing; lorafit never downloads kernels.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

_LAZY = {
    "LoraConfig": "lorafit.adapters",
    "apply_lora": "lorafit.adapters",
    "merge_lora": "lorafit.adapters",
    "unmerge_lora": "lorafit.adapters",
    "trainable_summary": "lorafit.adapters",
    "save_adapter": "lorafit.adapters",
    "load_adapter": "lorafit.adapters",
    "LorafitError": "lorafit.errors",
    "train": "lorafit.training",
}

__all__ = ["lora", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name == "lora":
        return importlib.import_module("lorafit.lora")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorafit' has no attribute {name!r}")
