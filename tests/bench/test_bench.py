"""lorafit bench: the quick benchmark end to end through the CLI, and its pieces.

Nothing here checks a speed: the quick run's figures mean nothing on a tiny model. The checks are
that both sides train on the same tokens and report what the full benchmark reports.
"""

from __future__ import annotations

import json

import pytest

from lorafit.bench import parity, settings, workload
from lorafit.bench.report import summarise
from lorafit.cli import main
from lorafit.data import to_messages


def test_quick_bench_runs_both_sides_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0
    assert (out / "bench.txt").read_text() == report["text"] + "\n"
    printed = capsys.readouterr().out
    assert "lorafit defaults vs PEFT+TRL's fastest (packing)" in printed
    versus = report["summary"]["versus"]["packing"]
    assert (
        versus["speedup"] == pytest.approx(report["summary"]["speedup_vs_fastest_trl"])
        and f"  lorafit defaults vs packing: {versus['speedup']:.2f}x tokens/s" in printed
    )
    assert report["summary"]["lorafit_versus"]["defaults"] == report["summary"]["versus"]

    assert report["parity"]["passed"]
    rows = report["summary"]["configs"]
    assert set(rows) == {"lorafit:defaults", "trl:packing"}
    ours, trl = rows["lorafit:defaults"], rows["trl:packing"]
    steps = report["settings"]["steps"]
    for row in (ours, trl):
        assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0 and len(row["loss"]) == steps
    # the same examples, packed best-fit-decreasing by each side, in the same order
    by_side = {run["side"]: run for run in report["runs"]}
    assert by_side["lorafit"]["step_tokens"] == by_side["trl"]["step_tokens"]
    assert ours["loss"][0] == pytest.approx(trl["loss"][0], abs=0.02)
    assert report["ceiling"]["tokens_per_s"] > 0


def test_unknown_trl_configuration_is_an_error(tmp_path, capsys) -> None:
    assert main(["bench", "--quick", "--trl", "pakcing", "--out", str(tmp_path)]) == 2
    assert "--trl: unknown configuration 'pakcing'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--lorafit", "defaults,laen", "--out", str(tmp_path)]) == 2
    assert "--lorafit: unknown configuration 'laen'" in capsys.readouterr().err
    assert main(["bench", "--size", "phi3-maxi", "--out", str(tmp_path)]) == 2
    assert "--size: unknown size 'phi3-maxi'" in capsys.readouterr().err


def test_phi3_mini_settings(tmp_path, monkeypatch) -> None:
    """Phi-3-mini's published shapes, 1 x 2048 rows of 260-1,900-token chats, the model kept under
    $LORAFIT_CACHE; --layers and --max-length make a labelled cut."""
    full = settings.BenchSettings.from_options(size="phi3-mini")
    assert full.model_sizes == settings.PHI3_MINI and full.model_name == "phi3-mini"
    assert (full.batch_size, full.max_length, full.trl_configs) == (1, 2048, ["packing+checkpointing"])
    assert full.lorafit_configs == ["fast", "lean", "qlora"]
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    assert workload.model_dir(tmp_path, full) == tmp_path / "cache" / "bench" / "phi3-mini-32layers-seed1234"
    lo, hi = workload._words_for_tokens(full)
    tokens = [
        len(
            workload.tokenize_conversation(workload.load_demo_tokenizer(), r["messages"], max_length=10**6)[
                "input_ids"
            ]
        )
        for r in workload.synthetic_conversations(30, 0, (lo, hi))
    ]
    assert 260 <= min(tokens) and max(tokens) <= 1900
    cut = settings.BenchSettings.from_options(size="phi3-mini", layers=2, max_length=512)
    assert (
        cut.model_sizes["num_hidden_layers"] == 2
        and cut.model_name == "phi3-mini (its widths, 2 of 32 layers)"
    )
    assert cut.max_tokens <= 512


def test_synthetic_conversations_are_valid_and_fixed() -> None:
    records = workload.synthetic_conversations(50, seed=3)
    assert records == workload.synthetic_conversations(50, seed=3)
    for record in records:
        messages = to_messages(record, "messages")  # validates roles and order
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "assistant"
    answers = [len(m["content"].split()) for r in records for m in r["messages"] if m["role"] == "assistant"]
    assert min(answers) < 10 < 60 < max(answers)  # short and long answers


def test_flops_per_token_counts_each_product() -> None:
    sizes = {
        "vocab_size": 10,
        "hidden_size": 4,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 6,
    }
    # qkv 4x12, o 4x4, gate_up 4x12, down 6x4, head 4x10
    frozen = 48 + 16 + 48 + 24 + 40
    lora = 2 * ((4 + 12) + (4 + 4) + (4 + 12) + (6 + 4))
    attention = 12 * 1 * 4 * 3.0
    assert parity.flops_per_token(sizes, 2, mean_context=3.0) == 4 * frozen + 6 * lora + attention


def test_summary_ratios_use_trls_fastest_and_leanest() -> None:
    def run(side: str, config: str, tps: float, rss: float) -> dict:
        return {
            "side": side,
            "config": config,
            "tokens_per_s": tps,
            "peak_rss_mb": rss,
            "step_tokens": [100],
            "step_cpu_seconds": [1.0],
            "step_minor_faults": [10],
            "losses": [2.0],
        }

    runs = [
        run("lorafit", "defaults", 900, 1000),
        run("lorafit", "defaults", 1100, 1000),
        run("trl", "packing", 200, 8000),
        run("trl", "padded+checkpointing", 150, 2000),
    ]
    summary = summarise(runs, settings.BenchSettings(warmup=0))
    assert summary["fastest_trl"] == "packing" and summary["leanest_trl"] == "padded+checkpointing"
    assert summary["speedup_vs_fastest_trl"] == pytest.approx(5.0)
    assert summary["memory_vs_fastest_trl"] == pytest.approx(0.125)
    assert summary["memory_vs_leanest_trl"] == pytest.approx(0.5)
