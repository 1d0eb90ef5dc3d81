"""Several processes: real torchrun launches over gloo on CPU, compared with one process.

The 2-process DDP run trains the demo model with half the per-device batch of the 1-process
run (the same global batch of 4 packed rows), so with ``average_tokens_across_devices`` (the
loss is summed over every rank's tokens and divided by the global token count) and no dropout
the two loss curves are the same computation in another summation order. Measured difference:
under 1e-6 on losses near 7; the tolerance is ``LOSS_TOLERANCE``. The same comparison runs
for ``--fsdp`` through Trainer's FSDP2 path (``fsdp_cpu_launch.py`` beside this file), and
``dist_worker.py`` runs torch's FSDP2 and the rank-agreement helpers directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lorafit.adapters import LoraConfig, apply_lora
from lorafit.adapters.files import adapter_state_dict, clean_module_name
from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.training import distributed as lf_dist

from processes import LOSS_TOLERANCE, rows, torchrun
from tiny import tiny_phi3

COMMON = [
    "--training_config.max_steps", "6",
    "--training_config.logging_steps", "1",
    "--training_config.save_steps", "3",
    "--training_config.eval_steps", "3",
    "--training_config.report_to", "none",
    "--data.max_length", "256",
    "--data.eval_prompts", "1",
    "--model.torch_dtype", "float32",
    "--peft_config.lora_dropout", "0",  # dropout masks differ per rank: no exact comparison with it
]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, 4 rows per batch, in this test process."""
    work = tmp_path_factory.mktemp("one")
    old = os.getcwd()
    os.chdir(work)
    os.environ["LORAFIT_CACHE"] = str(work / "cache")
    try:
        args = [*COMMON, "--training_config.per_device_train_batch_size", "4"]
        assert main(["train", *args, "--training_config.output_dir", "run"]) == 0
    finally:
        os.chdir(old)
    return work / "run"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, str]:
    """torchrun with 2 gloo processes, 2 rows each, gradient checkpointing on, and no
    output_dir: the ranks must agree on one timestamped run folder."""
    work = tmp_path_factory.mktemp("two")
    args = [
        *COMMON,
        "--training_config.per_device_train_batch_size", "2",
        "--training_config.gradient_checkpointing", "true",
    ]  # fmt: skip
    proc = torchrun(["-m", "lorafit", "train", *args], work, work / "cache")
    (run,) = (work / "runs").iterdir()  # one folder, not one per rank
    return run, proc.stdout


def test_two_process_loss_curve_matches_one_process(one_process, two_processes) -> None:
    run, _ = two_processes
    one, two = rows(one_process), rows(run)
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]  # each step logged once, by rank 0
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=True)]
    assert max(diffs) < LOSS_TOLERANCE, diffs
    # Same rows in the same order: the token counts (summed over both ranks) agree step by step.
    assert [r["tokens_seen"] for r in one] == [r["tokens_seen"] for r in two]
    assert two[-1]["loss"] < two[0]["loss"]


