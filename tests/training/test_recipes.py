"""A pretrained model with no config file gets lorafit's recipe, not the demo's; settings are
said once and recorded; the Phi-3 cookbook's own TrainingArguments run on a CPU.

The model folder is a tiny Llama saved with a Llama-3-style tokenizer that has no unk and no
pad token (the case that broke Phi-3's defaults), trained through the real CLI.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from lorafit.cli import main

from chat_data import chat_rows, write_jsonl
from tiny import SIZES


@pytest.fixture
def model_folder(tmp_path, make_tokenizer):
    tokenizer = make_tokenizer("llama3")
    tokenizer.pad_token = None
    assert tokenizer.unk_token is None and tokenizer.pad_token is None
    torch.manual_seed(0)
    config = LlamaConfig(
        # a model folder as a user has it: no pad token anywhere
        **{**SIZES, "vocab_size": len(tokenizer), "max_position_embeddings": 512, "pad_token_id": None},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path / "my-model"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(tmp_path, *args: str) -> dict:
    assert main(["train", *args, "--data.max_length", "256", "--data.eval_prompts", "1"]) == 0
    return yaml.safe_load((tmp_path / "run" / "lorafit_run.yaml").read_text())


def test_a_pretrained_model_without_a_config_gets_the_recipe(model_folder, tmp_path, lorafit_cache, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    resolved = run(
        tmp_path,
        "--model.name_or_path", str(model_folder),
        "--data.train", data,
        "--training_config.max_steps", "2",
        "--training_config.output_dir", str(tmp_path / "run"),
        "--model.torch_dtype", "float32",
    )  # fmt: skip
    out = capsys.readouterr().out
    tc = resolved["training_config"]
    # the recipe (recipes/pretrained.yaml), not the demo's (lr 5e-3, 24 epochs, eval every 30 steps)
    assert tc["learning_rate"] == 2e-4 and tc["num_train_epochs"] == 3 and tc["lr_scheduler_type"] == "cosine"
    assert resolved["peft_config"]["r"] == 16 and resolved["peft_config"]["lora_alpha"] == 32
    # no eval data: no evaluation, and no error; a small model: no activation checkpointing
    assert tc.get("eval_strategy", "no") == "no" and tc["activation_checkpointing"] is False
    assert "learning_rate=0.0002" in out and out.count("training: ") == 1  # said once
    assert resolved["tokenizer"]["pad_token"] == "auto"
    saved = json.loads((tmp_path / "run" / "tokenizer_config.json").read_text())
    assert saved["pad_token"] == "<|eot_id|>"  # no pad, no unk: the eos token
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_with_eval_data_the_recipe_evaluates(model_folder, tmp_path, lorafit_cache):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    resolved = run(
        tmp_path,
        "--model.name_or_path", str(model_folder),
        "--data.train", data,
        "--data.eval_fraction", "0.25",
        "--training_config.max_steps", "2",
        "--training_config.output_dir", str(tmp_path / "run"),
        "--model.torch_dtype", "float32",
    )  # fmt: skip
    assert resolved["training_config"]["eval_strategy"] == "steps"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in row for row in rows)


def test_the_phi3_cookbooks_training_arguments_run_on_cpu(tmp_path, lorafit_cache, capsys):
    """code/03.Finetuning/FineTrainingScript.py's TrainingArguments, on the demo, on a CPU: what
    the CPU cannot run is replaced with a note each, and lorafit's own key mapping warns nothing."""
    cookbook = {
        "evaluation_strategy": "steps",
        "per_device_train_batch_size": 7,
        "gradient_accumulation_steps": 4,
        "gradient_checkpointing": True,
        "learning_rate": 1e-4,
        "fp16": True,
        "max_steps": 1,  # the script's -1 and 3 epochs, shortened for a test
        "save_strategy": "epoch",
        "logging_steps": 10,
        "optim": "paged_adamw_32bit",
        "lr_scheduler_type": "linear",
        "output_dir": str(tmp_path / "run"),
    }
    config = tmp_path / "cookbook.yaml"
    config.write_text(
        yaml.safe_dump({"training_config": cookbook, "data": {"eval_prompts": 0, "max_length": 128}})
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", str(config), "--training_config.dataloader_num_workers", "0"]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "note: optim: paged_adamw_32bit -> adamw_torch" in out
        assert "note: fp16: true -> " in out
    assert "note: eval_strategy: steps -> no (there is no eval data" not in out  # the demo has eval data
    checkpointing = [
        w for w in caught if "checkpointing" in str(w.message) and issubclass(w.category, FutureWarning)
    ]
    assert not checkpointing, [str(w.message) for w in checkpointing]
    resolved = yaml.safe_load((tmp_path / "run" / "lorafit_run.yaml").read_text())["training_config"]
    assert resolved["activation_checkpointing"] is True and "gradient_checkpointing" not in resolved
    assert resolved["eval_strategy"] == "steps"  # evaluation_strategy, under its transformers 5 name


def plan_line(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("plan: ")]
    return line


def steps_run(tmp_path) -> list[int]:
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


def test_small_data_gets_small_steps_and_a_steps_key_acts(model_folder, tmp_path, lorafit_cache, capsys):
    """24 short chats through the recipe: one packed row would hold them all (3 steps in 3
    epochs); the run takes one example a step instead, says so, and takes as many steps as it
    said. save_steps given alone saves every 30 steps, not once an epoch as the recipe says."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    resolved = run(
        tmp_path,
        "--model.name_or_path", str(model_folder),
        "--data.train", data,
        "--training_config.output_dir", str(tmp_path / "run"),
        "--training_config.save_steps", "30",
        "--training_config.logging_steps", "1",
        "--model.torch_dtype", "float32",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert plan_line(out).startswith(
        "plan: 72 optimizer steps = 3 epochs x 24 steps of 1 example (steps of 4"
    )
    assert plan_line(out).endswith(
        "fewer than min_optimizer_steps 100; 72 is the most, at one example a step)"
    )
    assert steps_run(tmp_path) == list(range(1, 73))
    tc = resolved["training_config"]
    assert tc["per_device_train_batch_size"] == 1 and tc["gradient_accumulation_steps"] == 1
    assert resolved["data"]["packing"] is False  # recorded: a resumed run takes the same steps
    assert "note: save_strategy: epoch -> steps (the recipe's; save_steps: 30 given)" in out
    assert tc["save_strategy"] == "steps"
    # every 30 steps and at the end (save_total_limit 2); once an epoch would have been 48 and 72
    checkpoints = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-60", "checkpoint-72"]


def test_large_data_keeps_the_recipes_steps(model_folder, tmp_path, lorafit_cache, capsys):
    """Enough packed rows for 100 steps of 4: the step stays the recipe's 4 packed rows."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(400))
    resolved = run(
        tmp_path,
        "--model.name_or_path", str(model_folder),
        "--data.train", data,
        "--training_config.output_dir", str(tmp_path / "run"),
        "--training_config.save_strategy", "no",
        "--training_config.logging_steps", "1",
        "--model.torch_dtype", "float32",
    )  # fmt: skip
    out = capsys.readouterr().out
    line = plan_line(out)
    assert line.endswith("steps of 4 packed rows of up to 256 tokens"), line
    steps = int(line.split()[1].replace(",", ""))
    assert steps >= 100 and steps_run(tmp_path) == list(range(1, steps + 1))
    tc = resolved["training_config"]
    assert (tc["per_device_train_batch_size"], tc["gradient_accumulation_steps"]) == (1, 4)
    assert resolved["data"]["packing"] is True
