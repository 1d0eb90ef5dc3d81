"""The preference methods on SFT's engine guarantees, tested as SFT's are (test_run.py,
test_distributed.py, tests/models/test_quant.py): exact resume after SIGKILL, SIGINT's
checkpoint, the stop before a non-finite update, DDP under torchrun, QLoRA.

The runs are DPO on the demo model (fp32, no dropout) over 8 tiny pairs, 4 pairs a step (2
steps an epoch, so 4 steps cross an epoch boundary), with the reference log-probs precomputed
(one pass before training, which a resumed run makes again) and an eval every 2 steps; ORPO,
KTO and DPO with a reference pass each step are resumed in this process. One uninterrupted
run, in this process, is the reference; interrupted runs are real
``python -m lorafit train`` processes paused at a fixed step (``LORAFIT_PAUSE_AT_STEP``), and
their resumed adapters, optimizer states and metrics must equal the reference's bit for bit
(CPU, one thread in both).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.cli import main

from chat_data import write_jsonl
from processes import (
    LOSS_TOLERANCE,
    POISON,
    assert_stopped_before_a_non_finite_update,
    kill_when_paused,
    poisoned_demo_model,
    rows,
    start,
    torchrun,
    wait_paused,
)

ADAPTER = "adapter_model.safetensors"
STEPS = 4
PAIRS = [
    {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for prompt, chosen, rejected in [
        ("What is two plus two?", "Two plus two is four.", "It is five."),
        ("Name a colour of the sky.", "Blue.", "The sky has no colour."),
        ("Say hello politely.", "Hello, how are you today?", "What do you want?"),
        ("What do cats like?", "Cats like to sleep a lot.", "Cats hate sleeping."),
        ("Translate to French: good morning.", "Bonjour.", "Good morning."),
        ("Why is the sky blue?", "Because of scattering.", "It is painted."),
        ("Write a haiku about the sea.", "Waves fold into foam.", "No."),
        ("Explain LoRA briefly.", "It trains small matrices A and B.", "A radio."),
    ]
]
EVAL = [
    {"prompt": "What is three plus five?", "chosen": "That is eight.", "rejected": "That is nine."},
    {"prompt": "Summarize: cats sleep a lot.", "chosen": "Cats sleep.", "rejected": "Dogs play outside."},
]


def engine_args(
    run: Path | str,
    data: Path,
    *,
    method: str = "dpo",
    batch: int = 4,
    train: str = "pairs.jsonl",
    eval: str | None = "eval.jsonl",  # named after the config key
    precompute: bool = True,
) -> list[str]:
    """The runs of this file: ``STEPS`` steps of ``batch`` examples from ``data/train``, a
    checkpoint and an eval (of ``data/eval``) every 2 steps."""
    args = [
        "--method", method,
        "--data.train", str(data / train),
        "--data.eval_prompts", "0",
        "--model.torch_dtype", "float32",
        "--peft_config.lora_dropout", "0",  # dropout masks differ per rank: no exact DDP comparison with it
        "--training_config.learning_rate", "2e-3",
        "--training_config.warmup_steps", "0",  # every step moves the weights, the first too
        "--training_config.max_steps", str(STEPS),
        "--training_config.save_steps", "2",
        "--training_config.save_total_limit", "2",
        "--training_config.eval_steps", "2",
        "--training_config.logging_steps", "1",
        "--training_config.per_device_train_batch_size", str(batch),
        "--training_config.gradient_accumulation_steps", "1",
        "--training_config.report_to", "none",
        "--training_config.output_dir", str(run),
    ]  # fmt: skip
    if method in ("dpo", "kto"):  # said, not left to the default: with it, a resumed run redoes the pass
        args += ["--training_config.precompute_ref_log_probs", str(precompute).lower()]
    if eval is None:
        return [*args, "--training_config.eval_strategy", "no"]
    return [*args, "--data.eval", str(data / eval)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with the pairs (train and eval), KTO's unpaired form of them, and a cache."""
    work = tmp_path_factory.mktemp("preference-engine")
    write_jsonl(work / "pairs.jsonl", PAIRS)
    write_jsonl(work / "eval.jsonl", EVAL)
    kto = [
        {"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
        for p in PAIRS
        for k in p
        if k != "prompt"
    ]
    write_jsonl(work / "kto.jsonl", kto)
    return work


@pytest.fixture(autouse=True)
def _cache(work, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(work / "cache"))


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """The uninterrupted DPO run, in this process."""
    os.environ["LORAFIT_CACHE"] = str(work / "cache")
    run = work / "reference"
    assert main(["train", *engine_args(run, work)]) == 0
    return run


def metric_rows(run: Path) -> list[dict]:
    """Every train and eval row of ``metrics.jsonl`` without its timings (tokens/s, runtimes)."""
    timed = ("tokens_per_s", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
    return [{k: v for k, v in r.items() if k not in timed} for r in rows(run, "step")]


def assert_same_as_reference(run: Path, reference: Path) -> None:
    assert (run / ADAPTER).read_bytes() == (reference / ADAPTER).read_bytes()
    last = f"checkpoint-{STEPS}"
    for name in ("optimizer.pt", "scheduler.pt", ADAPTER):
        assert (run / last / name).read_bytes() == (reference / last / name).read_bytes(), name
    ours, theirs = metric_rows(run), metric_rows(reference)
    assert [r for r in ours if "train_runtime" not in r] == [r for r in theirs if "train_runtime" not in r]
    assert any("rewards/chosen" in r for r in ours) and any("eval_rewards/chosen" in r for r in ours)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no partial checkpoint left


def test_sigkill_mid_run_then_resume_is_bit_identical(reference, work) -> None:
    run = work / "killed"
    kill_when_paused(engine_args(run, work), work, run, pause_at=2, last_step=STEPS)

    # The resumed run takes the reference log-probs again (from the base weights, with the
    # adapter off) and must land on the same weights as the run that took them once.
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_as_reference(run, reference)


def test_sigint_stops_with_a_checkpoint_and_says_how_to_resume(reference, work) -> None:
    run = work / "interrupted"
    proc = start(engine_args(run, work), work, "interrupted", pause_at=2)
    wait_paused(proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=300) == 130
    err = (work / "interrupted.err").read_text()
    assert "SIGINT: stopping after this step" in (work / "interrupted.out").read_text()
    assert "Traceback" not in err
    step = int(err.split("stopped by SIGINT after step ")[1].split()[0])
    assert step == 3 and (run / f"checkpoint-{step}" / ADAPTER).is_file()  # saved for the signal
    assert f"The last good checkpoint is {run / f'checkpoint-{step}'}" in err
    assert f"lorafit train --resume {run}" in err
    assert not (run / ADAPTER).exists()

    assert main(["train", "--resume", str(run)]) == 0
    assert_same_as_reference(run, reference)


@pytest.mark.parametrize(
    "method,settings",
    [
        ("dpo", {"precompute": False}),  # the reference pass in each step: the adapter switched off
        ("orpo", {}),
        ("kto", {"train": "kto.jsonl", "eval": "kto.jsonl"}),
    ],
)
def test_resume_from_a_checkpoint_is_bit_identical(work, method, settings) -> None:
    """The other reference mode and methods, resumed in this process from checkpoint-2 of a
    finished run: the same adapter and metrics as the run that never stopped."""
    whole, cut = work / f"{method}-whole", work / f"{method}-cut"
    assert main(["train", *engine_args(whole, work, method=method, **settings)]) == 0
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / f"checkpoint-{STEPS}")
    for name in (ADAPTER, "adapter_config.json"):
        (cut / name).unlink()
    assert main(["train", "--resume", str(cut)]) == 0
    assert_same_as_reference(cut, whole)


# --------------------------------------------------------------------------------------------
# Non-finite steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_non_finite_loss_stops_before_the_weights_with_step_and_checkpoint(method, tmp_path, capsys) -> None:
    """The demo model with an inf embedding for one token, which only one pair's prompt holds
    (test_run.py's poisoned model): the step of that pair stops the run before its update."""
    model = poisoned_demo_model(tmp_path / "model")
    bad = {"prompt": f"Say the {POISON} word.", "chosen": "No.", "rejected": "Yes."}
    write_jsonl(tmp_path / "pairs.jsonl", [*PAIRS[:3], bad])
    run = tmp_path / "run"
    args = [
        *engine_args(run, tmp_path, method=method, batch=1, eval=None),
        "--model.name_or_path", str(model),
        "--training_config.save_steps", "1",  # one pair a step: exactly one step sees the bad pair
    ]  # fmt: skip
    assert main(["train", *args]) == 2
    assert_stopped_before_a_non_finite_update(capsys.readouterr().err, run)


# --------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo on CPU) against one
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(work) -> tuple[Path, str]:
    """torchrun with 2 gloo processes, 2 pairs each a step (the reference's global batch of 4),
    gradient checkpointing on."""
    run = work / "two"
    args = [*engine_args(run, work, batch=2), "--training_config.gradient_checkpointing", "true"]
    proc = torchrun(["-m", "lorafit", "train", *args], work, work / "cache")
    return run, proc.stdout


def test_two_process_loss_and_rewards_match_one_process(reference, two_processes) -> None:
    """Each rank's loss is the mean over its 2 pairs and DDP averages the gradients: the mean over
    the 4 pairs. The logged rewards are the mean over both ranks' pairs, not rank 0's alone.
    Measured: loss within 1.8e-7, rewards within 4.2e-7, eval equal (the reference log-probs are
    taken in batches of 2 there, of 4 here: the same sums in another order)."""
    run, _ = two_processes
    one, two = rows(reference), rows(run)
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # each step logged once, by rank 0
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    for key in keys:
        diffs = [abs(a[key] - b[key]) for a, b in zip(one, two, strict=True)]
        assert max(diffs) < LOSS_TOLERANCE, (key, diffs)
    assert [r["tokens_seen"] for r in one] == [r["tokens_seen"] for r in two]
    assert two[-1]["loss"] < two[0]["loss"]
    one_eval, two_eval = rows(reference, "eval_loss"), rows(run, "eval_loss")
    assert len(two_eval) == 2
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        diffs = [abs(a[key] - b[key]) for a, b in zip(one_eval, two_eval, strict=True)]
        assert max(diffs) < LOSS_TOLERANCE, (key, diffs)


def test_only_rank_zero_writes_and_the_adapter_loads(reference, two_processes) -> None:
    from lorafit.models import load_trained

    run, stdout = two_processes
    assert stdout.count("adapter saved in") == 1 and stdout.count("trainable params") == 1
    assert stdout.count("data: 8 records") == 1
    for name in ("lorafit_run.yaml", "tokenizer.json", "loss.png", ADAPTER):
        assert (run / name).is_file(), name
    ckpt = run / f"checkpoint-{STEPS}"
    assert {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    _, _, model_two = load_trained(str(run))
    _, _, model_one = load_trained(str(reference))
    ids = torch.randint(20, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model_two(input_ids=ids).logits - model_one(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-3


# --------------------------------------------------------------------------------------------
# QLoRA
# --------------------------------------------------------------------------------------------


def test_cli_qlora_dpo_trains_the_demo_and_merges(work, tmp_path, monkeypatch, capsys) -> None:
    """As tests/models/test_quant.py's SFT run: the reference is the 4-bit base with the adapter off."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)
    args = [
        "--method", "dpo",
        "--data.train", str(work / "pairs.jsonl"),
        "--data.eval_prompts", "0",
        "--training_config.max_steps", "3",
        "--training_config.per_device_train_batch_size", "2",
        "--training_config.gradient_accumulation_steps", "1",
        "--training_config.learning_rate", "5e-3",
        "--training_config.logging_steps", "1",
        "--training_config.save_strategy", "no",
        "--training_config.report_to", "none",
        "--training_config.output_dir", "run",
    ]  # fmt: skip
    assert main(["train", "--qlora", *args]) == 0
    adapter = tmp_path / "run"
    assert (adapter / ADAPTER).is_file()
    assert "load_in_4bit" in (adapter / "lorafit_run.yaml").read_text()
    logged = rows(adapter)
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    # the adapter starts at zero, so the policy is the reference (the 4-bit base): -log sigmoid(0)
    assert logged[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    trained = load_file(adapter / ADAPTER)
    assert any(t.abs().sum() > 0 for k, t in trained.items() if "lora_B" in k)
    assert all(torch.isfinite(t).all() for t in trained.values())
    capsys.readouterr()
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert "the adapter goes onto the original 16-bit weights of lorafit-demo" in capsys.readouterr().out


def test_trackers_get_the_rewards_tokens_per_s_and_the_config(work, tmp_path) -> None:
    """The preference trainer has SFT's callbacks in SFT's order: tokens/s reaches the trackers
    (it is added to the logs before they see them) and so does the run's config."""
    pytest.importorskip("tensorboard")
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = [*engine_args(run, work, batch=2, eval=None), "--training_config.report_to", "tensorboard"]
    assert (
        main(["train", *args, "--training_config.max_steps", "2", "--training_config.save_strategy", "no"])
        == 0
    )
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {r["step"]: r for r in rows(run)}
    for key in ("loss", "tokens_per_s", "rewards/accuracies", "rewards/margins"):
        got = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        assert got == pytest.approx({step: r[key] for step, r in logged.items()}, rel=1e-6), key
    (text,) = events.Tensors("lorafit_config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    config = yaml.safe_load(shown.removeprefix("```yaml\n").removesuffix("```"))
    assert config == yaml.safe_load((run / "lorafit_run.yaml").read_text()) and config["method"] == "dpo"
