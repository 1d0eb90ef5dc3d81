"""train.py's reliability, on real training processes: exact resume after SIGKILL, SIGTERM and
SIGINT stops, a disk that fills up mid-run, leftovers of a killed save, non-finite steps, checks
before training, bad records at scale, and files from elsewhere that would run code.

Every run is the demo model on a slice of the demo data (12 records -> a few packed rows, so 8
steps cross epoch boundaries). One uninterrupted run, in process, is the reference; interrupted
runs are real ``python -m lorafit train`` processes, and their resumed adapters must equal the
reference's bit for bit (CPU, one thread in both).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.cli import main
from lorafit.demo import eval_file, train_file

from processes import (
    POISON,
    assert_stopped_before_a_non_finite_update,
    kill_when_paused,
    poisoned_demo_model,
    start,
    wait_paused,
)

ADAPTER = "adapter_model.safetensors"
STEPS = 8


def run_args(run: Path, data: Path) -> list[str]:
    return [
        "--data.train",
        str(data / "train.jsonl"),
        "--data.eval",
        str(data / "eval.jsonl"),
        "--data.max_length",
        "128",
        "--data.eval_prompts",
        "0",
        "--model.torch_dtype",
        "float32",
        "--training_config.max_steps",
        str(STEPS),
        "--training_config.save_steps",
        "2",
        "--training_config.eval_steps",
        "4",
        "--training_config.logging_steps",
        "1",
        "--training_config.per_device_train_batch_size",
        "2",
        "--training_config.save_total_limit",
        "2",
        "--training_config.report_to",
        "none",
        "--training_config.output_dir",
        str(run),
    ]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with the data slice (data/) and a tokenisation cache shared by every run here."""
    work = tmp_path_factory.mktemp("reliability")
    (work / "data").mkdir()
    lines = train_file().read_text(encoding="utf-8").splitlines()
    (work / "data" / "train.jsonl").write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    lines = eval_file().read_text(encoding="utf-8").splitlines()
    (work / "data" / "eval.jsonl").write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")
    return work


@pytest.fixture(autouse=True)
def _cache(work, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(work / "cache"))


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """The uninterrupted run, in this process."""
    os.environ["LORAFIT_CACHE"] = str(work / "cache")
    run = work / "reference"
    assert main(["train", *run_args(run, work / "data")]) == 0
    return run


