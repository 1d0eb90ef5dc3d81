"""The LoRA layer library with loralib's API: ``from lorafit import lora`` replaces
``import loralib as lora``. Nothing here depends on Hugging Face (see :mod:`lorafit.lora.layers`)."""

from lorafit.lora.conv import Conv1d, Conv2d, Conv3d, ConvLoRA
from lorafit.lora.layers import (
    Embedding,
    LoRALayer,
    MergedLinear,
    lora_state_dict,
    mark_only_lora_as_trainable,
)
from lorafit.lora.linear import Linear, dequantize_4bit
from lorafit.lora.ops import dropout_keep_mask, lora_update

__all__ = [
    "LoRALayer",
    "Embedding",
    "Linear",
    "MergedLinear",
    "ConvLoRA",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "lora_update",
    "dropout_keep_mask",
    "dequantize_4bit",
]
