"""``lorafit data`` on preference files: counts and lengths per side, what max_length costs
(truncated sequences, dropped pairs, answer tokens lost), the pairs shown with their answer
tokens marked, and every bad record named by file, line and field."""

from __future__ import annotations

import json

from lorafit.cli import main
from lorafit.constants import IGNORE_INDEX
from lorafit.data.preference import build_preference_split, to_preference, tokenize_preference
from lorafit.data.preference_report import analyse_preference, is_preference_file, print_preference_report
from lorafit.data.read import Record

from chat_data import write_jsonl

PAIRS = [
    {
        "prompt": "What is two plus two?",
        "chosen": "Four.",
        "rejected": "It is five, or maybe six, I am not sure.",
    },
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Loud."},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
        "chosen": [{"role": "assistant", "content": "Hi."}],
        "rejected": [{"role": "assistant", "content": "I will not say anything at all to you today."}],
    },
]


def test_counts_and_lengths_match_what_training_builds(chatml_tokenizer, tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, PAIRS)
    assert is_preference_file(path)
    max_length = 40  # the long rejected answers get cut (keep_start); every prompt fits
    report = analyse_preference(chatml_tokenizer, path, max_length=max_length)
    examples, stats = build_preference_split(chatml_tokenizer, str(path), method="dpo", max_length=max_length)
    s = report.stats
    assert report.method == "dpo" and report.format == "preference" and not report.errors
    assert (s["examples"], s["truncated"], s["dropped"]) == (stats["examples"], stats["truncated"], 0)
    assert s["truncated"] >= 1 and s["sides"]["chosen"]["truncated"] == 0
    assert s["sides"]["rejected"]["truncated"] == s["truncated"]
    assert s["tokens"] == stats["tokens"]
    trained = sum(
        sum(1 for x in e[f"{side}_labels"] if x != IGNORE_INDEX)
        for e in examples
        for side in ("chosen", "rejected")
    )
    assert s["answer_all"] - s["answer_lost"] == trained and s["answer_lost"] > 0
    # the per-side answer lengths are the untruncated label counts, the prompts' their own
    for pair, example, prompt_length in zip(PAIRS, report.examples, s["prompt_tokens"], strict=True):
        converted = to_preference(Record(pair, "x"), "dpo")
        untruncated, _ = tokenize_preference(chatml_tokenizer, converted, max_length=10_000)
        chosen = untruncated["chosen_labels"]
        assert prompt_length == next(i for i, x in enumerate(chosen) if x != IGNORE_INDEX)
        assert example.sequences["chosen"].ids == untruncated["chosen_input_ids"]


def test_printed_report_shows_pairs_and_truncation(chatml_tokenizer, tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, PAIRS)
    lines: list[str] = []
    report = analyse_preference(chatml_tokenizer, path, max_length=40)
    print_preference_report(report, chatml_tokenizer, show=1, echo=lines.append)
    text = "\n".join(lines)
    assert "format: preference (method dpo)   records: 3   pairs: 3" in text
    rejected = report.stats["sides"]["rejected"]["truncated"]
    assert f"sequences truncated: chosen 0, rejected {rejected}" in text
    assert f"--- {path} line 1 chosen (answer tokens in [[ ]]) ---" in text
    assert "[[Four.<|im_end|>]]" in text and "[[It is five" in text and "no problems found" in text


def test_every_bad_record_is_named_and_the_command_fails(tmp_path, capsys) -> None:
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(PAIRS[0]), json.dumps({"prompt": "Hi?", "chosen": "Hello."})]
    lines += [json.dumps({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}), "{not json"]
    path.write_text("\n".join(lines) + "\n")
    assert main(["data", str(path), "--model", "lorafit-demo"]) == 1
    out = capsys.readouterr().out
    assert "records: 4   pairs: 1" in out and "error: bad record (3 records)" in out
    assert f"{path} line 2: missing field 'rejected'" in out
    assert f"{path} line 3: field 'rejected' is the same answer as 'chosen'" in out
    assert f"{path} line 4: not valid JSON" in out
    assert "--skip-bad-records trains on the rest" in out


def test_kto_records_report_labels_and_the_completion_side(chatml_tokenizer, tmp_path) -> None:
    path = tmp_path / "kto.jsonl"
    write_jsonl(path, [{"prompt": "Hi?", "completion": "Hello.", "label": True}])
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": "Hi?", "completion": "Go.", "label": False}) + "\n")
        f.write(json.dumps({"prompt": "Hi?", "completion": "Go.", "label": "no"}) + "\n")
    report = analyse_preference(chatml_tokenizer, path, max_length=64)
    assert report.method == "kto" and report.format == "unpaired_preference"
    assert (report.stats["desirable"], report.stats["undesirable"]) == (1, 1)
    assert list(report.stats["sides"]) == ["completion"]
    (error,) = report.errors
    assert error.where == f"{path} line 3" and "field 'label' is 'no'" in error.message


def test_overlong_drop_and_a_prompt_filling_max_length_drop_pairs(chatml_tokenizer, tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, PAIRS)
    dropped = analyse_preference(chatml_tokenizer, path, max_length=40, overlong="drop").stats
    kept = analyse_preference(chatml_tokenizer, path, max_length=40).stats
    assert dropped["dropped"] == kept["truncated"] and dropped["truncated"] == 0
    tiny = analyse_preference(chatml_tokenizer, path, max_length=4).stats  # every prompt fills 4 tokens
    assert tiny["dropped"] == 3 and tiny["examples"] == 0
