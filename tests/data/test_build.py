"""lorafit.data.build: the whole flow with stats, splits and the cache; bad records at scale; fuzzing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafit import data
from lorafit.data import (
    IGNORE_INDEX,
    PackedDataset,
    TokenizedDataset,
    build_datasets,
    collator_for,
    prepare_tokenizer,
    read_records,
)
from lorafit.errors import LorafitError

from chat_data import chat_rows, write_jsonl


def test_build_datasets_stats_and_cache_hit(phi3_tokenizer, tmp_path, lorafit_cache, monkeypatch):
    prepare_tokenizer(phi3_tokenizer)
    rows = chat_rows(20) + [
        {"messages": [{"role": "user", "content": "Hi! " * 80}, {"role": "assistant", "content": "ok"}]}
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    settings_ = {"train": path, "max_length": 128, "eval_fraction": 0.2, "seed": 3}

    train, evaluation, stats = build_datasets(phi3_tokenizer, **settings_)
    assert stats["records"] + stats["eval"]["records"] == 21 and stats["eval"]["records"] == 4
    assert stats["format"] == "messages" and stats["cache_hit"] is False
    both = [stats, stats["eval"]]
    # the long user turn leaves no assistant token after truncation, wherever the split put it
    assert sum(s["dropped_no_assistant"] for s in both) == 1 and sum(s["truncated"] for s in both) == 0
    assert stats["examples"] == stats["records"] - stats["dropped_no_assistant"]
    assert stats["tokens"] == int(train.examples.lengths.sum())
    assert stats["label_tokens"] == int((train.examples.labels != IGNORE_INDEX).sum())
    assert stats["packed_rows"] == len(train) and 0.5 < stats["packing_efficiency"] <= 1
    assert isinstance(evaluation, PackedDataset)
    assert len(list((lorafit_cache / "tokenized").glob("*.safetensors"))) == 2

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(data.build, "_tokenize_records", no_tokenising)
    train2, _, stats2 = build_datasets(phi3_tokenizer, **settings_)
    assert stats2["cache_hit"] is True and stats2["eval"]["cache_hit"] is True
    assert {k: v for k, v in stats2.items() if k not in ("cache_hit", "eval")} == {
        k: v for k, v in stats.items() if k not in ("cache_hit", "eval")
    }
    assert [train2[i] for i in range(len(train2))] == [train[i] for i in range(len(train))]
    # other settings or other file contents miss the cache
    with pytest.raises(AssertionError, match="tokenised again"):
        build_datasets(phi3_tokenizer, **{**settings_, "max_length": 120})
    write_jsonl(tmp_path / "train.jsonl", rows[:-1])
    with pytest.raises(AssertionError, match="tokenised again"):
        build_datasets(phi3_tokenizer, **settings_)


def test_build_datasets_unpacked_with_eval_file_and_text(chatml_tokenizer, tmp_path, lorafit_cache):
    prepare_tokenizer(chatml_tokenizer, pad_token="<|endoftext|>")
    train_path = write_jsonl(tmp_path / "train.jsonl", chat_rows(6))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"text": "The sky is blue."}, {"text": "Cats sleep."}])
    train, evaluation, stats = build_datasets(
        chatml_tokenizer, train=train_path, eval=eval_path, packing=False
    )
    assert isinstance(train, TokenizedDataset) and len(train) == 6
    assert stats["packed_rows"] is None and stats["eval"]["format"] == "text"
    batch = collator_for(chatml_tokenizer, packing=False)([train[0], train[1]])
    assert batch.keys() == {"input_ids", "attention_mask", "labels"}
    assert [chatml_tokenizer.decode(e["input_ids"]) for e in evaluation] == [
        "The sky is blue.<|im_end|>",
        "Cats sleep.<|im_end|>",
    ]


def test_build_datasets_setting_errors(phi3_tokenizer, tmp_path, lorafit_cache):
    path = write_jsonl(tmp_path / "train.jsonl", chat_rows(3))
    with pytest.raises(LorafitError, match="data.format: 'sharegtp' \\(did you mean 'sharegpt'"):
        build_datasets(phi3_tokenizer, train=path, format="sharegtp")
    with pytest.raises(LorafitError, match="eval and eval_fraction are both set"):
        build_datasets(phi3_tokenizer, train=path, eval=path, eval_fraction=0.1)
    with pytest.raises(LorafitError, match="eval_split: 'test' needs an hf:NAME train source"):
        build_datasets(phi3_tokenizer, train=path, eval_split="test")
    with pytest.raises(LorafitError, match="eval_fraction: 1.5; expected a number between 0 and 1"):
        build_datasets(phi3_tokenizer, train=path, eval_fraction=1.5)
    with pytest.raises(
        LorafitError, match="data.train: no example left out of 3 records \\(3 longer than max_length 4"
    ):
        build_datasets(phi3_tokenizer, train=path, max_length=4, overlong="drop")
    with pytest.raises(
        LorafitError, match=r"train\.jsonl line 1: missing field 'conversations' for format sharegpt"
    ):
        build_datasets(phi3_tokenizer, train=path, format="sharegpt")


def test_build_datasets_eval_split_from_hf(phi3_tokenizer, tmp_path, lorafit_cache, hf_cache):
    folder = tmp_path / "hfdata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", chat_rows(4))
    write_jsonl(folder / "test.jsonl", chat_rows(2, seed=1))
    train, evaluation, stats = build_datasets(phi3_tokenizer, train=f"hf:{folder}", eval_split="test")
    assert stats["records"] == 4 and stats["eval"]["records"] == 2


def demo_tokenizer():
    from lorafit.demo import load_demo_tokenizer

    return prepare_tokenizer(load_demo_tokenizer())


def test_bad_records_stop_at_the_first_in_file_order_or_are_skipped(broken_dataset, tmp_path, lorafit_cache):
    tokenizer = demo_tokenizer()
    path, broken = broken_dataset(tmp_path / "big.jsonl", records=2000)
    first = min(broken)
    settings_ = {"train": path, "max_length": 256, "overlong": "drop", "progress": False}
    for extra in ({}, {"eval_fraction": 0.1}):
        with pytest.raises(LorafitError) as error:
            build_datasets(tokenizer, **settings_, **extra)
        assert str(error.value).startswith(f"{path} line {first}: {broken[first][1]}")

    train, _, stats = build_datasets(tokenizer, **settings_, skip_bad_records=True)
    skipped = {int(row["where"].rsplit(" ", 1)[1]): row["reason"] for row in stats["skipped"]}
    assert skipped.keys() == broken.keys()
    assert all(reason.startswith(broken[line][1]) for line, reason in skipped.items())
    assert stats["records"] == 2000 and stats["examples"] == 2000 - len(broken)
    assert stats["bad_records"] == len(broken) - stats["dropped_too_long"] and stats["dropped_too_long"] >= 1
    # the cache keeps the report: a second build lists the same records without tokenising
    _, _, again = build_datasets(tokenizer, **settings_, skip_bad_records=True)
    assert again["cache_hit"] and again["skipped"] == stats["skipped"]


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    # JSON allows U+2028 and U+0085 raw inside strings; str.splitlines() would cut the line there
    text = "first\u2028second\u0085third\x0cfourth"
    path = tmp_path / "train.jsonl"
    first = json.dumps({"text": text}, ensure_ascii=False)
    path.write_text(first + "\r\n" + json.dumps({"text": "b"}) + "\n", encoding="utf-8")
    assert [r.data["text"] for r in read_records(path)] == [text, "b"]
    assert read_records(path)[1].where.endswith("line 2")


def test_one_template_failure_is_skipped_not_its_whole_chunk(chatml_tokenizer, tmp_path, lorafit_cache):
    prepare_tokenizer(chatml_tokenizer, pad_token="<|endoftext|>")
    # a template that refuses one conversation, as real templates raise on what they do not support
    chatml_tokenizer.chat_template = (
        "{% for message in messages %}"
        "{% if 'forbidden' in message['content'] %}{{ raise_exception('no forbidden words') }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    rows = chat_rows(6)
    rows[3]["messages"][1]["content"] = "a forbidden answer"
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(LorafitError, match=r"train\.jsonl line 4: the tokenizer's chat template failed"):
        build_datasets(chatml_tokenizer, train=path, progress=False)
    train, _, stats = build_datasets(chatml_tokenizer, train=path, skip_bad_records=True, progress=False)
    assert [row["where"] for row in stats["skipped"]] == [f"{path} line 4"]
    assert stats["examples"] == 5 and stats["bad_records"] == 1


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_turn = st.dictionaries(
    st.sampled_from(["role", "content", "from", "value", "rol"]),
    st.sampled_from(["user", "assistant", "system", "gpt", "human", "robot", "", " "])
    | st.text(max_size=20)
    | _json,
    max_size=3,
)
_record = st.dictionaries(
    st.sampled_from(
        ["messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text"]
        + ["system"]
    ),
    st.lists(_turn, max_size=4) | st.text(max_size=30) | _json,
    max_size=4,
)
_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)
_good = st.one_of(
    st.lists(st.tuples(_text, _text), min_size=1, max_size=3).map(
        lambda turns: {
            "messages": [
                {"role": role, "content": text}
                for user, assistant in turns
                for role, text in (("user", user), ("assistant", assistant))
            ]
        }
    ),
    st.builds(lambda text: {"text": text}, _text),
    st.builds(lambda i, o: {"instruction": i, "output": o}, _text, _text),
)
_line = st.one_of(
    # plausible records three times as often as junk, so that tokenising and packing run too
    *[_good.map(lambda r: json.dumps(r).encode())] * 3,
    _record.map(lambda r: json.dumps(r).encode()),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
_FUZZ_TOKENIZER = None


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(_line, max_size=6),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]),
    as_array=st.booleans(),
    skip=st.booleans(),
)
def test_fuzz_reader_ends_in_a_dataset_or_a_lorafit_error(lines, suffix, as_array, skip):
    import tempfile

    global _FUZZ_TOKENIZER
    _FUZZ_TOKENIZER = _FUZZ_TOKENIZER or demo_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        content = b"\n".join(lines)
        path.write_bytes(b"[" + b",".join(lines) + b"]" if as_array and suffix == ".json" else content)
        try:
            train, _, stats = build_datasets(
                _FUZZ_TOKENIZER,
                train=path,
                max_length=64,
                skip_bad_records=skip,
                cache_dir=Path(folder) / "cache",
                progress=False,
            )
        except LorafitError as e:
            assert str(e).strip() and "\n" not in str(e).strip().split("\n")[0]
            return
    assert len(train) > 0 and stats["examples"] > 0
    assert all(row["where"] and row["reason"] for row in stats["skipped"])
    if not skip:
        assert stats["bad_records"] == 0
