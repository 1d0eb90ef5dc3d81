"""The run config: the Phi-3 samples' dicts verbatim, overrides, and errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafit.config import build_config, load_config, parse_overrides, read_config_file
from lorafit.errors import LorafitError

# The dicts of the Phi-3 fine-tuning sample script, verbatim.
PHI3_TRAINING_CONFIG = {
    "bf16": True,
    "do_eval": False,
    "learning_rate": 5.0e-06,
    "log_level": "info",
    "logging_steps": 20,
    "logging_strategy": "steps",
    "lr_scheduler_type": "cosine",
    "num_train_epochs": 1,
    "max_steps": -1,
    "output_dir": "./checkpoint_dir",
    "overwrite_output_dir": True,
    "per_device_eval_batch_size": 4,
    "per_device_train_batch_size": 4,
    "remove_unused_columns": True,
    "save_steps": 100,
    "save_total_limit": 1,
    "seed": 0,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.2,
}
PHI3_PEFT_CONFIG = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": "all-linear",
    "modules_to_save": None,
}


def test_phi3_sample_dicts_are_accepted_verbatim(tmp_path) -> None:
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps(
            {
                "model": {"name_or_path": "microsoft/Phi-3-mini-4k-instruct"},
                "training_config": PHI3_TRAINING_CONFIG,
                "peft_config": PHI3_PEFT_CONFIG,
            }
        )
    )
    cfg = load_config(path)
    assert cfg.training_config == PHI3_TRAINING_CONFIG
    assert cfg.lora.r == 16 and cfg.lora.target_modules == "all-linear"


def _cpu(cfg):
    """The precision of a LoRA training run of ``cfg`` on this CPU."""
    from lorafit.models.precision import Precision

    return Precision.decide(cfg.model, cfg.training_config, training=True, on_cpu=True)


def test_training_arguments_from_the_sample(tmp_path) -> None:
    from lorafit.training.arguments import resolve_training_config, training_arguments

    cfg = build_config({"training_config": PHI3_TRAINING_CONFIG, "peft_config": PHI3_PEFT_CONFIG})
    resolved, _ = resolve_training_config(cfg.training_config, _cpu(cfg), has_eval=False, n_params=10)
    args = training_arguments(resolved, tmp_path / "run")
    assert args.learning_rate == 5e-6 and args.warmup_steps == 0.2 and args.lr_scheduler_type == "cosine"
    # the sample's gradient_checkpointing under transformers 5's name (the old one warns)
    assert "gradient_checkpointing" not in resolved and resolved["activation_checkpointing"] is True
    assert args.output_dir == str(tmp_path / "run") and args.activation_checkpointing


def test_yaml_with_overrides(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  torch_dtype: float32\ntraining_config:\n  learning_rate: 5e-6\n")
    cfg = load_config(
        path,
        [
            "--training_config.learning_rate",
            "1e-4",
            "--data.packing=false",
            "--peft_config.target_modules",
            "[qkv_proj, o_proj]",
        ],
    )
    assert cfg.training_config["learning_rate"] == 1e-4
    assert cfg.data.packing is False and cfg.model.torch_dtype == "float32"
    assert cfg.peft_config["target_modules"] == ["qkv_proj", "o_proj"]


def test_yaml_float_without_dot_is_a_number(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("training_config:\n  learning_rate: 5e-6\n")
    assert load_config(path).training_config["learning_rate"] == 5e-6


@pytest.mark.parametrize(
    "raw,message",
    [
        (
            {"training_config": {"learning_rat": 1e-4}},
            "unknown key 'learning_rat'.*did you mean 'learning_rate'",
        ),
        ({"data": {"max_lenght": 10}}, "unknown key 'max_lenght' in section 'data'.*max_length"),
        ({"modle": {}}, "unknown section 'modle'.*did you mean 'model'"),
        ({"peft_config": {"rank": 8}}, "unknown key 'rank'"),
        (
            {"training_config": {"num_train_epochs": "three"}},
            "training_config.num_train_epochs must be float",
        ),
        (
            {"training_config": {"per_device_train_batch_size": 2.5}},
            "per_device_train_batch_size must be int",
        ),
        ({"data": {"packing": "yes"}}, "data.packing must be bool"),
        ({"model": {"torch_dtype": "bf16"}}, "torch_dtype must be one of.*bfloat16"),
        ({"data": {"format": "chatml"}}, "data.format: 'chatml'; expected auto or one of messages"),
    ],
)
def test_bad_keys_and_types_name_section_key_and_nearest(raw, message) -> None:
    with pytest.raises(LorafitError, match=message):
        build_config(raw)


def test_yaml_bare_no_is_the_word_where_only_text_fits(tmp_path) -> None:
    # YAML 1.1 reads `no` as false; TrainingArguments' strategies spell "off" as "no"
    path = tmp_path / "run.yaml"
    path.write_text("training_config:\n  eval_strategy: no\n  save_strategy: no\ndata:\n  packing: no\n")
    cfg = load_config(path, ["--training_config.logging_strategy", "no"])
    assert cfg.training_config == {"eval_strategy": "no", "save_strategy": "no", "logging_strategy": "no"}
    assert cfg.data.packing is False  # a real boolean stays one


def test_bad_yaml_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_path: x\n  torch_dtype: [unclosed\n")
    with pytest.raises(LorafitError, match=r"bad.yaml line \d+"):
        read_config_file(path)


def test_override_errors() -> None:
    with pytest.raises(LorafitError, match="unknown config section 'trainig_config'"):
        parse_overrides(["--trainig_config.seed", "1"])
    with pytest.raises(LorafitError, match="has no value"):
        parse_overrides(["--data.packing"])


def test_resolved_config_round_trips_through_yaml(tmp_path) -> None:
    cfg = build_config({"training_config": PHI3_TRAINING_CONFIG, "peft_config": PHI3_PEFT_CONFIG})
    path = tmp_path / "lorafit_run.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path).to_dict() == cfg.to_dict()


# --------------------------------------------------------------------------------------------
# Fuzzing the loader: any input ends in a RunConfig (with a LoRA config that fits a model and
# TrainingArguments) or a LorafitError, never another exception
# --------------------------------------------------------------------------------------------

_MODEL_KEYS = [
    "name_or_path",
    "torch_dtype",
    "attn_implementation",
    "quantization",
    "trust_remote_code",
    "nme",
]
_DATA_KEYS = [
    "train",
    "format",
    "max_length",
    "packing",
    "overlong",
    "eval_fraction",
    "skip_bad_records",
    "eval_prompts",
]
_PEFT_KEYS = [
    *("r", "lora_alpha", "lora_dropout", "bias", "target_modules", "exclude_modules", "modules_to_save"),
    *("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "init_lora_weights"),
    *("use_rslora", "fan_in_fan_out", "peft_type", "use_dora", "lora_alpah"),
]
_TRAINING_KEYS = [
    *("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size", "save_steps"),
    *("save_total_limit", "eval_strategy", "evaluation_strategy", "eval_steps", "logging_steps"),
    *("warmup_steps", "warmup_ratio", "lr_scheduler_type", "seed", "optim", "weight_decay", "max_grad_norm"),
    *("skip_nonfinite", "overwrite_output_dir", "save_strategy", "report_to", "gradient_accumulation_steps"),
    "learning_rat",
]
_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(
        ["no", "steps", "all-linear", "none", "cosine", "[", "(", ".*proj", "qkv_proj", "LORA", "lm_head"]
    ),
    st.lists(st.sampled_from(["qkv_proj", "o_proj", "lm_head", "[", 3, "layers"]), max_size=3),
    st.dictionaries(
        st.sampled_from(["qkv_proj", "[", "o_proj"]), st.integers(-2, 9) | st.text(max_size=3), max_size=2
    ),
)


def _section(keys: list[str]):
    return st.dictionaries(st.sampled_from(keys), _value, max_size=2) | _value


_raw_config = st.fixed_dictionaries(
    {},
    optional={
        "model": _section(_MODEL_KEYS),
        "data": _section(_DATA_KEYS),
        "tokenizer": _section(["pad_token", "padding_side", "model_max_length"]),
        "peft_config": _section(_PEFT_KEYS),
        "training_config": _section(_TRAINING_KEYS),
        "modle": _value,
    },
)


def _loads_or_refuses(raw_or_path, overrides=None) -> None:
    from lorafit.adapters import find_targets
    from lorafit.training.arguments import resolve_training_config, training_arguments

    from tiny import tiny_phi3

    global _TINY
    _TINY = _TINY or tiny_phi3()
    try:
        if isinstance(raw_or_path, dict):
            cfg = build_config(raw_or_path)
        else:
            cfg = load_config(raw_or_path, overrides)
        assert find_targets(_TINY, cfg.lora, warn=False)
        resolved, _ = resolve_training_config(cfg.training_config, _cpu(cfg), has_eval=True, n_params=10)
        training_arguments(resolved, Path("/nonexistent/run"))
    except LorafitError as e:
        assert str(e).strip()


_TINY = None


@settings(max_examples=200, deadline=None)
@given(raw=_raw_config)
def test_fuzz_config_dicts_end_in_a_config_or_a_lorafit_error(raw) -> None:
    _loads_or_refuses(raw)


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(max_size=80) | _raw_config.map(json.dumps),
    suffix=st.sampled_from([".yaml", ".json"]),
    overrides=st.lists(
        st.sampled_from(["--data.max_length", "--peft_config.r", "--x", "1e-4", "no", "[", "=3"])
    ),
)
def test_fuzz_config_files_and_overrides_end_in_a_config_or_a_lorafit_error(text, suffix, overrides) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"run{suffix}"
        path.write_text(text, encoding="utf-8")
        _loads_or_refuses(path, overrides)


# -- a *_steps key the user gives acts ---------------------------------------------------------

STEP_PAIRS = [
    ("save_steps", "save_strategy"),
    ("eval_steps", "eval_strategy"),
    ("logging_steps", "logging_strategy"),
]
# Where a run's keys come from: lorafit's recipe for a pretrained model (no file), the demo's
# recipe (no file, the demo model), or the user's own file (every key the user's).
SOURCES = ["recipe", "demo", "file"]


def _load(source: str, tmp_path: Path, training: dict, overrides: list[str] = ()) -> object:
    if source == "file":
        path = tmp_path / "run.yaml"
        path.write_text(json.dumps({"training_config": training}))
        return load_config(path, list(overrides))
    model = "some/pretrained-model" if source == "recipe" else "lorafit-demo"
    args = [f"--training_config.{key}={json.dumps(value)}" for key, value in training.items()]
    return load_config(None, ["--model.name_or_path", model, *args, *overrides])


def _arguments(cfg, tmp_path: Path):
    from lorafit.training.arguments import resolve_training_config, training_arguments

    resolved, _ = resolve_training_config(cfg.training_config, _cpu(cfg), has_eval=True, n_params=10)
    return training_arguments(resolved, tmp_path / "run")


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("steps_key", "strategy_key"), STEP_PAIRS)
def test_a_steps_key_alone_makes_its_strategy_steps(source, steps_key, strategy_key, tmp_path) -> None:
    """`--training_config.save_steps 10` saves every 10 steps, whatever strategy the recipe has."""
    cfg = _load(source, tmp_path, {steps_key: 7})
    assert cfg.training_config.get(strategy_key, "steps") == "steps"  # unset: lorafit's default, steps
    args = _arguments(cfg, tmp_path)
    assert getattr(args, strategy_key) == "steps" and getattr(args, steps_key) == 7
    assert not [n for n in cfg.notes if "no effect" in n]


def test_the_recipes_save_strategy_gives_way_with_a_note(tmp_path) -> None:
    """lorafit's recipe saves once per epoch; a user's save_steps wins, and the change is said."""
    assert load_config(None, ["--model.name_or_path", "m/x"]).training_config["save_strategy"] == "epoch"
    cfg = _load("recipe", tmp_path, {"save_steps": 10})
    assert cfg.notes == ("save_strategy: epoch -> steps (the recipe's; save_steps: 10 given)",)
    assert "training_config.save_steps" in cfg.user_keys
    assert "training_config.save_strategy" not in cfg.user_keys  # the recipe's, changed


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("steps_key", "strategy_key"), STEP_PAIRS)
def test_a_steps_key_against_its_own_strategy_is_said_in_one_line(source, steps_key, strategy_key, tmp_path):
    cfg = _load(source, tmp_path, {steps_key: 10, strategy_key: "epoch"})
    assert cfg.training_config[strategy_key] == "epoch"  # both the user's: neither is changed
    contradictions = [n for n in cfg.notes if "no effect" in n]
    assert contradictions == [
        f"training_config.{steps_key}: 10 has no effect: {strategy_key} is epoch (both given); "
        f"set {strategy_key}: steps to act every 10 steps"
    ]
    assert "\n" not in contradictions[0]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("steps_key", "strategy_key"), STEP_PAIRS)
def test_a_strategy_alone_is_not_overruled(source, steps_key, strategy_key, tmp_path) -> None:
    """The recipe's own steps value never turns a strategy the user chose back into steps."""
    cfg = _load(source, tmp_path, {strategy_key: "epoch"})
    assert cfg.training_config[strategy_key] == "epoch" and cfg.notes == ()
    assert getattr(_arguments(cfg, tmp_path), strategy_key) == "epoch"


def test_an_old_strategy_name_counts_as_the_users(tmp_path) -> None:
    """`evaluation_strategy` (transformers 4's name) given with eval_steps: the pair is the user's."""
    cfg = _load("file", tmp_path, {"evaluation_strategy": "no", "eval_steps": 5})
    assert cfg.training_config["eval_strategy"] == "no"
    assert [n for n in cfg.notes if "eval_steps: 5 has no effect: eval_strategy is no" in n]


def test_the_recipes_and_demos_keys_have_no_contradiction() -> None:
    """Every *_steps key with a companion in lorafit's recipes acts as written."""
    for model in ("some/pretrained-model", "lorafit-demo"):
        cfg = load_config(None, ["--model.name_or_path", model])
        assert cfg.notes == ()
        for steps_key, strategy_key in STEP_PAIRS:
            if steps_key in cfg.training_config:
                assert cfg.training_config.get(strategy_key, "steps") == "steps", (model, steps_key)
