"""``lorafit train --method dpo|orpo|simpo|kto`` end to end on the demo model: a few steps, the
run files with TRL's metric names, an adapter PEFT loads, and DPO continuing an SFT adapter."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafit.cli import main

from chat_data import write_jsonl

PAIRS = [
    {
        "prompt": "What is two plus two?",
        "chosen": "Two plus two is four.",
        "rejected": "It is five, I think.",
    },
    {"prompt": "Name a colour of the sky.", "chosen": "Blue.", "rejected": "The sky has no colour at all."},
    {"prompt": "Say hello politely.", "chosen": "Hello, how are you today?", "rejected": "What do you want?"},
    {
        "prompt": "What do cats like?",
        "chosen": "Cats like to sleep a lot.",
        "rejected": "Cats hate sleeping.",
    },
]
COMMON = [
    "--model.name_or_path", "lorafit-demo",
    "--model.torch_dtype", "float32",
    "--training_config.report_to", "none",
    "--training_config.logging_steps", "1",
    "--training_config.per_device_train_batch_size", "2",
    "--training_config.gradient_accumulation_steps", "1",
]  # fmt: skip
SFT = ["--training_config.max_steps", "3", "--training_config.learning_rate", "5e-3", "--data.max_length",
       "256", "--data.eval_prompts", "0", "--training_config.save_strategy", "no"]  # fmt: skip
PREFERENCE = ["--training_config.max_steps", "3", "--training_config.learning_rate", "1e-3",
              "--training_config.save_steps", "2"]  # fmt: skip


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    kto = [
        {"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
        for p in PAIRS
        for k in ("chosen", "rejected")
    ]
    write_jsonl(tmp_path / "kto.jsonl", kto)
    return tmp_path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter_model.safetensors")


def eval_figures(run: str, capsys) -> tuple[str, dict[str, float]]:
    """``lorafit eval --adapter RUN --data pairs.jsonl``: its first line and its figures."""
    capsys.readouterr()
    assert main(["eval", "--adapter", run, "--data", "pairs.jsonl"]) == 0
    first, figures = capsys.readouterr().out.strip().splitlines()[-2:]
    words = figures.split()
    return first, {k: float(v) for k, v in zip(words[::2], words[1::2], strict=True)}


def test_dpo_on_top_of_sft_saves_one_adapter_holding_both(work, capsys) -> None:
    import peft

    from lorafit.demo import build_demo_model
    from lorafit.models import load_trained

    assert main(["train", *COMMON, *SFT, "--training_config.output_dir", "sft"]) == 0
    args = [
        "train",
        "--method",
        "dpo",
        "--data.train",
        "pairs.jsonl",
        "--adapter",
        "sft",
        *COMMON,
        *PREFERENCE,
    ]
    assert main([*args, "--training_config.output_dir", "dpo"]) == 0
    run = work / "dpo"
    logged = [row for row in metrics(run) if "rewards/accuracies" in row]
    assert len(logged) >= 3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(isinstance(row[key], float) for row in logged), key
    assert (run / "checkpoint-2" / "adapter_model.safetensors").is_file()
    config = (run / "lorafit_run.yaml").read_text()
    assert "method: dpo" in config and "beta: 0.1" in config

    sft, dpo = adapter_tensors(work / "sft"), adapter_tensors(run)
    assert sft.keys() == dpo.keys()
    assert (
        json.loads((run / "adapter_config.json").read_text())["r"]
        == json.loads((work / "sft" / "adapter_config.json").read_text())["r"]
    )
    b_keys = [k for k in sft if "lora_B" in k]
    moved = sum(float((dpo[k] - sft[k]).norm()) for k in b_keys)
    size = sum(float(sft[k].norm()) for k in b_keys)
    assert size > 0 and 0 < moved < size  # the SFT update is kept, DPO's is added to it

    # PEFT loads the adapter and computes what lorafit's loaded run computes
    peft_model = peft.PeftModel.from_pretrained(build_demo_model(torch.float32), str(run)).eval()
    _, _, ours = load_trained(str(run))
    ids = torch.randint(20, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (peft_model(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4

    # lorafit eval on the pairs: the DPO run against its reference, the SFT adapter it started
    # from; the SFT run (no preference method) as DPO against the base model. Each reward is
    # beta times the log-prob gained over the reference, so the two runs' figures chain.
    first, dpo_eval = eval_figures("dpo", capsys)
    assert first.startswith("eval on pairs.jsonl: 4 pairs, scored as dpo against the adapter it started from")
    first, sft_eval = eval_figures("sft", capsys)
    assert first.endswith("scored as dpo against the base model")
    for side in ("chosen", "rejected"):
        gained = dpo_eval[f"logps/{side}"] - sft_eval[f"logps/{side}"]
        assert dpo_eval[f"rewards/{side}"] == pytest.approx(0.1 * gained, abs=2e-4)
    assert abs(sft_eval["rewards/chosen"]) > 1e-3  # SFT moved the log-probs: the reference matters
    assert dpo_eval["rewards/margins"] > 0  # DPO preferred the chosen answers
    assert main(["eval", "--adapter", "dpo", "--data", "pairs.jsonl", "--generate"]) == 2
    assert "holds preference data" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method,extra",
    [
        (
            "dpo",
            [
                "--training_config.loss_type",
                "ipo",
                "--training_config.precompute_ref_log_probs",
                "true",
                "--data.eval_fraction",
                "0.5",
                "--training_config.eval_steps",
                "1",
            ],
        ),  # fmt: skip
        ("orpo", []),
        ("simpo", ["--training_config.simpo_gamma", "0.3"]),
        ("kto", []),
    ],
)
def test_each_method_trains_and_logs(work, method, extra) -> None:
    data = "kto.jsonl" if method == "kto" else "pairs.jsonl"
    args = ["train", "--method", method, "--data.train", data, *COMMON, *PREFERENCE, *extra]
    assert main([*args, "--training_config.max_steps", "2", "--training_config.output_dir", method]) == 0
    rows = [row for row in metrics(work / method) if "loss" in row]
    assert rows and all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert any("rewards/chosen" in row for row in metrics(work / method))
    assert (work / method / "adapter_model.safetensors").is_file()
    if method == "dpo":  # the adapter starts at zero, so policy = reference: IPO's loss is (1 / (2 beta))^2
        assert rows[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)
        evals = [row for row in metrics(work / method) if "eval_loss" in row]
        assert evals and all("eval_rewards/accuracies" in row for row in evals)


def test_preference_keys_are_checked(work, capsys) -> None:
    assert (
        main(
            [
                "train",
                "--method",
                "dpo",
                "--data.train",
                "pairs.jsonl",
                *COMMON,
                "--training_config.bta",
                "0.2",
            ]
        )
        == 2
    )
    assert "did you mean 'beta'" in capsys.readouterr().err.lower()
    assert main(["train", "--data.train", "pairs.jsonl", *COMMON, "--training_config.beta", "0.2"]) == 2
    assert "method dpo" in capsys.readouterr().err
    args = [
        "train",
        "--method",
        "dpo",
        "--data.train",
        "pairs.jsonl",
        *COMMON,
        "--training_config.ld_alpha",
        "0.5",
    ]
    assert main(args) == 2
    assert "does not implement" in capsys.readouterr().err
    dpo = ["train", "--method", "dpo", "--data.train", "pairs.jsonl", *COMMON]
    assert main([*dpo, "--training_config.loss_type", "[sigmoid, sfft]"]) == 2
    assert "'sfft' (did you mean 'sft'?)" in capsys.readouterr().err
    combined = [*dpo, "--training_config.loss_type", "[sigmoid, sft]"]
    assert main([*combined, "--training_config.loss_weights", "[1.0]"]) == 2
    assert "one number per loss_type ['sigmoid', 'sft']" in capsys.readouterr().err
    os.remove("pairs.jsonl")


def test_dpo_with_its_nll_term_trains_and_records_both_types(work) -> None:
    args = ["train", "--method", "dpo", "--data.train", "pairs.jsonl", *COMMON, *PREFERENCE]
    args += ["--training_config.loss_type", "[sigmoid, sft]", "--training_config.loss_weights", "[1.0, 0.5]"]
    assert main([*args, "--training_config.output_dir", "rpo"]) == 0
    recorded = yaml.safe_load(Path("rpo/lorafit_run.yaml").read_text())["training_config"]
    assert recorded["loss_type"] == ["sigmoid", "sft"] and recorded["loss_weights"] == [1.0, 0.5]
    first = metrics(Path("rpo"))[0]
    # at step 1 the policy is the reference: DPO's term is log 2, the NLL term is what remains
    assert first["loss"] > math.log(2) + 0.1


def test_dpo_from_an_sft_adapter_resumes_exactly(work) -> None:
    """Killed after checkpoint-2 and resumed: the same adapter, bit for bit, as the run never
    stopped (the reference is the SFT adapter as loaded, not the checkpoint's)."""
    import shutil

    assert main(["train", *COMMON, *SFT, "--training_config.output_dir", "sft"]) == 0
    pairs = str(work / "pairs.jsonl")
    args = ["train", "--method", "dpo", "--data.train", pairs, "--adapter", "sft", *COMMON, *PREFERENCE]
    assert main([*args, "--training_config.max_steps", "4", "--training_config.output_dir", "whole"]) == 0
    shutil.copytree(work / "whole", work / "cut")
    shutil.rmtree(work / "cut" / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (work / "cut" / name).unlink()
    os.chdir(work / "cut")  # the run's config names the SFT adapter by its absolute path: found from here
    assert main(["train", "--resume", str(work / "cut")]) == 0
    whole, cut = adapter_tensors(work / "whole"), adapter_tensors(work / "cut")
    assert whole.keys() == cut.keys()
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_precomputed_reference_log_probs_train_the_same(work, method) -> None:
    """One reference pass before training, or a reference pass per step: the same losses (KTO's
    mismatched pairs included: the pass sees the training batches)."""
    data = "kto.jsonl" if method == "kto" else "pairs.jsonl"
    losses = {}
    for precompute in ("false", "true"):
        out = f"{method}-{precompute}"
        args = ["train", "--method", method, "--data.train", data, *COMMON, *PREFERENCE]
        args += [
            "--training_config.precompute_ref_log_probs",
            precompute,
            "--training_config.output_dir",
            out,
        ]
        assert main(args) == 0
        losses[precompute] = [row["loss"] for row in metrics(work / out) if "loss" in row]
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-6)


def test_run_files_show_pairs_and_rewards(work) -> None:
    """samples.md answers eval prompts before and after with chosen and rejected beside them;
    metrics.jsonl carries the rewards; loss.png gets the rewards panel beside the loss."""
    import matplotlib.image

    write_jsonl(work / "eval.jsonl", PAIRS[2:])
    args = ["train", "--method", "dpo", "--data.train", "pairs.jsonl", "--data.eval", "eval.jsonl", *COMMON]
    args += [*PREFERENCE, "--data.eval_prompts", "2", "--training_config.eval_strategy", "steps"]
    assert main([*args, "--training_config.eval_steps", "1", "--training_config.output_dir", "run"]) == 0
    samples = (work / "run" / "samples.md").read_text()
    for pair in PAIRS[2:]:
        assert f"## {PAIRS.index(pair) - 1}. {pair['prompt']}" in samples
        assert f"**chosen:** {pair['chosen']}" in samples and f"**rejected:** {pair['rejected']}" in samples
    assert samples.count("**before:**") == 2 and samples.count("**after:**") == 2
    assert "(not run" not in samples
    rows = metrics(work / "run")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert any(key in row for row in rows) and any(f"eval_{key}" in row for row in rows)
    height, width = matplotlib.image.imread(work / "run" / "loss.png").shape[:2]
    assert (width, height) == (1200, 400)  # two panels: the loss and the rewards


def test_kto_samples_show_desirable_completions_only(work) -> None:
    args = ["train", "--method", "kto", "--data.train", "kto.jsonl", "--data.eval", "kto.jsonl", *COMMON]
    args += [*PREFERENCE, "--data.eval_prompts", "2", "--training_config.max_steps", "1"]
    assert main([*args, "--training_config.output_dir", "run"]) == 0
    samples = (work / "run" / "samples.md").read_text()
    for pair in PAIRS[:2]:  # the first two records with label true: each pair's chosen answer
        assert f"**desirable:** {pair['chosen']}" in samples
    assert "**rejected:**" not in samples and PAIRS[0]["rejected"] not in samples
