"""LoRA on Hugging Face models: target matching, ``apply_lora``, merging, parameter counts.

``apply_lora(model, LoraConfig(...))`` swaps every targeted linear layer, in place, for a
:class:`lorafit.lora.Linear` that reuses the original weight tensor (no copy) and adds
``h = W0 x + s * B A drop(x)`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` get one pair over the whole fused layer, as
PEFT does, so adapters convert one to one.
"""

from __future__ import annotations

import os
import re
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from lorafit import lora
from lorafit.adapters.config import ALL_LINEAR, LoraConfig
from lorafit.errors import LorafitError


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:  # GPT-2 style Conv1D: a linear layer storing its weight as (in, out)
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def _layer_index(name: str, patterns: list[str] | str | None) -> int | None:
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(m.group(1)) if m else None
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        m = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None


def _matches(spec: list[str] | str, name: str) -> str | bool:
    """The list entry that matches ``name`` (exact or dotted suffix), or the regex result."""
    if isinstance(spec, str):
        return bool(re.fullmatch(spec, name))
    for key in spec:
        if name == key or name.endswith("." + key):
            return key
    return False


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in model.named_modules() if head is not None and m is head} or {"lm_head"}


def find_targets(model: nn.Module, config: LoraConfig, *, warn: bool = True) -> list[str]:
    """Names of the modules ``apply_lora`` would replace; errors and warnings as it would."""
    spec = config.target_modules
    heads = _output_head_names(model)
    linear_names = [n for n, m in model.named_modules() if _is_linear(m)]
    saved = config.modules_to_save or []
    used_keys: set[str] = set()
    targets = []
    for name in linear_names:
        if spec == ALL_LINEAR:
            if name in heads:
                continue
        else:
            hit = _matches(spec, name)  # type: ignore[arg-type]
            if not hit:
                continue
            if isinstance(hit, str):
                used_keys.add(hit)
        if config.exclude_modules and _matches(config.exclude_modules, name):
            continue
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved):
            continue  # trained in full instead
        if config.layers_to_transform is not None:
            if _layer_index(name, config.layers_pattern) not in config.layers_to_transform:
                continue
        targets.append(name)
    real = sorted({n.rsplit(".", 1)[-1] for n in linear_names if n not in heads})
    if not targets:
        raise LorafitError(
            f"peft_config.target_modules={spec!r} matches no linear layer of this model; "
            f"its linear layers are named: {', '.join(real)} (or use 'all-linear')"
        )
    if warn and isinstance(spec, list):
        unused = [k for k in spec if k not in used_keys]
        if unused:
            warnings.warn(
                f"peft_config.target_modules: {', '.join(unused)} match no linear layer of this model "
                f"and are ignored; LoRA goes on {', '.join(sorted(used_keys))} only. The model's linear "
                f"layers are named: {', '.join(real)}",
                UserWarning,
                stacklevel=3,
            )
    return targets


def wrap_linear(
    base: nn.Module,
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    fan_in_fan_out: bool = False,
    init_lora_weights: bool | str = True,
    lora_dtype: torch.dtype | None = None,
) -> lora.Linear:
    """A :class:`lora.Linear` over ``base``, sharing its weight and bias tensors (no copy).

    ``base`` is an ``nn.Linear``, transformers' ``Conv1D`` (``fan_in_fan_out``: its weight is
    (in, out)) or a 4-bit bitsandbytes ``Linear4bit``. The layer merges only when asked
    (``merge_weights=False``): ``eval()`` must not rewrite weights behind FSDP's back.
    """
    if isinstance(base, nn.Linear):
        in_f, out_f = base.in_features, base.out_features
    elif fan_in_fan_out:
        in_f, out_f = base.weight.shape
    else:
        out_f, in_f = base.weight.shape
    return lora.Linear(
        in_f,
        out_f,
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        fan_in_fan_out=fan_in_fan_out,
        merge_weights=False,
        use_rslora=use_rslora,
        base=base,
        use_dora=use_dora,
        init_lora_weights=init_lora_weights,
        lora_dtype=lora_dtype,
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, config: LoraConfig | dict[str, Any]) -> nn.Module:
    """Put LoRA on ``model`` in place and return it.

    Targeted linear layers become :class:`lora.Linear` sharing the original weights; every
    other parameter is frozen except ``modules_to_save`` and the biases ``config.bias`` names.
    The config is kept on ``model.lora_config`` for :func:`lorafit.save_adapter`.
    """
    if isinstance(config, dict):
        config = LoraConfig.from_dict(config)
    if getattr(model, "lora_config", None) is not None:
        raise LorafitError("this model already has LoRA applied (model.lora_config is set)")
    targets = find_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        base = model.get_submodule(name)
        is_conv1d = not isinstance(base, nn.Linear)
        layer = wrap_linear(
            base,
            r=config.rank_for(name),
            lora_alpha=config.alpha_for(name),
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            fan_in_fan_out=config.fan_in_fan_out or is_conv1d,
            init_lora_weights=config.init_lora_weights,
        )
        _set_submodule(model, name, layer)
    lora.mark_only_lora_as_trainable(model, bias=config.bias)
    for name in config.modules_to_save or []:
        found = [m for n, m in model.named_modules() if n == name or n.endswith("." + name)]
        if not found:
            raise LorafitError(f"peft_config.modules_to_save: no module named '{name}' in this model")
        for module in found:
            for p in module.parameters():
                if p.is_floating_point():
                    p.requires_grad_(True)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = (
            getattr(getattr(model, "config", None), "_name_or_path", None) or None
        )
    model.lora_config = config
    _save_pretrained_writes_adapter(model)
    # With frozen embeddings and reentrant gradient checkpointing no checkpointed block would
    # see an input that needs grad ("element 0 of tensors does not require grad"). transformers
    # adds the hook that fixes this whenever checkpointing is turned on (Trainer does, after
    # this), so add it here only if checkpointing is already on without it: never twice.
    checkpointing = getattr(model, "is_activation_checkpointing", False)
    if (
        checkpointing
        and not getattr(model, "_require_grads_hooks", None)
        and hasattr(model, "enable_input_require_grads")
    ):
        try:
            model.enable_input_require_grads()
        except NotImplementedError:  # models without input embeddings
            pass
    return model