def losses(run: Path) -> list[tuple]:
    """The loss curve: (step, loss, grad_norm, learning_rate, tokens seen, eval_loss) per metrics row."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "grad_norm", "learning_rate", "tokens_seen", "eval_loss")
    return [tuple(r.get(k) for k in keys) for r in rows if "loss" in r or "eval_loss" in r]


def assert_same_as_reference(run: Path, reference: Path) -> None:
    assert (run / ADAPTER).read_bytes() == (reference / ADAPTER).read_bytes()
    last = f"checkpoint-{STEPS}"
    for name in ("optimizer.pt", "scheduler.pt", ADAPTER):
        assert (run / last / name).read_bytes() == (reference / last / name).read_bytes(), name
    assert losses(run) == losses(reference)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no partial checkpoint left


def test_uninterrupted_runs_are_bit_identical(reference, work) -> None:
    # Resuming can only be exact if a run is reproducible at all: LoRA's init comes from the seed.
    run = work / "again"
    assert main(["train", *run_args(run, work / "data")]) == 0
    assert (run / ADAPTER).read_bytes() == (reference / ADAPTER).read_bytes()
    assert losses(run) == losses(reference)


def test_packed_rows_train_through_per_example_attention_as_sdpa_would(work, monkeypatch) -> None:
    import lorafit.models.attention as attention
    import lorafit.training.run as lf_run

    calls = []
    real = attention._ExampleAttention.apply
    monkeypatch.setattr(attention._ExampleAttention, "apply", lambda *a: calls.append(1) or real(*a))
    assert main(["train", *run_args(work / "per-example", work / "data")]) == 0
    assert calls  # train switched the model to lorafit.attention for its packed rows
    monkeypatch.setattr(lf_run, "use_packed_attention", lambda model: False)
    assert main(["train", *run_args(work / "sdpa", work / "data")]) == 0
    ours, sdpa = losses(work / "per-example"), losses(work / "sdpa")
    assert [r[0] for r in ours] == [r[0] for r in sdpa]
    for a, b in zip(ours, sdpa, strict=True):  # fp32: the same sums in another order
        assert a[1:3] == pytest.approx(b[1:3], rel=1e-5) and a[5] == pytest.approx(b[5], rel=1e-5)


def test_some_layers_checkpointed_train_as_none(reference, work, capsys) -> None:
    """checkpoint_layers recomputes those layers in backward (same RNG: same dropout masks), so the
    run is the reference run bit for bit; with gradient_checkpointing as well it is refused."""
    run = work / "checkpoint-some"
    assert main(["train", *run_args(run, work / "data"), "--training_config.checkpoint_layers", "1"]) == 0
    assert losses(run) == losses(reference)
    assert (run / ADAPTER).read_bytes() == (reference / ADAPTER).read_bytes()
    both = ["--training_config.checkpoint_layers", "0.5", "--training_config.gradient_checkpointing", "true"]
    assert main(["train", *run_args(work / "both", work / "data"), *both]) == 2
    assert "checkpoint_layers recomputes some decoder layers" in capsys.readouterr().err


def test_checkpoint_layers_are_spread_evenly() -> None:
    from lorafit.errors import LorafitError
    from lorafit.training.run import checkpoint_some_layers

    from tiny import tiny_phi3

    model = tiny_phi3(layers=8).train()
    assert checkpoint_some_layers(model, 0.25) == [2, 6]
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [i in (2, 6) for i in range(8)]
    assert checkpoint_some_layers(model, 3) == [1, 4, 6]
    with pytest.raises(LorafitError, match="9 is more than the model's 8 layers"):
        checkpoint_some_layers(model, 9)


def test_sigkill_mid_run_then_resume_is_bit_identical(reference, work) -> None:
    run = work / "killed"
    kill_when_paused(run_args(run, work / "data"), work, run, pause_at=4, last_step=STEPS)

    assert main(["train", "--resume", str(run)]) == 0
    assert_same_as_reference(run, reference)


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(reference, work) -> None:
    run = work / "terminated"
    proc = start(run_args(run, work / "data"), work, "terminated", pause_at=2)
    wait_paused(proc)
    proc.send_signal(signal.SIGTERM)  # held while the run is paused, delivered as it goes on
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    err = (work / "terminated.err").read_text()
    assert "stopped by SIGTERM after step" in err and f"lorafit train --resume {run}" in err
    step = int(err.split("stopped by SIGTERM after step ")[1].split()[0])
    assert step == 3 and (run / f"checkpoint-{step}" / "trainer_state.json").is_file()  # the step it was in
    assert not (run / ADAPTER).exists()  # a stopped run does not pose as a finished one

    assert main(["train", "--resume", str(run)]) == 0
    assert_same_as_reference(run, reference)


def test_sigint_stops_with_a_checkpoint_and_says_how_to_resume(work) -> None:
    run = work / "interrupted"
    proc = start(run_args(run, work / "data"), work, "interrupted", pause_at=2)
    wait_paused(proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=300) == 130
    err = (work / "interrupted.err").read_text()
    assert "SIGINT: stopping after this step" in (work / "interrupted.out").read_text()
    assert "Traceback" not in err
    step = int(err.split("stopped by SIGINT after step ")[1].split()[0])
    assert (run / f"checkpoint-{step}" / ADAPTER).is_file()
    assert f"The last good checkpoint is {run / f'checkpoint-{step}'}" in err


# The disk "fills up" after the first checkpoint: RLIMIT_FSIZE makes every later write past 200 kB
# fail with EFBIG, as a full disk fails with ENOSPC (Python ignores SIGXFSZ, so the write errors).
FILL_DISK = """
import resource, sys
from transformers import TrainerCallback
from lorafit.config import load_config
from lorafit.errors import LorafitError
from lorafit.training import train

class FillDiskAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

try:
    train(load_config(None, sys.argv[1:]), callbacks=[FillDiskAfterFirstSave()])
except LorafitError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def test_disk_full_during_a_save_keeps_the_last_checkpoint_usable(reference, work) -> None:
    run = work / "disk-full"
    env = {**os.environ, "LORAFIT_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", FILL_DISK, *run_args(run, work / "data")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "saving checkpoint-4" in err and "File too large" in err and "Traceback" not in err
    assert f"The last good checkpoint is {run / 'checkpoint-2'}" in err
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]

    assert main(["train", "--resume", str(run)]) == 0  # the disk has room again
    assert_same_as_reference(run, reference)


