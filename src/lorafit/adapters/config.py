"""``LoraConfig``: PEFT's LoraConfig keys, validated where the config is read.

The Phi-3 samples' ``peft_config`` dict, and PEFT's own ``adapter_config.json``, are accepted
as they are; unknown keys are errors naming the closest valid key, and a PEFT feature lorafit
does not implement is refused when it is turned on.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorafit.constants import BIAS_MODES
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
        use_dora: DoRA (a trainable magnitude per output row; :mod:`lorafit.lora.variants`).
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
    use_dora: bool = False
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
        if self.bias not in BIAS_MODES:
            raise LorafitError(
                f"peft_config.bias must be one of {', '.join(BIAS_MODES)}; got {self.bias!r}"
                + did_you_mean(str(self.bias), BIAS_MODES)
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
        for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
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
