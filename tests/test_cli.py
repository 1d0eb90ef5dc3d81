"""The real CLI end to end on the demo model: train a few steps, chat, eval, merge; bad input."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lorafit.cli import main

# A few steps on the demo model and a slice of the demo data keep this fast.
FAST = [
    "--training_config.max_steps",
    "4",
    "--training_config.per_device_train_batch_size",
    "2",
    "--training_config.logging_steps",
    "1",
    "--training_config.eval_steps",
    "2",
    "--training_config.save_steps",
    "2",
    "--training_config.report_to",
    "none",
    "--data.max_length",
    "256",
    "--data.eval_prompts",
    "1",
    "--model.torch_dtype",
    "float32",
    "--training_config.per_device_eval_batch_size",
    "64",  # the eval set in one batch: Trainer's eval loss is then token-weighted, as lorafit eval's
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One short demo run (in process), shared by the tests that read it."""
    work = tmp_path_factory.mktemp("cli")
    old, old_cache = os.getcwd(), os.environ.get("LORAFIT_CACHE")
    os.chdir(work)
    os.environ["LORAFIT_CACHE"] = str(work / "cache")
    try:
        assert main(["train", *FAST, "--training_config.output_dir", "run"]) == 0
    finally:  # later tests see the process as it was
        os.chdir(old)
        if old_cache is None:
            del os.environ["LORAFIT_CACHE"]
        else:
            os.environ["LORAFIT_CACHE"] = old_cache
    return work / "run"


def test_train_writes_the_run_files(trained) -> None:
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorafit_run.yaml",
        "metrics.jsonl",
        "loss.png",
        "samples.md",
        "tokenizer.json",
    ):
        assert (trained / name).is_file(), name
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r and "eval_perplexity" in r for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    ckpt = trained / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    assert not list(ckpt.glob("model*.safetensors"))  # never the base model
    resolved = yaml.safe_load((trained / "lorafit_run.yaml").read_text())
    assert (
        resolved["training_config"]["max_steps"] == 4 and resolved["model"]["name_or_path"] == "lorafit-demo"
    )


def test_chat_with_prompt(trained, capsys) -> None:
    assert (
        main(["chat", "--adapter", str(trained), "--prompt", "What is 2 plus 2?", "--max-new-tokens", "8"])
        == 0
    )
    assert capsys.readouterr().out.strip()


def test_chat_interactive_keeps_history(trained, monkeypatch, capsys) -> None:
    import lorafit.inference

    seen: list[list[dict]] = []
    real = lorafit.inference.generate

    def recording(model, tokenizer, messages, **kwargs):
        seen.append([dict(m) for m in messages])
        return real(model, tokenizer, messages, **kwargs)

    monkeypatch.setattr(lorafit.inference, "generate", recording)
    lines = iter(["Hello there.", "And 3 plus 4?", "/reset", "Again?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--adapter", str(trained), "--max-new-tokens", "4"]) == 0
    assert "history cleared" in capsys.readouterr().out
    first, second, after_reset = seen
    assert first == [{"role": "user", "content": "Hello there."}]
    # the second turn sees the first question and the answer given to it
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0] == first[0] and second[2] == {"role": "user", "content": "And 3 plus 4?"}
    assert after_reset == [{"role": "user", "content": "Again?"}]


def test_eval_loss_equals_the_runs_last_eval_loss(trained, capsys) -> None:
    from lorafit.demo import eval_file

    assert main(["eval", "--adapter", str(trained), "--data", str(eval_file())]) == 0
    out = capsys.readouterr().out
    loss, perplexity = (float(x) for x in re.search(r"loss (\S+)  perplexity (\S+)", out).groups())
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "eval_loss" in r][-1]
    assert last["step"] == 4  # evaluated with the final adapter, on the same eval file
    assert loss == pytest.approx(last["eval_loss"], rel=1e-4)
    assert perplexity == pytest.approx(math.exp(loss), rel=1e-3)


