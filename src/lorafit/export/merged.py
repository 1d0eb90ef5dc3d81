"""A trained adapter folded into its base: a plain transformers model folder.

``W = W0 + s * B A`` for every LoRA layer (fp32 arithmetic, one cast to the base dtype); a 4-bit
base is dequantized to 16 bits first. The folder loads with
``AutoModelForCausalLM.from_pretrained``, with no lorafit or PEFT installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lorafit.adapters import merge_lora
from lorafit.errors import LorafitError


def merge_into_base(model: torch.nn.Module, *, quantized: bool) -> torch.nn.Module:
    """Fold the adapter of ``model`` into its base weights and drop the LoRA layers (in place)."""
    if quantized:
        from lorafit.models.quant import dequantize_model

        dequantize_model(model)
    return merge_lora(model, unload=True)


def check_new_folder(out: Path) -> None:
    """Refuse an output folder that holds files: an existing model folder is never written over."""
    if out.exists() and any(out.iterdir()):
        raise LorafitError(f"--out {out} already holds files; choose a new or empty folder")


def save_merged(model: torch.nn.Module, tokenizer: Any, out: str | os.PathLike, *, quantized: bool) -> Path:
    """Merge (see :func:`merge_into_base`) and save model and tokenizer into ``out``, which must be
    new or empty."""
    out = Path(out)
    check_new_folder(out)
    merge_into_base(model, quantized=quantized)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
