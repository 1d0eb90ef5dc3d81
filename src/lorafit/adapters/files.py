"""Adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r), plus full tensors of ``modules_to_save`` and trained biases
under ``base_model.model.<path>``. PEFT, transformers' ``load_adapter`` and vLLM read what
``save_adapter`` writes; ``load_adapter`` reads PEFT's LoRA adapters, into a whole model or (under
FSDP) into one whose parameters are sharded over the processes (``load_adapter_sharded``). Only
safetensors are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorafit.adapters.config import ALL_LINEAR, LoraConfig
from lorafit.adapters.inject import apply_lora, find_targets, lora_layers
from lorafit.disk import atomic_write
from lorafit.errors import LorafitError
from lorafit.lora.variants import parameter_name, variant_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Wrapper modules that FSDP1, activation checkpointing and torch.compile insert into module names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_module_name(name: str) -> str:
    """A module or parameter name without the wrapper parts FSDP1 and activation checkpointing
    insert (``_fsdp_wrapped_module.`` ...): the name the plain model gives it."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def adapter_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors an adapter holds, under PEFT's key names.

    With ``state_dict`` (a full state dict of ``model``, as FSDP and DeepSpeed gather it for
    saving, keyed by parameter name) the tensors come from there instead of from the model,
    whose own parameters are then only shards. Names are taken without the wrapper parts that
    FSDP1 and activation checkpointing insert, so the keys are the plain model's.
    """
    config: LoraConfig = _config_of(model)
    wanted: dict[str, tuple[str, torch.Tensor]] = {}  # PEFT key -> (parameter name, parameter)
    for name, layer in lora_layers(model):
        name = clean_module_name(name)
        for key, p in layer.adapter_params().items():
            wanted[f"{PREFIX}{name}.{key}"] = (f"{name}.{parameter_name(key)}", p)
    lora_names = {clean_module_name(name) for name, _ in lora_layers(model)}
    named = ((clean_module_name(n), p) for n, p in model.named_parameters())
    for name, p in _saved_with_lora(named, model, config, lora_names).items():
        wanted[PREFIX + name] = (name, p)
    if state_dict is None:
        return {k: p.detach().contiguous() for k, (_, p) in wanted.items()}
    missing = [pname for pname, _ in wanted.values() if pname not in state_dict]
    if missing:
        raise LorafitError(f"the gathered state dict lacks {len(missing)} adapter tensors, e.g. {missing[0]}")
    return {k: state_dict[pname].detach().contiguous() for k, (pname, _) in wanted.items()}


def _config_of(model: nn.Module) -> LoraConfig:
    config = getattr(model, "lora_config", None)
    if config is None:
        raise LorafitError("this model has no LoRA applied: call lorafit.apply_lora(model, config) first")
    return config


def adapter_config_dict(model: nn.Module) -> dict[str, Any]:
    """``adapter_config.json`` content: PEFT's LoraConfig fields for what this model holds."""
    config = _config_of(model)
    target = config.target_modules
    if target == ALL_LINEAR:
        # Record the resolved names, as PEFT does: loaders that know no "all-linear" (vLLM) work.
        target = sorted({name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)})
    d = config.to_dict()
    d.update(
        peft_type="LORA",
        target_modules=target,
        inference_mode=True,
        lora_bias=False,
        revision=None,
        auto_mapping=None,
        layer_replication=None,
        megatron_config=None,
        megatron_core="megatron.core",
        loftq_config={},
    )
    return dict(sorted(d.items()))


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``.

    Each file is written to a temporary name and renamed, so an interrupted save never
    leaves a half-written adapter over a good one. ``state_dict``: take the tensors from this
    gathered full state dict (FSDP, DeepSpeed ZeRO-3) instead of the model's own parameters.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model, state_dict)
    cfg = adapter_config_dict(model)
    if base_model_name_or_path is not None:
        cfg["base_model_name_or_path"] = base_model_name_or_path
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
    return folder


def read_adapter_config(folder: str | os.PathLike) -> LoraConfig:
    """Parse and validate ``folder/adapter_config.json`` (PEFT's or ours)."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise LorafitError(f"adapter folder {folder} does not exist")
    if not path.is_file():
        raise LorafitError(f"{path} is missing: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LorafitError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise LorafitError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return LoraConfig.from_dict(raw, where=str(path))


def read_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load ``adapter_model.safetensors``; pickled ``.bin`` adapters are refused, never unpickled."""
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise LorafitError(
                f"{folder} holds adapter_model.bin, a pickle, which can run code when loaded; lorafit "
                "reads safetensors only. If you trust its source, convert it once with PEFT "
                "(PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True))."
            )
        raise LorafitError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LorafitError(f"{path} is not a readable safetensors file: {e}") from None
    # PEFT writes "base_model.model.<path>"; transformers' own PEFT integration writes "<path>".
    return {(k[len(PREFIX) :] if k.startswith(PREFIX) else k): v for k, v in tensors.items()}


