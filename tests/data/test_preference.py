"""Preference data: TRL's formats detected, answer tokens by position, TRL's truncation, bad records."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lorafit.constants import IGNORE_INDEX
from lorafit.data.preference import (
    PreferenceCollator,
    build_preference_split,
    preference_format,
    to_preference,
    tokenize_preference,
)
from lorafit.data.read import Record
from lorafit.errors import LorafitError
from lorafit.methods import METHOD_KEYS, UNSUPPORTED

from chat_data import write_jsonl

USER = {"role": "user", "content": "What is two plus two?"}
GOOD = {"role": "assistant", "content": "Two plus two is four."}
BAD = {"role": "assistant", "content": "It is five."}
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Be brief."}


def record(data: dict, where: str = "pairs.jsonl line 3") -> Record:
    return Record(data, where)


def answer_tokens(ids: list[int], labels: list[int]) -> list[int]:
    return [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


@pytest.mark.parametrize(
    "data,fmt",
    [
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "preference"),
        ({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "implicit_preference"),
        ({"prompt": "q", "completion": "a", "label": True}, "unpaired_preference"),
        ({"messages": [USER, GOOD]}, None),
    ],
)
def test_formats_are_detected_from_the_fields(data, fmt) -> None:
    assert preference_format(data) == fmt


def test_standard_conversational_and_implicit_forms_give_the_same_conversations() -> None:
    texts = {"prompt": USER["content"], "chosen": GOOD["content"], "rejected": BAD["content"]}
    strings = to_preference(record({**texts, "system": SYSTEM["content"]}), "dpo")
    lists = to_preference(record({"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]}), "dpo")
    implicit = to_preference(record({"chosen": [SYSTEM, USER, GOOD], "rejected": [SYSTEM, USER, BAD]}), "dpo")
    for converted in (strings, lists, implicit):
        assert converted.prompt == [SYSTEM, USER]
        assert converted.chosen == [GOOD] and converted.rejected == [BAD]


def test_multi_turn_prompt_labels_only_the_final_answer(chatml_tokenizer) -> None:
    earlier = {"role": "assistant", "content": "Hello there! How are you today?"}
    prompt = [SYSTEM, {"role": "user", "content": "Hello"}, earlier, USER]
    converted = to_preference(record({"prompt": prompt, "chosen": [GOOD], "rejected": [BAD]}), "dpo")
    example, status = tokenize_preference(chatml_tokenizer, converted, max_length=512)
    assert status == "ok"
    chosen = chatml_tokenizer.decode(answer_tokens(example["chosen_input_ids"], example["chosen_labels"]))
    rejected = chatml_tokenizer.decode(
        answer_tokens(example["rejected_input_ids"], example["rejected_labels"])
    )
    assert chosen == GOOD["content"] + "<|im_end|>"  # content + end-of-turn, as SFT labels an answer
    assert rejected == BAD["content"] + "<|im_end|>"
    assert "How are you" in chatml_tokenizer.decode(example["chosen_input_ids"])  # earlier turn: context only


@pytest.mark.parametrize("family", ["phi3", "chatml", "llama3", "llama2"])
def test_answer_mask_comes_from_positions_in_each_template(make_tokenizer, family) -> None:
    from chat_data import END_OF_TURN

    tokenizer = make_tokenizer(family)
    converted = to_preference(record({"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]}), "dpo")
    example, _ = tokenize_preference(tokenizer, converted, max_length=512)
    text = tokenizer.decode(answer_tokens(example["chosen_input_ids"], example["chosen_labels"]))
    assert text.strip().startswith(GOOD["content"])
    assert text.rstrip().endswith(END_OF_TURN[family].strip())


def test_prompt_tokens_are_trls(chatml_tokenizer) -> None:
    """TRL 1.16 tokenises the prompt with the generation prompt: lorafit's prompt is the same tokens.
    (TRL's completion also takes the template's text after the end-of-turn token, the newline after
    ``<|im_end|>``; lorafit labels the answer as SFT does: content and end-of-turn token.)"""
    from trl.trainer.dpo_trainer import _tokenize

    converted = to_preference(record({"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]}), "dpo")
    example, _ = tokenize_preference(chatml_tokenizer, converted, max_length=512)
    trl_prompt = _tokenize(chatml_tokenizer, [SYSTEM, USER], add_generation_prompt=True)["input_ids"]
    start = next(i for i, label in enumerate(example["chosen_labels"]) if label != IGNORE_INDEX)
    assert example["chosen_input_ids"][:start] == list(trl_prompt)
    trl_full = _tokenize(chatml_tokenizer, [SYSTEM, USER, GOOD])["input_ids"]
    assert list(trl_full[: len(example["chosen_input_ids"])]) == example["chosen_input_ids"]


def test_truncation_keeps_start_or_end_as_trl_and_drop_counts(chatml_tokenizer) -> None:
    long = {"role": "assistant", "content": "Two plus two is four. " * 20}
    converted = to_preference(record({"prompt": [USER], "chosen": [long], "rejected": [BAD]}), "dpo")
    full, _ = tokenize_preference(chatml_tokenizer, converted, max_length=4096)
    n = 40
    start, status = tokenize_preference(
        chatml_tokenizer, converted, max_length=n, truncation_mode="keep_start"
    )
    assert status == "truncated"
    assert start["chosen_input_ids"] == full["chosen_input_ids"][:n]
    assert start["rejected_input_ids"] == full["rejected_input_ids"]  # only the long sequence is cut
    end, _ = tokenize_preference(chatml_tokenizer, converted, max_length=n, truncation_mode="keep_end")
    assert end["chosen_input_ids"] == full["chosen_input_ids"][-n:]
    dropped, status = tokenize_preference(chatml_tokenizer, converted, max_length=n, overlong="drop")
    assert dropped is None and status == "too_long"
    # a prompt that fills max_length leaves no answer under keep_start: the pair is dropped (TRL's filter)
    prompt_len = full["chosen_labels"].index(next(x for x in full["chosen_labels"] if x != IGNORE_INDEX))
    none, status = tokenize_preference(chatml_tokenizer, converted, max_length=prompt_len)
    assert none is None and status == "too_long"


@pytest.mark.parametrize(
    "data,field",
    [
        ({"prompt": "q", "chosen": "a"}, "'rejected'"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "'rejected'"),
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "'chosen'"),
        (
            {"prompt": [USER], "chosen": [{"role": "assistant", "content": ""}], "rejected": [BAD]},
            "chosen[0]",
        ),
    ],
)
def test_bad_pairs_name_file_line_and_field(data, field) -> None:
    with pytest.raises(LorafitError) as e:
        to_preference(record(data), "dpo")
    assert str(e.value).startswith("pairs.jsonl line 3:") and field in str(e.value)


@pytest.mark.parametrize("label", ["yes", 1, None])
def test_kto_label_must_be_a_bool(label) -> None:
    with pytest.raises(LorafitError, match=r"pairs.jsonl line 3: field 'label' is"):
        to_preference(record({"prompt": "q", "completion": "a", "label": label}), "kto")


def test_method_and_format_must_agree() -> None:
    with pytest.raises(LorafitError, match="method kto needs the fields prompt \\+ completion \\+ label"):
        to_preference(record({"prompt": "q", "chosen": "a", "rejected": "b"}), "kto")
    with pytest.raises(LorafitError, match="missing field 'rejected' \\(did you mean 'rejectd'"):
        to_preference(record({"prompt": "q", "chosen": "a", "rejectd": "b"}), "dpo")


def test_bad_records_stop_the_run_or_are_skipped_and_counted(tmp_path, chatml_tokenizer) -> None:
    rows = [
        {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."},
        {"prompt": "Hello", "chosen": "Hi there."},  # no rejected
        {"prompt": "Hello", "chosen": "Hi.", "rejected": "Hi."},  # the same answer
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(LorafitError, match=r"pairs.jsonl line 2: missing field 'rejected'"):
        build_preference_split(chatml_tokenizer, path, method="dpo", max_length=256)
    examples, stats = build_preference_split(
        chatml_tokenizer, path, method="dpo", max_length=256, skip_bad_records=True
    )
    assert len(examples) == 1 and stats["bad_records"] == 3
    assert [b.where.split("/")[-1] for b in stats["bad"]] == [f"pairs.jsonl line {n}" for n in (2, 3, 4)]


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_tokenised_pairs_are_cached_by_content_tokenizer_method_and_lengths(
    tmp_path, chatml_tokenizer, make_tokenizer, monkeypatch, method
) -> None:
    """A second build with the same records, tokenizer, method and settings reads the examples
    back (without templating a record) and equals the first; any of them changed, it misses.
    Bad records (skipped) are named where they are now, even when the file has moved."""
    import lorafit.data.preference as preference

    prompts = [f"Question {i}: what is two plus two?" for i in range(4)]
    if method == "kto":
        rows = [
            {"prompt": p, "completion": "Four, surely.", "label": i % 2 == 0} for i, p in enumerate(prompts)
        ]
        bad = {"prompt": "Hello", "completion": "Hi.", "label": "yes"}  # not a bool
    else:
        rows = [{"prompt": p, "chosen": "Four, surely.", "rejected": "Five."} for p in prompts]
        bad = {"prompt": "Hello", "chosen": "Hi.", "rejected": "Hi."}  # the same answer
    path = write_jsonl(tmp_path / "pairs.jsonl", [*rows[:2], bad, *rows[2:]])
    cache = tmp_path / "cache"

    def build(source=path, tokenizer=chatml_tokenizer, **settings):
        settings = {"method": method, "max_length": 256, "skip_bad_records": True, **settings}
        return build_preference_split(tokenizer, source, cache_dir=cache, **settings)

    examples, stats = build()
    assert stats["cache_hit"] is False and len(list((cache / "tokenized").glob("*.safetensors"))) == 1
    real = preference.tokenize_preference
    monkeypatch.setattr(preference, "tokenize_preference", lambda *a, **k: pytest.fail("tokenised again"))
    again, again_stats = build()
    assert again_stats["cache_hit"] is True
    assert again == examples  # the same ints and bools, field by field
    assert json.dumps(again, sort_keys=True) == json.dumps(examples, sort_keys=True)  # the run's fingerprint
    assert {k: v for k, v in again_stats.items() if k != "cache_hit"} == {
        k: v for k, v in stats.items() if k != "cache_hit"
    }
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(Path(path).read_bytes())
    _, moved_stats = build(moved)
    assert moved_stats["cache_hit"] and [b.where for b in moved_stats["bad"]] == [f"{moved} line 3"]

    monkeypatch.setattr(preference, "tokenize_preference", real)
    for changed in (
        {"max_length": max(len(e.get("input_ids", e.get("chosen_input_ids"))) for e in examples) - 1},  # cuts
        {"truncation_mode": "keep_end"},
        {"overlong": "drop"},
        {"skip_bad_records": False, "source": write_jsonl(tmp_path / "good.jsonl", rows)},  # no bad record
        {"tokenizer": make_tokenizer("llama3")},
        *([{"method": "orpo"}] if method == "dpo" else []),  # the same pairs, another method
    ):
        _, changed_stats = build(**changed)
        assert changed_stats["cache_hit"] is False, changed
        assert changed_stats["truncated"] > 0 or "max_length" not in changed
    assert len(list((cache / "tokenized").glob("*.safetensors"))) == 1 + 6 - (method == "kto")


def test_plain_text_pairs_without_a_chat_template(chatml_tokenizer) -> None:
    """No chat template: TRL's text rows, prompt + answer + eos, the answer after the prompt's tokens."""
    chatml_tokenizer.chat_template = None
    converted = to_preference(
        record({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}), "dpo"
    )
    example, _ = tokenize_preference(chatml_tokenizer, converted, max_length=256)
    answer = chatml_tokenizer.decode(answer_tokens(example["chosen_input_ids"], example["chosen_labels"]))
    assert answer.endswith(chatml_tokenizer.eos_token) and "blue" in answer and "sky" not in answer


def test_collator_packs_a_batch_into_one_row_without_padding() -> None:
    examples = [
        {"chosen_input_ids": [5, 6, 7], "chosen_labels": [-100, -100, 7],
         "rejected_input_ids": [5, 6, 8, 9], "rejected_labels": [-100, -100, 8, 9]},
        {"chosen_input_ids": [3, 4], "chosen_labels": [-100, 4],
         "rejected_input_ids": [3, 1], "rejected_labels": [-100, 1]},
    ]  # fmt: skip
    batch = PreferenceCollator(pad_token_id=0, example_boundaries=True)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3, 4, 5, 6, 8, 9, 3, 1]]  # chosen of both, then rejected
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 11]


def test_kto_collator_builds_trls_mismatched_kl_rows() -> None:
    examples = [
        {"input_ids": [1, 2, 3], "labels": [-100, -100, 3], "prompt_length": 2, "label": True},
        {"input_ids": [4, 5, 6, 7], "labels": [-100, 5, 6, 7], "prompt_length": 1, "label": False},
    ]
    batch = PreferenceCollator(pad_token_id=0)(examples)
    # prompt i with completion i - 1: (x1, y2), (x2, y1)
    assert batch["kl_input_ids"].tolist() == [[1, 2, 5, 6, 7, 4, 3]]
    assert batch["kl_labels"].tolist() == [[-100, -100, 5, 6, 7, -100, 3]]
    assert batch["label"].tolist() == [True, False]


def test_method_keys_are_spelled_as_the_installed_trl() -> None:
    from trl import DPOConfig, KTOConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    configs = {"dpo": DPOConfig, "orpo": ORPOConfig, "simpo": CPOConfig, "kto": KTOConfig}
    for method, config in configs.items():
        fields = {f.name for f in dataclasses.fields(config)}
        assert set(METHOD_KEYS[method]) <= fields, method
    every = set().union(*({f.name for f in dataclasses.fields(c)} for c in configs.values()))
    assert set(UNSUPPORTED) - {"max_prompt_length"} <= every
    json.dumps(METHOD_KEYS["dpo"], default=str)  # plain data
