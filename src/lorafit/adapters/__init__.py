"""LoRA on Hugging Face models: ``LoraConfig`` (PEFT's keys), applying and merging it, and
adapters in PEFT's file format."""

from lorafit.adapters.config import ALL_LINEAR, LoraConfig
from lorafit.adapters.files import load_adapter, read_adapter_config, save_adapter
from lorafit.adapters.inject import (
    apply_lora,
    find_targets,
    lora_layers,
    merge_lora,
    trainable_counts,
    trainable_summary,
    unmerge_lora,
)

__all__ = [
    "ALL_LINEAR",
    "LoraConfig",
    "apply_lora",
    "find_targets",
    "load_adapter",
    "lora_layers",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
    "trainable_counts",
    "trainable_summary",
    "unmerge_lora",
]