def test_resume_skips_what_a_killed_save_left_and_never_loads_training_args(reference, work) -> None:
    run = work / "leftovers"
    shutil.copytree(reference, run)
    for name in (ADAPTER, "adapter_config.json"):
        (run / name).unlink()
    # a kill during the save of checkpoint-8 left its partial folder (optimizer.pt cut short) ...
    shutil.rmtree(run / "checkpoint-8")
    partial = run / ".partial-checkpoint-8" / "checkpoint-8"
    shutil.copytree(run / "checkpoint-6", partial)
    (partial / "optimizer.pt").write_bytes((partial / "optimizer.pt").read_bytes()[:1000])
    # ... and an older tool left an incomplete checkpoint-10 (no trainer state)
    (run / "checkpoint-10").mkdir()
    shutil.copy(run / "checkpoint-6" / ADAPTER, run / "checkpoint-10" / ADAPTER)
    # a pickle that would run code, where plain transformers checkpoints keep their arguments
    marker = work / "training_args-ran"
    torch.save(RunsCode(marker), run / "checkpoint-6" / "training_args.bin")

    assert main(["train", "--resume", str(run)]) == 0
    assert not marker.exists()
    assert not (run / ".partial-checkpoint-8").exists()
    assert (run / "checkpoint-10").is_dir()  # not ours to delete, and never counted
    assert (run / ADAPTER).read_bytes() == (reference / ADAPTER).read_bytes()