def test_merge_gives_a_plain_transformers_model(trained, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from lorafit.models import load_trained

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained), "--out", str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    _, _, with_adapter = load_trained(str(trained))
    ids = torch.randint(20, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - with_adapter(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4
    assert main(["merge", "--adapter", str(trained), "--out", str(out)]) == 2  # never over a folder


def test_resume_continues_from_the_last_checkpoint(trained, tmp_path, monkeypatch) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoint-4")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(run)]) == 0
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_existing_output_dir_is_never_overwritten(trained, capsys, monkeypatch) -> None:
    monkeypatch.chdir(trained.parent)
    before = (trained / "adapter_model.safetensors").read_bytes()
    assert main(["train", *FAST, "--training_config.output_dir", "run"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (trained / "adapter_model.safetensors").read_bytes() == before


def test_bad_data_is_one_paragraph_naming_file_and_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + '{"messages": [oops\n')
    assert main(["train", "--data.train", str(data), *FAST]) == 2
    err = capsys.readouterr().err
    assert "chat.jsonl line 2" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing written for a run that never started


def test_unknown_override_key_suggests_the_nearest(capsys) -> None:
    assert main(["train", "--training_config.learning_rat", "1e-4"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_train_flags_become_settings_the_words_can_or_cannot_change() -> None:
    from lorafit.cli import _parser, _split_overrides
    from lorafit.commands import train_overrides
    from lorafit.config import load_config

    def settings(*argv: str) -> dict:  # as cli.main reads them
        argv, words = _split_overrides(["train", *argv])
        args, rest = _parser().parse_known_args(argv)
        return train_overrides(args, [*rest, *words])

    flags = ["--qlora", "--fsdp", "--skip-bad-records", "--skip-nonfinite", "--adapter", "runs/a"]
    got = settings(*flags)
    assert (
        got["model"]["quantization"]["bnb_4bit_quant_type"] == "nf4" and got["model"]["adapter"] == "runs/a"
    )
    assert got["training_config"]["fsdp"] is True and got["training_config"]["fsdp_config"]["version"] == 2
    assert got["data"] == {"skip_bad_records": True} and got["training_config"]["skip_nonfinite"] is True
    # --qlora and --fsdp are presets a word changes; the switches win over words
    words = ["--model.quantization", "{load_in_4bit: true}", "--training_config.fsdp=false"]
    words += ["--data.skip_bad_records", "false", "--model.adapter", "runs/b", "--data.max_length", "64"]
    got = settings(*flags, *words)
    assert got["model"]["quantization"] == {"load_in_4bit": True} and got["training_config"]["fsdp"] is False
    assert got["data"] == {"skip_bad_records": True, "max_length": 64} and got["model"]["adapter"] == "runs/a"
    got["training_config"]["fsdp_config"]["version"] = 1  # the presets are copies
    assert settings("--fsdp")["training_config"]["fsdp_config"]["version"] == 2
    cfg = load_config(None, settings("--skip-nonfinite", "--data.max_length", "64"))
    assert cfg.training_config["skip_nonfinite"] is True and cfg.data.max_length == 64
    assert {"training_config.skip_nonfinite", "data.max_length"} <= cfg.user_keys


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["train", "--model.name_or_path", str(tmp_path / "nope"), "--data.train", "x.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "chat", "eval", "merge", "export", "bench"])
def test_every_command_has_help_with_an_example(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"lorafit {command}" in out


def test_the_installed_command_runs_end_to_end(tmp_path) -> None:
    env = {**os.environ, "LORAFIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", *FAST, "--training_config.max_steps", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lorafit chat --adapter runs/" in proc.stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "adapter_model.safetensors").is_file()


def test_phi3_sample_dicts_train_the_demo_model(tmp_path, monkeypatch) -> None:
    """The Phi-3 sample's training_config and peft_config verbatim (bf16 autocast on CPU,
    gradient checkpointing, warmup_ratio, overwrite_output_dir), a few steps on the demo model."""
    from test_config import PHI3_PEFT_CONFIG, PHI3_TRAINING_CONFIG

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "run.json").write_text(
        json.dumps(
            {
                "model": {"name_or_path": "lorafit-demo"},
                "data": {"max_length": 256, "eval_prompts": 0},
                "training_config": PHI3_TRAINING_CONFIG,
                "peft_config": PHI3_PEFT_CONFIG,
            }
        )
    )
    assert (
        main(["train", "run.json", "--training_config.max_steps", "2", "--training_config.report_to", "none"])
        == 0
    )
    assert (tmp_path / "checkpoint_dir" / "adapter_model.safetensors").is_file()


def test_eval_generate_scores_each_answer(trained, tmp_path, capsys) -> None:
    from lorafit.demo import eval_file

    out = tmp_path / "answers.jsonl"
    args = ["eval", "--adapter", str(trained), "--data", str(eval_file()), "--generate", "--limit", "3"]
    assert main([*args, "--out", str(out), "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and all({"prompt", "answer", "reference", "rouge_l"} <= set(r) for r in rows)
    mean = sum(r["rouge_l"] for r in rows) / 3
    assert "generated 3 answers: exact_match " in printed and f"rouge_l {mean:.3f}" in printed
    assert re.search(r"^3 answers, \d+ tokens in \d+\.\d s \([\d,]+ tokens/s\)$", printed, re.M)  # the speed


def test_samples_md_scores_the_answers_before_and_after(trained) -> None:
    text = (trained / "samples.md").read_text(encoding="utf-8")
    assert "| | exact_match | contains | rouge_l |" in text
    assert re.search(r"\| before \| \d\.\d{3} \| \d\.\d{3} \| \d\.\d{3} \|", text)
    assert re.search(r"\| after \| \d\.\d{3} \| \d\.\d{3} \| \d\.\d{3} \|", text)
    assert "**reference:**" in text and "**before:**" in text and "**after:**" in text


def test_export_writes_gguf_and_modelfile_that_transformers_reads(trained, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from lorafit.export import merge_into_base
    from lorafit.models import load_trained

    out = tmp_path / "ollama" / "model.gguf"
    assert main(["export", "--adapter", str(trained), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"ollama create NAME -f {out.parent / 'Modelfile'}" in printed
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf") and 'PARAMETER stop "<|end|>"' in modelfile
    _, _, merged = load_trained(trained)
    merge_into_base(merged, quantized=False)
    read_back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 42, 7, 99, 300]])
    with torch.no_grad():
        want, got = merged(input_ids=ids).logits, read_back(input_ids=ids).logits
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()  # f16 rounding of the weights
    # and the file is a base lorafit trains on again: export -> train --model.name_or_path FILE
    from lorafit.demo import train_file

    again = tmp_path / "again"
    train_again = ["train", *FAST, "--training_config.max_steps", "2", "--data.eval_prompts", "0"]
    train_again += ["--model.name_or_path", str(out), "--data.train", str(train_file())]
    assert main([*train_again, "--training_config.output_dir", str(again)]) == 0
    assert json.loads((again / "adapter_config.json").read_text())["base_model_name_or_path"] == str(out)
    # nothing is written over: the file, then the Modelfile beside a new file name
    assert main(["export", "--adapter", str(trained), "--out", str(out)]) == 2
    assert main(["export", "--adapter", str(trained), "--out", str(out.with_name("other.gguf"))]) == 2
    assert "Modelfile already exists" in capsys.readouterr().err


def test_export_lora_only_writes_a_gguf_lora_file(trained, tmp_path) -> None:
    import gguf

    out = tmp_path / "adapter.gguf"
    assert main(["export", "--adapter", str(trained), "--out", str(out), "--lora-only"]) == 0
    reader = gguf.GGUFReader(out)
    fields = {name: field for name, field in reader.fields.items()}
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    names = [t.name for t in reader.tensors]
    assert any(n.endswith(".lora_a") for n in names) and any(n.endswith(".lora_b") for n in names)
    assert (
        main(
            [
                "export",
                "--adapter",
                str(trained),
                "--out",
                str(tmp_path / "x.gguf"),
                "--lora-only",
                "--dtype",
                "q8_0",
            ]
        )
        == 2
    )


# Starts `lorafit train` as a shell's background job does (`lorafit train ... &` in a script, or a
# page server started that way): with SIGINT ignored, which the process inherits.
AS_BACKGROUND_JOB = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, '-m', 'lorafit', 'train', *sys.argv[1:]])"
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_run_is_starting_stops_it(signum, tmp_path) -> None:
    """Ctrl-C or SIGTERM while the run reads its data stops it at once, with a line and no
    traceback, also when it was started with SIGINT ignored. The training data is a named pipe:
    the run waits in start-up, reading it, until the test writes, so the signal certainly
    arrives then, however fast or slow the machine."""
    data = tmp_path / "train.jsonl"
    os.mkfifo(data)
    run = tmp_path / "run"
    env = {**os.environ, "LORAFIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["--data.train", str(data), "--data.eval_prompts", "0", "--training_config.output_dir", str(run)]
    proc = subprocess.Popen(
        [sys.executable, "-c", AS_BACKGROUND_JOB, *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer = None
    try:
        deadline = time.monotonic() + 300
        while writer is None:  # opening the pipe's write end succeeds once the run opened it to read
            try:
                writer = os.open(data, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                assert proc.poll() is None, f"the run ended before reading its data: {proc.communicate()}"
                assert time.monotonic() < deadline, "the run never opened its data"
                time.sleep(0.05)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err[-2000:]
    assert err.strip().endswith(f"lorafit train: stopped by {signal.Signals(signum).name}")
    assert "Traceback" not in err
    assert "training in" not in out and not (run / "adapter_model.safetensors").exists()
