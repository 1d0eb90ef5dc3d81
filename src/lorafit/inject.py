"""LoRA on Hugging Face models: ``LoraConfig`` (PEFT's keys), ``apply_lora``, merging, summaries.

``apply_lora(model, LoraConfig(...))`` swaps every targeted linear layer, in place, for a
:class:`lorafit.lora.Linear` that reuses the original weight tensor (no copy) and adds
``h = W0 x + s * B A drop(x)`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` get one pair over the whole fused layer, as
PEFT does, so adapters convert one to one.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lorafit import lora
from lorafit.errors import LorafitError, did_you_mean

ALL_LINEAR = "all-linear"

# PEFT LoraConfig keys lorafit reads but does not act on: bookkeeping, or features that are
# off at these values. A PEFT adapter that turns one of the features on is refused.
_PEFT_BOOKKEEPING = {
    "peft_type",
    "auto_mapping",
    "peft_version",
    "revision",
    "inference_mode",
    "megatron_core",
    "runtime_config",
}
_PEFT_OFF_FEATURES = {
    "megatron_config",
    "trainable_token_indices",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "use_dora",
    "velora_config",
    "alora_invocation_tokens",
    "use_qalora",
    "monteclora_config",
    "layer_replication",
    "lora_bias",
    "target_parameters",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "ensure_weight_tying",
    "qalora_group_size",
}
_FEATURE_DEFAULTS_OK = {"qalora_group_size": 16}


@dataclass
class LoraConfig:
    """PEFT's LoraConfig keys, so the Phi-3 samples' ``peft_config`` dict is accepted as is.

    Attributes:
        r: rank of the update ``B A``.
        lora_alpha: the update is scaled by ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the LoRA branch's input.
        bias: which biases train: ``none``, ``all``, or ``lora_only`` (those of LoRA layers).
        task_type: PEFT's task type, recorded in the adapter (``CAUSAL_LM``).
        target_modules: module names matched on their last dotted parts (a list), a regex
            matched on the full name (a string), or ``"all-linear"`` (every linear layer but the
            output head).
        exclude_modules: names (list, suffix match) or a regex (full match) never targeted.
        modules_to_save: modules trained in full and saved with the adapter (e.g. ``lm_head``).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A normal with
            std 1/r, B zero) or ``False`` (B random too: the adapter is not a no-op; for tests).
        rank_pattern / alpha_pattern: per-module rank / alpha, keyed by regex on the name.
        layers_to_transform / layers_pattern: restrict targets to these layer indices.
        fan_in_fan_out: the targeted weights are stored (in, out) (GPT-2's Conv1D).
        base_model_name_or_path: the base model, recorded in the adapter.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    task_type: str | None = "CAUSAL_LM"
    target_modules: list[str] | str | None = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise LorafitError(f"peft_config.r must be a positive integer, got {self.r!r}")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise LorafitError(f"peft_config.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise LorafitError(f"peft_config.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise LorafitError(
                f"peft_config.bias must be one of none, all, lora_only; got {self.bias!r}"
                + did_you_mean(str(self.bias), ["none", "all", "lora_only"])
            )
        if not isinstance(self.init_lora_weights, bool) and self.init_lora_weights != "gaussian":
            raise LorafitError(
                "peft_config.init_lora_weights must be true, false or 'gaussian'; "
                f"got {self.init_lora_weights!r}"
            )
        if self.target_modules is None or self.target_modules == []:
            raise LorafitError("peft_config.target_modules is empty: name modules, a regex, or 'all-linear'")
        # Names and patterns are checked here, where the config is read, not when a model is matched.
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        _check_names("layers_pattern", self.layers_pattern, regex=r"(?:^|.*?\.){}\.(\d+)\.")
        if self.modules_to_save is not None and not _is_str_list(self.modules_to_save):
            raise LorafitError(
                f"peft_config.modules_to_save must be a list of module names, got {self.modules_to_save!r}"
            )
        for key, value, what in (
            ("rank_pattern", self.rank_pattern, "a positive integer"),
            ("alpha_pattern", self.alpha_pattern, "a positive number"),
        ):
            if not isinstance(value, dict):
                raise LorafitError(f"peft_config.{key} must map module-name regexes to {what}, got {value!r}")
            for name, item in value.items():
                _check_names(f"{key} key", name, regex=r"(.*\.)?({})$")
                ok = isinstance(item, int) and not isinstance(item, bool) if key == "rank_pattern" else True
                if not (ok and _is_number(item) and item > 0):
                    raise LorafitError(f"peft_config.{key}[{name!r}] must be {what}, got {item!r}")
        layers = self.layers_to_transform
        if layers is not None and not (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        ):
            raise LorafitError(f"peft_config.layers_to_transform must be layer indices, got {layers!r}")
        for key in ("use_rslora", "fan_in_fan_out"):
            if not isinstance(getattr(self, key), bool):
                raise LorafitError(f"peft_config.{key} must be true or false, got {getattr(self, key)!r}")
        for key in ("task_type", "base_model_name_or_path"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise LorafitError(f"peft_config.{key} must be a string, got {getattr(self, key)!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "peft_config") -> LoraConfig:
        """Build from a PEFT-style dict; unknown keys are errors naming the closest valid key.

        PEFT's own ``adapter_config.json`` keys are accepted when the feature they control is
        off (``use_dora: false`` ...); an adapter that needs one of those features is refused.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in names:
                kwargs[key] = value
            elif key in _PEFT_BOOKKEEPING:
                if key == "peft_type" and str(value).upper() != "LORA":
                    raise LorafitError(f"{where}: peft_type is {value!r}; lorafit reads LoRA adapters only")
            elif key in _PEFT_OFF_FEATURES:
                if value not in (None, False, {}, [], "") and value != _FEATURE_DEFAULTS_OK.get(key):
                    raise LorafitError(f"{where}: {key}={value!r} is a PEFT feature lorafit does not support")
            else:
                raise LorafitError(f"{where}: unknown key '{key}'" + did_you_mean(key, names))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def rank_for(self, name: str) -> int:
        key = _pattern_key(self.rank_pattern, name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, name: str) -> float:
        key = _pattern_key(self.alpha_pattern, name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_names(key: str, value: Any, regex: str = "{}") -> None:
    """``value`` is None, a list of module names, or a regular expression (placed in ``regex``,
    the pattern it is used in) that compiles."""
    if value is None or _is_str_list(value):
        return
    if not isinstance(value, str):
        raise LorafitError(f"peft_config.{key} must be a list of module names or a regex, got {value!r}")
    try:
        re.compile(regex.replace("{}", value))
    except re.error as e:
        raise LorafitError(f"peft_config.{key}: {value!r} is not a valid regular expression ({e})") from None


def _pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    # PEFT's rule: the first key that matches the name's tail, on dot boundaries.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


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


def _init_lora(layer: lora.Linear, how: bool | str) -> None:
    with torch.no_grad():
        if how == "gaussian":
            nn.init.normal_(layer.lora_A, std=1.0 / layer.r)
            nn.init.zeros_(layer.lora_B)
        else:
            nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
            if how is False:  # B random too, so the adapter changes outputs (tests)
                nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(layer.lora_B)


def wrap_linear(
    base: nn.Module,
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
    init_lora_weights: bool | str = True,
    lora_dtype: torch.dtype | None = None,
) -> lora.Linear:
    """A :class:`lora.Linear` that shares ``base``'s weight and bias tensors (no copy).

    LoRA parameters are created on the weight's device, in ``lora_dtype`` (default: fp32 for
    a 16-bit base, so the small trainable matrices keep full precision, as PEFT does).
    """
    weight = base.weight
    quantized = getattr(weight, "quant_state", None) is not None or weight.dtype == torch.uint8
    if isinstance(base, nn.Linear):
        in_f, out_f = base.in_features, base.out_features
    elif fan_in_fan_out:
        in_f, out_f = weight.shape
    else:
        out_f, in_f = weight.shape
    with torch.device("meta"):  # build the shell without allocating or initialising a weight
        layer = lora.Linear(
            in_f, out_f, r=0, bias=base.bias is not None, merge_weights=False, fan_in_fan_out=fan_in_fan_out
        )
    if quantized:  # QLoRA: the 4-bit layer stays whole and computes W0 x
        layer.weight = None
        layer.bias = None
        layer.base_layer = base
    else:
        layer.weight = weight
        layer.bias = base.bias
    layer.r = r
    layer.lora_alpha = lora_alpha
    layer.use_rslora = use_rslora
    layer.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
    layer.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
    if lora_dtype is None:
        lora_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    if quantized or not lora_dtype.is_floating_point:  # 4-bit storage is uint8: train LoRA in fp32
        lora_dtype = torch.float32
    layer.lora_A = nn.Parameter(torch.empty((r, in_f), device=weight.device, dtype=lora_dtype))
    layer.lora_B = nn.Parameter(torch.empty((out_f, r), device=weight.device, dtype=lora_dtype))
    if weight.device.type != "meta":
        _init_lora(layer, init_lora_weights)
    weight.requires_grad_(False)
    layer.train(base.training)
    return layer


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