def _save_pretrained_writes_adapter(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the adapter (PEFT's format) while the model carries
    LoRA layers, as PEFT's ``PeftModel.save_pretrained`` does.

    transformers' own would write the base weights (a merged layer saves its unmerged weight)
    with ``lora_*`` tensors beside them, which plain transformers loads as the base model without
    the update. ``transformers.Trainer`` saves every checkpoint through this method (its
    ``save_model`` hands it the gathered state dict under FSDP and ZeRO-3), so checkpoints hold
    the adapter and never the base. ``merge_lora(model, unload=True)`` gives transformers' back.
    """
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_save_adapter_pretrained, model)


def _save_adapter_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    safe_serialization: bool = True,
    **unsupported: Any,
) -> None:
    """``save_pretrained`` of a model carrying LoRA layers: ``adapter_config.json`` and
    ``adapter_model.safetensors`` in ``save_directory``. ``state_dict``: a full state dict of the
    model gathered by FSDP or DeepSpeed, from which the adapter's tensors are taken; only the
    process with ``is_main_process`` writes."""
    from lorafit.adapters.files import save_adapter  # files imports this module

    if unsupported or not safe_serialization:
        asked = sorted(unsupported) + ([] if safe_serialization else ["safe_serialization=False"])
        raise LorafitError(
            f"save_pretrained of a LoRA model writes the adapter (PEFT's format, safetensors) and takes "
            f"state_dict and is_main_process only, not {', '.join(asked)}. For a whole model, fold the "
            "update in first: lorafit.merge_lora(model, unload=True), then save_pretrained."
        )
    if state_dict is not None and not state_dict:
        raise LorafitError(
            "the sharded model handed over no weights to save. With DeepSpeed ZeRO-3 set "
            "zero_optimization.stage3_gather_16bit_weights_on_model_save: true in its config"
        )
    if is_main_process:
        save_adapter(model, save_directory, state_dict=state_dict)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, lora.LoRALayer]]:
    """``(name, layer)`` for every LoRA layer of ``model`` that holds an update."""
    for name, module in model.named_modules():
        if isinstance(module, lora.LoRALayer) and module.has_lora:
            yield name, module


@torch.no_grad()
def merge_lora(model: nn.Module, *, unload: bool = False) -> nn.Module:
    """Fold every ``scaling * B @ A`` into its base weight (fp32 arithmetic, one cast).

    A non-finite result is refused before any weight changes. ``unload=True`` then replaces
    each LoRA layer by a plain ``nn.Linear`` holding the merged weight, so that
    ``model.save_pretrained`` writes a model that plain transformers loads.
    """
    layers = list(lora_layers(model))
    for name, layer in layers:
        if not layer.merged and not torch.isfinite(layer.delta_weight()).all():
            raise LorafitError(f"LoRA weights of {name} are not finite; nothing was merged")
    for _, layer in layers:
        layer.merge()
    if unload:
        for name, layer in layers:
            w = layer.weight.T if layer.fan_in_fan_out else layer.weight
            plain = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device="meta")
            plain.weight = nn.Parameter(w.detach().contiguous(), requires_grad=False)
            if layer.bias is not None:
                plain.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
            plain.train(layer.training)
            _set_submodule(model, name, plain)
        if hasattr(model, "lora_config"):
            del model.lora_config
        model.__dict__.pop("save_pretrained", None)  # a plain model again: transformers' saves it
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged update out of its base weight again."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def _numel(p: torch.Tensor) -> int:
    # A 4-bit weight packs two values per stored byte; count values, as PEFT does.
    n = p.numel()
    if p.__class__.__name__ == "Params4bit":
        n *= 2
    return n


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, all)`` parameter counts, counted as PEFT counts them."""
    trainable = total = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """The line PEFT's ``print_trainable_parameters`` prints, same format and counts."""
    trainable, total = trainable_counts(model)
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"