def _saved_with_lora(
    named: Iterable[tuple[str, nn.Parameter]], model: nn.Module, config: LoraConfig, lora_names: set[str]
) -> dict[str, nn.Parameter]:
    """The parameters an adapter holds beside the LoRA layers' own, by name: trained biases (PEFT's
    ``bias``: ``all``, or ``lora_only`` for the LoRA layers' biases) and every parameter of the
    ``modules_to_save``. ``named`` is the model's ``named_parameters()`` (names cleaned of wrappers)."""
    out = {}
    for name, p in named:
        if ".lora_" in name:
            continue
        owner = name.rsplit(".", 1)[0]
        if (
            config.bias == "all"
            and name.endswith("bias")
            or (config.bias == "lora_only" and name.endswith(".bias") and owner in lora_names)
        ):
            out[name] = p
    for mod_name in config.modules_to_save or []:
        for name, module in model.named_modules():
            name = clean_module_name(name)
            if name == mod_name or name.endswith("." + mod_name):
                for pname, p in module.named_parameters():
                    out[f"{name}.{clean_module_name(pname)}"] = p
    return out


def _expected_shapes(model: nn.Module, config: LoraConfig, targets: list[str]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor an adapter with ``config`` must hold for ``model`` (LoRA applied
    or not yet): the LoRA variant's tensors of each target, and :func:`_saved_with_lora`."""
    shapes: dict[str, tuple[int, ...]] = {}
    variant = variant_for(config.use_dora)
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            in_f, out_f = module.in_features, module.out_features
        else:  # transformers' Conv1D stores its weight as (in, out)
            in_f, out_f = module.weight.shape
        for key, shape in variant.tensors(in_f, out_f, config.rank_for(name)).items():
            shapes[f"{name}.{key}"] = shape
    extra = _saved_with_lora(model.named_parameters(), model, config, set(targets))
    shapes.update({name: tuple(p.shape) for name, p in extra.items()})
    return shapes


def _check_fits(folder: Path, config: LoraConfig, tensors: dict, expected: dict) -> None:
    """Refuse, naming every mismatch, an adapter whose keys or shapes are not what the model needs."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: adapter {tuple(tensors[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return

    def head(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")

    found = {"missing keys": missing, "unexpected keys": unexpected, "wrong shapes": wrong}
    parts = [f"{what}: {head(items)}" for what, items in found.items() if items]
    base = config.base_model_name_or_path or "an unnamed model"
    raise LorafitError(
        f"adapter {folder} was made for another base model ({base}) or another LoRA setup; "
        + "; ".join(parts)
        + ". The model was left unchanged."
    )


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format LoRA adapter into ``model`` (applying LoRA first if needed).

    Everything is checked before the model changes: every key the adapter needs is present,
    none is left over, and every shape fits this model. An adapter made for another base
    model is refused with the mismatches listed by name.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    tensors = read_adapter_weights(folder)
    existing = getattr(model, "lora_config", None)
    if existing is not None and existing.use_dora != config.use_dora:
        kinds = {True: "DoRA", False: "plain LoRA"}
        raise LorafitError(
            f"adapter {folder} is {kinds[config.use_dora]} but this model carries {kinds[existing.use_dora]} "
            "layers; load it into the base model without LoRA applied. The model was left unchanged."
        )
    if existing is not None:
        targets = [name for name, _ in lora_layers(model)]
    else:
        try:
            targets = find_targets(model, config, warn=False)
        except LorafitError as e:
            raise LorafitError(f"adapter {folder} does not fit this model: {e}") from None
    _check_fits(folder, config, tensors, _expected_shapes(model, config, targets))
    if existing is None:
        apply_lora(model, config)
    params = dict(model.named_parameters())
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    with torch.no_grad():
        for layer in merged:  # take the old update out before its A, B (and magnitudes) change
            layer.unmerge()
        for key, value in tensors.items():
            target = params[parameter_name(key)]
            target.copy_(value.to(target.dtype))
        for layer in merged:
            layer.merge()
    return model


def load_adapter_sharded(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load an adapter's tensors into a model whose parameters FSDP has sharded.

    Every rank calls this and reads ``folder`` (a shared filesystem, or the same files on each
    machine); ``set_model_state_dict`` keeps each rank's shard of every full tensor. The model
    must already carry the adapter's LoRA layers (it does when resuming a lorafit run).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    tensors = read_adapter_weights(folder)
    names = {clean_module_name(n) for n, _ in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = parameter_name(key)
        if name not in names:
            raise LorafitError(f"adapter {Path(folder)}: {key} has no parameter {name} in this model")
        state[name] = value
    missing = sorted(n for n in names if ".lora_" in n and n not in state)
    if missing:
        raise LorafitError(f"adapter {Path(folder)} lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