def test_only_rank_zero_writes_and_prints(two_processes) -> None:
    run, stdout = two_processes
    assert stdout.count("adapter saved in") == 1 and stdout.count("trainable params") == 1
    for name in ("lorafit_run.yaml", "tokenizer.json", "loss.png", "samples.md", "adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert "**after:**" in (run / "samples.md").read_text()
    ckpt = run / "checkpoint-6"
    # Each rank keeps its own RNG state in the checkpoint (Trainer's resume reads them back).
    assert {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert len(rows(run, "eval_loss")) == 2


def test_two_process_adapter_loads_like_any_other(one_process, two_processes) -> None:
    from lorafit.models import load_trained

    run, _ = two_processes
    _, _, model_two = load_trained(str(run))
    _, _, model_one = load_trained(str(one_process))
    ids = torch.randint(20, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model_two(input_ids=ids).logits - model_one(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-3


def test_resume_from_a_two_process_checkpoint(two_processes, tmp_path) -> None:
    run, _ = two_processes
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoint-6")
    (copy / "adapter_model.safetensors").unlink()
    torchrun(["-m", "lorafit", "train", "--resume", str(copy)], tmp_path, run.parents[1] / "cache")
    state = json.loads((copy / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    resumed = rows(copy)[-3:]  # steps 4-6 again, after the 6 rows the first run logged
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(rows(run)[3:], resumed, strict=True):
        assert abs(a["loss"] - b["loss"]) < LOSS_TOLERANCE


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    """One torchrun launch of tests/training/dist_worker.py: rank agreement, then FSDP2."""
    out = tmp_path_factory.mktemp("worker")
    torchrun([str(Path(__file__).with_name("dist_worker.py")), str(out)], out, out / "cache")
    return out


def test_ranks_agree_or_fail_together(worker) -> None:
    found = [json.loads((worker / f"agreement-rank{r}.json").read_text()) for r in range(2)]
    assert [f["decided"] for f in found] == ["picked by 0", "picked by 0"]
    assert [f["refusal"] for f in found] == ["folder taken", "folder taken"]
    assert all("built different training rows" in f["mismatch"] for f in found)
    assert [f["saw_first"] for f in found] == [False, True]


def test_fsdp2_shards_a_lora_model_on_cpu(worker) -> None:
    """torch's FSDP2 over gloo: LoRA layers shard with their frozen base in one unit, train
    like the unsharded model, and the adapter saves and reloads through lorafit's FSDP paths."""
    report = json.loads((worker / "fsdp.json").read_text())
    assert report["local_numel"] * 2 == report["total_numel"]  # each rank holds half
    assert report["frozen_and_trainable_in_one_unit"]
    for a, b in zip(report["losses"], report["ref_losses"], strict=True):
        assert abs(a - b) < LOSS_TOLERANCE
    assert report["adapter_keys_match"] and report["adapter_max_diff"] < 1e-6
    assert report["reloaded_logits_max_diff"] < 1e-5


def test_trainer_fsdp2_run_on_cpu_matches_and_resumes(one_process, tmp_path) -> None:
    """``lorafit train --fsdp`` through Trainer and accelerate's FSDP2 preparation, run on CPU by
    tests/training/fsdp_cpu_launch.py (which lifts accelerate's accelerator-only gate): same losses as one
    process, checkpoints with the adapter and optimizer but never the base model, and resume."""
    launch = str(Path(__file__).with_name("fsdp_cpu_launch.py"))
    args = [*COMMON, "--training_config.per_device_train_batch_size", "2", "--training_config.output_dir=run"]
    torchrun([launch, "train", "--fsdp", *args], tmp_path, tmp_path / "cache")
    run = tmp_path / "run"
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(rows(one_process), rows(run), strict=True)]
    assert max(diffs) < LOSS_TOLERANCE, diffs
    # Only rank 0 could have run the "after" samples, and under FSDP it holds half the model.
    assert "(not run: the model is sharded" in (run / "samples.md").read_text()
    assert {p.name for p in (run / "checkpoint-6").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.bin",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state_0.pth",
        "rng_state_1.pth",
        "lorafit_state.json",  # tokens seen and the training data's fingerprint
    }

    shutil.rmtree(run / "checkpoint-6")
    torchrun([launch, "train", "--resume", str(run)], tmp_path, tmp_path / "cache")
    resumed = rows(run)[-3:]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(rows(one_process)[3:], resumed, strict=True):
        assert abs(a["loss"] - b["loss"]) < LOSS_TOLERANCE


@pytest.mark.skipif(torch.cuda.is_available(), reason="on GPUs --fsdp is accepted")
def test_fsdp_flag_is_refused_on_cpu(capsys) -> None:
    assert main(["train", "--fsdp", "--training_config.max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs GPUs" in err and "silently run plain DDP" in err


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_config_without_deepspeed_is_a_clear_error(capsys) -> None:
    config = Path(__file__).resolve().parents[2] / "examples" / "deepspeed_zero3.json"
    # The adapter is gathered from what ZeRO-3 hands over at each save: the example must ask for it.
    assert json.loads(config.read_text())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert main(["train", "--training_config.deepspeed", str(config)]) == 2
    assert "needs the deepspeed package" in capsys.readouterr().err


def test_device_map_under_a_launcher_is_refused(monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before any process group is joined
    assert main(["train", "--model.device_map", "auto"]) == 2
    assert "each of the 2 processes loads its own copy" in capsys.readouterr().err


def test_fsdp_without_a_launcher_is_refused(monkeypatch, capsys) -> None:
    import lorafit.training.distributed

    monkeypatch.setattr(lorafit.training.distributed, "refuse_cpu_fsdp", lambda: None)  # as on a GPU machine
    assert main(["train", "--fsdp"]) == 2
    assert "this is a single process" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Single-process pieces
# --------------------------------------------------------------------------------------------


def test_without_a_launcher_everything_is_a_plain_call() -> None:
    from accelerate import PartialState

    assert PartialState().num_processes == 1 and PartialState().is_main_process
    assert lf_dist.decide_on_main(lambda: 3) == 3
    lf_dist.check_same_on_all_ranks("x", "rows")
    lf_dist.shutdown(wait_for_all=True)  # no group: nothing to leave


def test_fingerprint_sees_packing_and_tokens(phi3_tokenizer, tmp_path) -> None:
    from lorafit import data as lf_data

    path = tmp_path / "chat.jsonl"
    convs = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello " * i}]}
        for i in range(1, 9)
    ]
    path.write_text("\n".join(json.dumps(c) for c in convs))

    def fingerprint(**kw) -> str:
        train, _, _ = lf_data.build_datasets(phi3_tokenizer, train=path, cache_dir=tmp_path / "c", **kw)
        return lf_data.dataset_fingerprint(train)

    packed = fingerprint(max_length=64)
    assert packed == fingerprint(max_length=64)
    assert packed != fingerprint(max_length=48)  # other rows
    assert packed != fingerprint(max_length=64, packing=False)


def test_adapter_from_a_gathered_state_dict_equals_the_models_own() -> None:
    model = tiny_phi3()
    apply_lora(model, LoraConfig(r=4, init_lora_weights=False, bias="all"))
    own = adapter_state_dict(model)
    gathered = adapter_state_dict(model, {k: v.clone() for k, v in model.state_dict().items()})
    assert own.keys() == gathered.keys()
    assert all(torch.equal(own[k], gathered[k]) for k in own)
    with pytest.raises(LorafitError, match="lacks"):
        adapter_state_dict(model, {})


def test_wrapper_parts_leave_module_names() -> None:
    name = "model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp.down_proj"
    assert clean_module_name(name) == "model.layers.0.mlp.down_proj"
