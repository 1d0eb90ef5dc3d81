"""QLoRA: a frozen 4-bit NF4 base (bitsandbytes, CPU or CUDA) under fp32 LoRA weights.

The base's linear layers become ``bitsandbytes.nn.Linear4bit``; LoRA layers sit over them with
the same ``lora_A``/``lora_B`` as over a 16-bit base (``h = dequant(W4) x + s * B A x``), so
adapters move freely between the 4-bit and the bf16 base. Merging dequantizes first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from lorafit import lora
from lorafit.constants import DTYPE_NAMES, torch_dtype
from lorafit.errors import LorafitError, did_you_mean

# The Phi-3 QLoRA sample's BitsAndBytesConfig, as ``--qlora`` applies it.
QLORA_SETTINGS: dict[str, Any] = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_use_double_quant": True,
}
KEYS = {
    "load_in_4bit",
    "bnb_4bit_quant_type",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
    "llm_int8_skip_modules",
}


def require_bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise LorafitError(
            "QLoRA needs bitsandbytes (>= 0.47, which runs 4-bit layers on CPU and CUDA): "
            "pip install 'lorafit[qlora]'"
        ) from None
    return bitsandbytes


def check_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Validate ``model.quantization`` (BitsAndBytesConfig keys); 4-bit only."""
    if not isinstance(settings, dict):
        raise LorafitError(
            f"model.quantization must be a mapping of BitsAndBytesConfig keys, got {settings!r}"
        )
    for key in settings:
        if key not in KEYS:
            raise LorafitError(f"model.quantization: unknown key '{key}'" + did_you_mean(key, KEYS))
    if not settings.get("load_in_4bit"):
        raise LorafitError("model.quantization: lorafit's QLoRA is 4-bit; set load_in_4bit: true")
    qtype = settings.get("bnb_4bit_quant_type", "nf4")
    if qtype not in ("nf4", "fp4"):
        raise LorafitError(f"model.quantization.bnb_4bit_quant_type must be nf4 or fp4, got {qtype!r}")
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if key in settings and settings[key] not in DTYPE_NAMES and settings[key] != "uint8":
            raise LorafitError(
                f"model.quantization.{key} must be one of {', '.join(DTYPE_NAMES)}, got {settings[key]!r}"
            )
    return settings


def bnb_config(settings: dict[str, Any]) -> Any:
    """A ``transformers.BitsAndBytesConfig`` for ``from_pretrained``."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    return BitsAndBytesConfig(**check_settings(settings))


def is_quantized(model: nn.Module) -> bool:
    return any(
        getattr(p, "quant_state", None) is not None or p.dtype == torch.uint8 for p in model.parameters()
    )


@torch.no_grad()
def quantize_model(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """Replace every linear layer but the output head by a 4-bit ``Linear4bit``, in place.

    For models built in memory (the demo); a hub or folder model is quantized while loading.
    """
    bnb = require_bitsandbytes()
    check_settings(settings)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    skip = set(settings.get("llm_int8_skip_modules") or [])
    compute = torch_dtype(settings.get("bnb_4bit_compute_dtype", "float32"))
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head or name.rsplit(".", 1)[-1] in skip:
            continue
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute,
            compress_statistics=bool(settings.get("bnb_4bit_use_double_quant", False)),
            quant_type=settings.get("bnb_4bit_quant_type", "nf4"),
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            module.weight.data.to(compute),
            requires_grad=False,
            quant_type=q.weight.quant_type,
            compress_statistics=q.weight.compress_statistics,
        )
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        q = q.to(module.weight.device)  # quantizes here
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    model.is_quantized = True
    return model


def prepare_kbit_model(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """Quantize an in-memory model if needed, freeze it, and keep its norms in fp32.

    Inputs that need grad under gradient checkpointing are handled by ``apply_lora``.
    """
    if not is_quantized(model):
        quantize_model(model, settings)
    for p in model.parameters():
        p.requires_grad_(False)
    bnb = require_bitsandbytes()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On AVX-512 BF16 CPUs, bitsandbytes repacks a 4-bit weight for its inference kernel
            # on the first eval-mode forward (eval loss, sample generation), and that kernel has
            # no backward: later training steps would silently lose every gradient through the
            # base. Keep the layout that trains.
            module.support_avx512bf16_for_cpu = False
    # Norms go to fp32 (their statistics stay exact, as in PEFT's k-bit preparation). Unlike
    # PEFT, embeddings and the output head keep their 16-bit weights: for Phi-3-mini that is
    # ~400 MB less. An fp32 norm makes fp32 activations, so the head casts its input to its own
    # dtype (a bf16 matmul with fp32 accumulation, as in any bf16 run).
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            module.float()
            module.register_forward_hook(_output_to_input_dtype)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dtype != torch.float32:
        head.register_forward_pre_hook(_input_to_weight_dtype)
    # transformers' Trainer refuses "purely quantized" models; LoRA makes this one trainable. No
    # public route says so: Trainer (trainer_utils.validate_quantization_for_training) accepts a
    # quantized model only when it is a PeftModel or carries this flag, which transformers' own
    # load_adapter sets. tests/models/test_quant.py fails loudly if transformers stops reading it.
    model._hf_peft_config_loaded = True
    return model


def _output_to_input_dtype(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(args[0].dtype) if torch.is_tensor(output) else output


def _input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every 4-bit weight by its 16-bit dequantization (for merging and export).

    The 16-bit dtype is ``dtype``, else the 4-bit layers' compute dtype (bf16 when that is fp32).
    """
    bnb = require_bitsandbytes()

    target_dtype = dtype
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and target_dtype is None:
            cd = module.compute_dtype
            target_dtype = cd if cd in (torch.bfloat16, torch.float16) else torch.bfloat16

    def plain(q: nn.Module) -> nn.Linear:
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        lin.weight = nn.Parameter(lora.dequantize_4bit(q).to(target_dtype), requires_grad=False)
        if q.bias is not None:
            lin.bias = nn.Parameter(q.bias.data.to(target_dtype), requires_grad=False)
        return lin

    for name, module in list(model.named_modules()):
        if isinstance(module, lora.Linear) and module.base_layer is not None:
            lin = plain(module.base_layer)
            module.base_layer = None
            module.weight = lin.weight
            module.bias = lin.bias
        elif isinstance(module, bnb.nn.Linear4bit) and not name.endswith(".base_layer"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain(module))
    # Undo the k-bit preparation's fp32 upcast so the model is 16-bit throughout again (LoRA
    # weights stay fp32: merging computes in fp32 anyway).
    for name, p in model.named_parameters():
        if "lora_" not in name and p.dtype == torch.float32 and target_dtype is not None:
            p.data = p.data.to(target_dtype)
    model._hf_peft_config_loaded = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer",):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    return model
