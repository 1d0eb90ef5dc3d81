"""lorafit bench --method dpo|orpo: lorafit against TRL's preference trainers through the CLI.

As for the SFT bench, nothing here checks a speed (the quick model is tiny); the checks are that
both sides run, the report holds the figures the full bench prints, and both start from the
same loss: with the adapter's B at zero the policy is the reference, so DPO's first loss is
-log sigmoid(0) = log 2 on each side.
"""

from __future__ import annotations

import json
import math

import pytest

from lorafit.bench.preference import preference_settings, write_pairs
from lorafit.cli import main


def test_quick_dpo_bench_runs_both_sides_through_the_cli(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "--method", "dpo", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report-dpo.json").read_text())
    summary = report["summary"]
    for side in ("lorafit", "trl"):
        (run,) = report["runs"][side]
        assert run["tokens_per_s"] > 0 and run["peak_rss_mb"] > 0
        assert run["losses"][0] == pytest.approx(math.log(2), abs=1e-3)
        assert summary[side]["tokens_per_s"] == run["tokens_per_s"]
    assert summary["ratio"]["tokens_per_s"] == pytest.approx(
        summary["lorafit"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
    )
    assert summary["ratio"]["peak_rss"] > 0
    printed = capsys.readouterr().out
    assert "lorafit dpo run 0:" in printed and "trl dpo run 0:" in printed


def test_options_of_the_sft_bench_are_refused_with_a_method(tmp_path, capsys) -> None:
    assert main(["bench", "--method", "orpo", "--trl", "packing", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--trl: options of the SFT bench; --method orpo" in err
    with pytest.raises(SystemExit):
        main(["bench", "--method", "dop", "--out", str(tmp_path)])
    assert "invalid choice: 'dop'" in capsys.readouterr().err


def test_preference_settings_defaults_and_options() -> None:
    settings, pairs = preference_settings()
    assert (settings.steps, settings.warmup, settings.repeats) == (8, 2, 2)
    assert (settings.batch_size, settings.max_length, pairs, settings.conversations) == (4, 512, 200, 201)
    settings, pairs = preference_settings(quick=True, steps=5, max_length=96)
    assert settings.quick and (settings.steps, settings.max_length, settings.repeats) == (5, 96, 1)
    assert settings.conversations == pairs + 1


def test_pairs_take_the_next_chats_answer_as_rejected(tmp_path) -> None:
    chats = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(4)
    ]
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    path = write_pairs({"train": str(source)}, tmp_path, 3)
    records = [json.loads(line) for line in open(path)]
    assert len(records) == 3
    assert records[1] == {
        "prompt": [{"role": "user", "content": "q1"}],
        "chosen": [{"role": "assistant", "content": "a1"}],
        "rejected": [{"role": "assistant", "content": "a2"}],
    }