class RunsCode:
    """Pickles to a call of ``exec``: loading it with plain pickle would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_checkpoint_file_that_would_run_code_is_refused(name, reference, work, capsys) -> None:
    run = work / f"evil-{name}"
    shutil.copytree(reference, run)
    marker = work / f"{name}-ran"
    torch.save(RunsCode(marker), run / f"checkpoint-{STEPS}" / name)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{name} is refused: it calls exec, so loading it could run code" in err
    assert not marker.exists()


def test_trainer_itself_never_unpickles_code_on_resume(reference, work) -> None:
    """Below lorafit's check: transformers 5's Trainer loads each checkpoint file with
    weights_only=True, so a file that would run code fails to load and runs nothing."""
    import pickle

    from lorafit.config import load_config
    from lorafit.data import collator_for
    from lorafit.models import load_model, load_tokenizer
    from lorafit.models.precision import Precision
    from lorafit.training.arguments import resolve_training_config, training_arguments
    from lorafit.training.run import add_lora, build_data
    from lorafit.training.trainer import LorafitTrainer

    cfg = load_config(
        None, [*run_args(work / "direct", work / "data"), "--training_config.eval_strategy", "no"]
    )
    precision = Precision.decide(cfg.model, cfg.training_config, training=True, on_cpu=True)
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    train_set, _, _ = build_data(cfg, tokenizer, seed=0)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        checkpoint = work / f"direct-{name}"
        shutil.copytree(reference / "checkpoint-6", checkpoint)
        marker = work / f"direct-{name}-ran"
        torch.save(RunsCode(marker), checkpoint / name)
        trainer = LorafitTrainer(
            model=add_lora(load_model(cfg.model, tokenizer, precision), cfg),
            args=training_arguments(
                resolve_training_config(cfg.training_config, precision, has_eval=False, n_params=0)[0],
                work / "direct",
            ),
            train_dataset=train_set,
            data_collator=collator_for(tokenizer, packing=True),
        )
        with pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL exec"):
            trainer.train(resume_from_checkpoint=str(checkpoint))
        assert not marker.exists(), name


def test_model_code_from_a_folder_never_runs_without_trust_remote_code(tmp_path, capsys) -> None:
    from lorafit.demo import load_demo_tokenizer

    folder = tmp_path / "custom"
    load_demo_tokenizer().save_pretrained(folder)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "custom", "auto_map": {"AutoConfig": "custom_code.Config"}})
    )
    (folder / "custom_code.py").write_text("open(__file__ + '.ran', 'w').write('ran')\n")
    args = ["--model.name_or_path", str(folder), "--data.train", str(eval_file())]
    assert main(["train", *args, "--training_config.eval_strategy", "no"]) == 2
    err = capsys.readouterr().err
    assert "ships its own Python code" in err and "model.trust_remote_code: true" in err
    assert not (folder / "custom_code.py.ran").exists()


# --------------------------------------------------------------------------------------------
# Non-finite steps
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> Path:
    """The demo model with one token's embedding set to inf, saved as a model folder, and data in
    which only one record uses that token: the steps that train on it have a NaN loss."""
    folder = tmp_path_factory.mktemp("poisoned")
    poisoned_demo_model(folder / "model")
    lines = train_file().read_text(encoding="utf-8").splitlines()[:7]
    bad = {
        "messages": [
            {"role": "user", "content": f"Say the {POISON} word."},
            {"role": "assistant", "content": "No."},
        ]
    }
    (folder / "train.jsonl").write_text("\n".join([*lines, json.dumps(bad)]) + "\n", encoding="utf-8")
    return folder


def poisoned_args(poisoned: Path, run: Path) -> list[str]:
    return [
        "--model.name_or_path",
        str(poisoned / "model"),
        "--model.torch_dtype",
        "float32",
        "--data.train",
        str(poisoned / "train.jsonl"),
        "--data.packing",
        "false",
        "--data.eval_prompts",
        "0",
        "--training_config.per_device_train_batch_size",
        "1",
        "--training_config.max_steps",
        "8",
        "--training_config.gradient_accumulation_steps",
        "1",  # one example a step, so that exactly one step sees the bad record
        "--training_config.save_strategy",
        "steps",
        "--training_config.save_steps",
        "1",
        "--training_config.eval_strategy",
        "no",
        "--training_config.report_to",
        "none",
        "--training_config.output_dir",
        str(run),
    ]


def test_non_finite_loss_stops_before_the_weights_with_step_and_checkpoint(
    poisoned, tmp_path, capsys
) -> None:
    run = tmp_path / "run"
    assert main(["train", *poisoned_args(poisoned, run)]) == 2
    assert_stopped_before_a_non_finite_update(capsys.readouterr().err, run)


def test_skip_nonfinite_skips_only_the_bad_steps(poisoned, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *poisoned_args(poisoned, run), "--skip-nonfinite"]) == 0
    out = capsys.readouterr().out
    assert out.count("non-finite loss and gradients (NaN or inf); skipped") == 1  # 8 steps, 1 bad record
    adapter = load_file(run / ADAPTER)
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # the good steps trained


# --------------------------------------------------------------------------------------------
# Checks before training; the run folder
# --------------------------------------------------------------------------------------------


def test_unwritable_output_folder_is_reported_before_training(tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["train", "--training_config.output_dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{blocker} is a file, not a folder" in err
    assert "data:" not in capsys.readouterr().out  # stopped before reading data or loading the model


def test_existing_run_is_kept_unless_resume_or_overwrite(reference, work, capsys) -> None:
    run = work / "reused"
    shutil.copytree(reference, run)
    before = (run / ADAPTER).read_bytes()
    args = [*run_args(run, work / "data"), "--training_config.max_steps", "2"]
    assert main(["train", *args]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (run / ADAPTER).read_bytes() == before
    assert main(["train", *args, "--training_config.overwrite_output_dir", "true"]) == 0
    assert "removed the previous run's" in capsys.readouterr().out
    # the old run's checkpoint-6/8 are gone, so neither --resume nor rotation can take them for this run's
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert max(r[0] for r in losses(run)) == 2


# --------------------------------------------------------------------------------------------
# Bad records at scale
# --------------------------------------------------------------------------------------------


def test_skip_bad_records_trains_on_the_rest_and_writes_a_report(broken_dataset, tmp_path, capsys) -> None:
    data, broken = broken_dataset(tmp_path / "big.jsonl", records=3000)
    run = tmp_path / "run"
    common = [
        "--data.train",
        str(data),
        "--data.max_length",
        "256",
        "--data.overlong",
        "drop",
        "--data.format",
        "auto",
        "--data.eval_prompts",
        "1",
        "--model.torch_dtype",
        "float32",
        "--training_config.max_steps",
        "1",
        "--training_config.eval_strategy",
        "no",
        "--training_config.report_to",
        "none",
        "--training_config.output_dir",
        str(run),
    ]
    assert main(["train", *common]) == 2
    first = min(broken)
    assert f"big.jsonl line {first}: {broken[first][1]}" in capsys.readouterr().err
    assert not run.exists()

    assert main(["train", *common, "--skip-bad-records"]) == 0
    assert f"skipped {len(broken)} records" in capsys.readouterr().out
    report = [json.loads(line) for line in (run / "skipped_records.jsonl").read_text().splitlines()]
    assert sorted(int(r["where"].rsplit(" ", 1)[1]) for r in report) == sorted(broken)
    for row in report:
        assert row["split"] == "train" and row["where"].startswith(f"{data} line ")
        assert row["reason"].startswith(broken[int(row["where"].rsplit(" ", 1)[1])][1]), row
