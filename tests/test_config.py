"""The run config: the Phi-3 samples' dicts verbatim, overrides, and errors that name the key."""

from __future__ import annotations

import json

import pytest

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


def test_training_arguments_from_the_sample(tmp_path) -> None:
    from lorafit.train import training_arguments

    cfg = build_config({"training_config": PHI3_TRAINING_CONFIG, "peft_config": PHI3_PEFT_CONFIG})
    args = training_arguments(cfg, tmp_path / "run", has_eval=False)
    assert args.learning_rate == 5e-6 and args.warmup_steps == 0.2 and args.lr_scheduler_type == "cosine"
    assert args.output_dir == str(tmp_path / "run") and args.gradient_checkpointing


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


def test_yaml_no_is_the_word_where_a_string_is_expected(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("training_config:\n  eval_strategy: no\n  bf16: no\n")
    cfg = load_config(path, ["--training_config.save_strategy", "no"])
    assert cfg.training_config == {"eval_strategy": "no", "bf16": False, "save_strategy": "no"}


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
        ({"data": {"format": "chatml"}}, "data.format must be one of"),
    ],
)
def test_bad_keys_and_types_name_section_key_and_nearest(raw, message) -> None:
    with pytest.raises(LorafitError, match=message):
        build_config(raw)


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
