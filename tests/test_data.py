"""lorafit.data: reading, formats, chat-template masks, packing, collation, caching.

The masks are checked on three real chat templates (Phi-3, ChatML, Llama 3) by decoding the
labelled tokens; packing is checked on a tiny real Phi3ForCausalLM, whose packed logits must
equal its per-example logits.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafit import data
from lorafit.data import (
    IGNORE_INDEX,
    PackedCollator,
    PackedDataset,
    PaddedCollator,
    Record,
    TokenizedDataset,
    build_datasets,
    collator_for,
    detect_format,
    pack,
    prepare_tokenizer,
    read_records,
    to_messages,
    to_text,
    tokenize_conversation,
    tokenize_text,
)
from lorafit.errors import LorafitError
from lorafit.models.attention import PACKED_ATTENTION, use_packed_attention

# what each template puts after an assistant answer: all of it is labelled
END_OF_TURN = {"phi3": "<|end|>", "llama2": " </s>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "What about three plus five?"},
    {"role": "assistant", "content": "That is eight."},
]


def labelled_runs(example: dict) -> list[list[int]]:
    """The maximal runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(label)
    return runs + ([current] if current else [])


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` varied multi-turn conversations in the messages format."""
    rng = random.Random(seed)
    words = "the sky is blue cats sleep a lot dogs like to play outside in sun two plus four eight".split()
    rows = []
    for _ in range(n):
        turns = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            turns.append(
                {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 12))) + "?"}
            )
            turns.append(
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 15))) + "."}
            )
        rows.append({"messages": turns})
    return rows


# --------------------------------------------------------------------------------------------
# Assistant-only masks on real chat templates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["phi3", "llama2", "chatml", "llama3"])
def test_mask_is_each_assistant_content_plus_end_of_turn(make_tokenizer, family):
    tokenizer = make_tokenizer(family)
    example = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)

    # the tokens are exactly the tokenizer's own chat template rendering
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]

    runs = [tokenizer.decode(run) for run in labelled_runs(example)]
    eot = END_OF_TURN[family]
    assert runs == [f"Two plus two is four.{eot}", f"That is eight.{eot}"]
    # the system turn, the user turns and every header stay unlabelled
    unlabelled = [
        t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab == IGNORE_INDEX
    ]
    text = tokenizer.decode(unlabelled)
    assert "You are a helpful assistant" in text and "three plus five" in text
    assert "four" not in text and "eight" not in text


def test_mask_ignores_marker_text_inside_user_turns(chatml_tokenizer):
    # A user turn that contains the assistant header as text: a marker search would start the
    # labels there; token positions from the template prefix do not.
    messages = [
        {"role": "user", "content": "Repeat after me: <|im_start|>assistant\nfour"},
        {"role": "assistant", "content": "four"},
    ]
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=512)
    assert [chatml_tokenizer.decode(r) for r in labelled_runs(example)] == ["four<|im_end|>"]


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("chatml", "  Hello there!  <|im_end|>"),
        ("llama3", "Hello there!<|eot_id|>"),  # the template trims content
        ("phi3", "Hello there!  <|end|>"),  # <|assistant|> swallows "\n  " (rstrip), not labelled
    ],
)
def test_mask_follows_whitespace_as_template_and_tokenizer_treat_it(make_tokenizer, family, expected):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "  Hello there!  "}]
    tokenizer = make_tokenizer(family)
    example = tokenize_conversation(tokenizer, messages, max_length=512)
    assert [tokenizer.decode(r) for r in labelled_runs(example)] == [expected]


def test_full_loss_labels_every_token(phi3_tokenizer):
    example = tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=512, assistant_only_loss=False)
    assert example["labels"] == example["input_ids"]
    assert phi3_tokenizer.decode(example["input_ids"]).endswith("That is eight.<|end|><|endoftext|>")


def test_overlong_truncate_and_drop(phi3_tokenizer):
    full = tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=512)
    n = len(full["input_ids"])
    cut = tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=n - 3)
    assert cut["input_ids"] == full["input_ids"][: n - 3] and cut["labels"] == full["labels"][: n - 3]
    assert tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=n - 3, overlong="drop") is None
    assert tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=n, overlong="drop") == full
    # cut before the first assistant token: nothing left to learn
    first_label = next(i for i, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX)
    assert tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=first_label) is None
    with pytest.raises(LorafitError, match="overlong.*truncate, drop"):
        tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=64, overlong="cut")


def test_template_that_rewrites_earlier_turns_is_refused(phi3_tokenizer):
    # renders the last message differently, so messages[:i] + generation prompt is not a prefix
    phi3_tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}"
        "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    with pytest.raises(LorafitError, match="rec 1: the chat template renders turns 0..0.*not a prefix"):
        tokenize_conversation(phi3_tokenizer, CONVERSATION[1:3], max_length=512, where="rec 1")
    # without assistant-only loss no position is needed
    assert tokenize_conversation(phi3_tokenizer, CONVERSATION[1:3], max_length=512, assistant_only_loss=False)


def test_no_chat_template_is_an_error(phi3_tokenizer):
    phi3_tokenizer.chat_template = None
    with pytest.raises(LorafitError, match="no chat template.*format: text"):
        tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=512)


def test_text_format_is_tokens_plus_eos_all_labelled(phi3_tokenizer):
    example = tokenize_text(phi3_tokenizer, "The sky is blue.", max_length=512)
    assert phi3_tokenizer.decode(example["input_ids"]) == "The sky is blue.<|endoftext|>"
    assert example["labels"] == example["input_ids"]
    assert len(tokenize_text(phi3_tokenizer, "The sky is blue.", max_length=3)["input_ids"]) == 3
    assert tokenize_text(phi3_tokenizer, "The sky is blue.", max_length=3, overlong="drop") is None


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------

EXPECTED_CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        ({"messages": EXPECTED_CHAT}, "messages", EXPECTED_CHAT),
        (
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            "sharegpt",
            EXPECTED_CHAT,
        ),
        ({"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca", EXPECTED_CHAT),
        (
            {"instruction": "Translate", "input": "good morning", "output": "Bonjour"},
            "alpaca",
            [
                {"role": "user", "content": "Translate\n\ngood morning"},
                {"role": "assistant", "content": "Bonjour"},
            ],
        ),
        ({"prompt": "Hi", "completion": "Hello"}, "prompt_completion", EXPECTED_CHAT),
        ({"prompt": EXPECTED_CHAT[:1], "completion": EXPECTED_CHAT[1:]}, "prompt_completion", EXPECTED_CHAT),
        (
            {
                "system": "Be brief.",
                "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}],
            },
            "sharegpt",
            [{"role": "system", "content": "Be brief."}, *EXPECTED_CHAT],
        ),
    ],
)
def test_formats_detect_and_convert(row, fmt, expected):
    record = Record(row, "train.jsonl line 1")
    assert detect_format([record]) == fmt
    assert to_messages(record, fmt) == expected


def test_text_format_stays_text():
    record = Record({"text": "The sky is blue."}, "t.jsonl line 1")
    assert detect_format([record]) == "text"
    assert to_text(record) == "The sky is blue."
    with pytest.raises(LorafitError, match="has no messages"):
        to_messages(record, "text")


def test_detect_format_errors():
    with pytest.raises(
        LorafitError, match=r"a.jsonl line 1: cannot tell the format.*'mesages' \(did you mean 'messages'"
    ):
        detect_format([Record({"mesages": []}, "a.jsonl line 1")])
    mixed = [Record({"text": "x"}, "a.jsonl line 1"), Record({"messages": []}, "a.jsonl line 2")]
    with pytest.raises(LorafitError, match="a.jsonl line 2: looks like format 'messages' but a.jsonl line 1"):
        detect_format(mixed)


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        (
            [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}],
            r"messages\[1\]\.role is 'bot'; accepted roles: system, user, assistant",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "asistant", "content": "Hello"}],
            r"did you mean 'assistant'",
        ),
        ([], r"field 'messages' is an empty conversation"),
        ("Hi there", r"field 'messages' is a str; expected a list"),
        (
            [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Hello"}],
            r"messages\[0\]\.content is a list; expected a string",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}],
            r"messages\[1\]\.content is an empty turn",
        ),
        (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            r"field 'messages' has no assistant turn",
        ),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Yo"},
            ],
            r"roles out of order in 'messages': turn 1 is 'user', expected 'assistant'",
        ),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "?"},
            ],
            r"ends with a user turn",
        ),
        ([{"role": "user", "content": "Hi"}, {"content": "Yo"}], r"messages\[1\] has no 'role'"),
    ],
)
def test_bad_conversations_name_file_line_and_field(tmp_path, messages, pattern):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": EXPECTED_CHAT}, {"messages": messages}])
    records = read_records(path)
    assert to_messages(records[0], "messages") == EXPECTED_CHAT
    with pytest.raises(LorafitError, match=rf"train\.jsonl line 2: .*{pattern}"):
        to_messages(records[1], "messages")


def test_bad_sharegpt_and_alpaca_fields():
    bad_from = Record({"conversations": [{"from": "robot", "value": "x"}]}, "s.jsonl line 4")
    with pytest.raises(
        LorafitError, match=r"s.jsonl line 4: conversations\[0\]\.from is 'robot'; accepted roles: human"
    ):
        to_messages(bad_from, "sharegpt")
    with pytest.raises(LorafitError, match=r"a.json record 2: missing field 'output' for format alpaca"):
        to_messages(Record({"instruction": "x", "outptu": "y"}, "a.json record 2"), "alpaca")
    with pytest.raises(LorafitError, match=r"field 'completion' is a int; expected a string"):
        to_messages(Record({"prompt": "x", "completion": 3}, "p.csv row 1"), "prompt_completion")


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def test_read_jsonl_json_csv_parquet_folder(tmp_path):
    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(3)]
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", rows)
    (folder / "a.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    (folder / "c.csv").write_text(
        "instruction,input,output\n" + "".join(f'"say {i}",,"{i}"\n' for i in range(3)), encoding="utf-8"
    )
    pq.write_table(pa.Table.from_pylist(rows), folder / "d.parquet")
    (folder / "README.md").write_text("not data")

    wheres = {"b.jsonl": "line 1", "a.json": "record 1", "c.csv": "row 1", "d.parquet": "row 1"}
    for name, where in wheres.items():
        records = read_records(folder / name)
        assert [r.data for r in records] == rows, name
        assert records[0].where == f"{folder / name} {where}"
        assert records[2].where == f"{folder / name} {where[:-1]}3"

    records = read_records(folder)
    assert len(records) == 12
    assert [r.where for r in records[::3]] == [
        f"{folder / name} {where}" for name, where in sorted(wheres.items())
    ]
    (tmp_path / "list.json").write_text(json.dumps(rows), encoding="utf-8")
    assert [r.data for r in read_records(tmp_path / "list.json")] == rows


def test_read_csv_with_json_messages_column(tmp_path):
    path = tmp_path / "chat.csv"
    cell = json.dumps(EXPECTED_CHAT).replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    (record,) = read_records(path)
    assert to_messages(record, detect_format([record])) == EXPECTED_CHAT


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep ``datasets.load_dataset``'s cache inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_read_hf_dataset_from_a_local_folder(tmp_path, hf_cache):
    folder = tmp_path / "hfdata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "one"}, {"text": "two"}])
    write_jsonl(folder / "test.jsonl", [{"text": "three"}])
    records = read_records(f"hf:{folder}")
    assert [r.data["text"] for r in records] == ["one", "two"]
    assert records[1].where == f"hf:{folder} record 2"
    assert [r.data["text"] for r in read_records(f"hf:{folder}:test")] == ["three"]
    with pytest.raises(LorafitError, match="could not load split 'dev'"):
        read_records(f"hf:{folder}:dev")


def test_read_errors_name_file_and_line(tmp_path):
    bad_json = tmp_path / "train.jsonl"
    bad_json.write_text('{"text": "ok"}\n\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(
        LorafitError, match=r"train\.jsonl line 3: not valid JSON .*expected one JSON object per line"
    ):
        read_records(bad_json)

    not_object = write_jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, ["a", "list"]])
    with pytest.raises(LorafitError, match=r"list\.jsonl line 2: found a JSON list; expected a JSON object"):
        read_records(not_object)

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(
        LorafitError, match=r"latin1\.jsonl line 2: byte 0xe9 at column 14 is not valid UTF-8"
    ):
        read_records(latin1)

    with pytest.raises(
        LorafitError, match=r"trian\.jsonl: no such file or folder \(did you mean 'train\.jsonl'"
    ):
        read_records(tmp_path / "trian.jsonl")

    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(
        LorafitError, match=r"unsupported file type '\.txt'.*\.jsonl, \.json, \.csv, \.parquet"
    ):
        read_records(tmp_path / "data.txt")

    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(LorafitError, match=r"empty\.jsonl: the file holds no records"):
        read_records(tmp_path / "empty.jsonl")

    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(
        LorafitError, match=r"lines\.json line 2 column 1: not valid JSON \(Extra data\).*\.jsonl"
    ):
        read_records(tmp_path / "lines.json")

    (tmp_path / "two.json").write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(LorafitError, match=r"two\.json: the top-level object has 2 list fields \(a, b\)"):
        read_records(tmp_path / "two.json")

    (tmp_path / "wide.csv").write_text("text\nhello,extra\n")
    with pytest.raises(LorafitError, match=r"wide\.csv row 1 \(line 2\): more fields than the header"):
        read_records(tmp_path / "wide.csv")

    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(LorafitError, match=r"bad\.parquet: not a readable Parquet file"):
        read_records(tmp_path / "bad.parquet")

    (tmp_path / "nothing").mkdir()
    with pytest.raises(LorafitError, match=r"nothing: the folder has no data files"):
        read_records(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# Packing and collation
# --------------------------------------------------------------------------------------------


def test_pack_best_fit_decreasing_example():
    assert pack([6, 5, 4, 3, 2, 1], 10) == [[0, 2], [1, 3, 4], [5]]
    assert pack([], 10) == []
    with pytest.raises(LorafitError, match="example 1 has length 11; expected 1..10"):
        pack([3, 11], 10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), max_size=300))
def test_pack_rows_are_valid_and_efficient(lengths):
    rows = pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert all(load <= 64 for load in loads)
    # best fit never leaves two rows at most half full (the later one's items would have fit)
    assert sum(load <= 32 for load in loads) <= 1
    assert len(rows) <= 2 * math.ceil(sum(lengths) / 64) + 1
    assert pack(lengths, 64) == rows  # deterministic


def test_pack_is_efficient_on_chat_like_lengths():
    rng = random.Random(0)
    lengths = [min(2048, int(rng.lognormvariate(5.5, 0.8)) + 20) for _ in range(5000)]
    rows = pack(lengths, 2048)
    assert sum(lengths) / (len(rows) * 2048) > 0.99


def test_packed_collator_positions_labels_and_padding():
    a = {"input_ids": [11, 12, 13], "labels": [11, 12, 13]}
    b = {"input_ids": [21, 22], "labels": [21, 22]}
    c = {"input_ids": [31], "labels": [-100]}
    batch = PackedCollator(pad_token_id=0)([[a, b], [c]])
    assert batch.keys() == {"input_ids", "labels", "position_ids"}
    bounded = PackedCollator(pad_token_id=0, example_boundaries=True)([[a, b], [c]])
    assert bounded.keys() == {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"}
    # example boundaries over the flattened rows: 3 and 2 tokens, then 1 and the padding's 4
    assert bounded["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10]
    assert bounded["cu_seq_lens_k"] is bounded["cu_seq_lens_q"]
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, -100, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    # a pre-concatenated row collates the same, and pad_to_multiple_of rounds the width up
    row = {"input_ids": [11, 12, 13, 21, 22], "labels": [11, 12, 13, 21, 22], "position_ids": [0, 1, 2, 0, 1]}
    again = PackedCollator(pad_token_id=0, pad_to_multiple_of=4)([row])
    assert again["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, -100, -100]]
    assert again["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    with pytest.raises(LorafitError, match="pad_token_id is None.*prepare_tokenizer"):
        PackedCollator(pad_token_id=None)


def test_padded_collator():
    batch = PaddedCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_packed_dataset_rows_match_collated_examples():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    tokenized = TokenizedDataset.from_examples(examples)
    assert [tokenized[i] for i in range(2)] == examples and tokenized[-1] == examples[1]
    packed = PackedDataset(tokenized, [[0, 1]])
    assert packed[0] == {
        "input_ids": [1, 2, 3, 4, 5],
        "labels": [-100, 2, 3, -100, 5],
        "position_ids": [0, 1, 2, 0, 1],
    }
    collator = PackedCollator(pad_token_id=0)
    assert all(torch.equal(collator([packed[0]])[k], collator([examples])[k]) for k in packed[0])


# --------------------------------------------------------------------------------------------
# Packed attention on a real tiny Phi-3: packed logits == per-example logits
# --------------------------------------------------------------------------------------------


def _packed_batch(tokenizer, tmp_path, max_length=96):
    prepare_tokenizer(tokenizer, pad_token="unk")
    path = write_jsonl(tmp_path / "train.jsonl", chat_rows(12))
    train, _, stats = build_datasets(
        tokenizer, train=path, max_length=max_length, assistant_only_loss=False, cache_dir=tmp_path / "cache"
    )
    assert stats["packed_rows"] < stats["examples"]  # several examples share rows
    rows = [train[i] for i in range(len(train))]
    batch = PackedCollator(tokenizer.pad_token_id, example_boundaries=True)(rows)
    assert (batch["input_ids"] == tokenizer.pad_token_id).any()  # rows of unequal length got padding
    return train, batch


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", PACKED_ATTENTION])
@pytest.mark.parametrize("sliding_window", [None, 8])
def test_packed_logits_equal_per_example_logits(
    phi3_tokenizer, make_tiny_phi3, tmp_path, attn_implementation, sliding_window
):
    train, batch = _packed_batch(phi3_tokenizer, tmp_path)
    packed_attention = attn_implementation == PACKED_ATTENTION
    model = make_tiny_phi3(
        len(phi3_tokenizer),
        attn_implementation="sdpa" if packed_attention else attn_implementation,
        sliding_window=sliding_window,
    )
    if packed_attention:
        assert use_packed_attention(model)
    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        packed_loss_sum = packed.loss * (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss_sum, count = 0.0, 0
        for r, row in enumerate(train.rows):
            start = 0
            for index in row:
                example = train.examples[index]
                ids = torch.tensor([example["input_ids"]])
                alone = model(input_ids=ids, labels=torch.tensor([example["labels"]]), use_cache=False)
                n = ids.shape[1]
                torch.testing.assert_close(
                    packed.logits[r, start : start + n], alone.logits[0], atol=1e-5, rtol=1e-5
                )
                loss_sum += alone.loss * (n - 1)
                count += n - 1
                start += n
    # the loss over the packed batch is the loss over the examples: nothing crosses a boundary
    torch.testing.assert_close(packed_loss_sum, loss_sum, atol=1e-4, rtol=1e-5)
    assert count == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def test_packed_attention_gradients_equal_sdpa_and_it_hands_back_other_cases(
    phi3_tokenizer, make_tiny_phi3, tmp_path, monkeypatch
):
    """Per-example attention gives sdpa's gradients; padded batches and generation (a mask, a
    cache) go to sdpa itself, and use_packed_attention refuses a model that is not sdpa."""
    from transformers.integrations import sdpa_attention

    _, batch = _packed_batch(phi3_tokenizer, tmp_path)
    reference, model = (make_tiny_phi3(len(phi3_tokenizer)).train() for _ in range(2))
    reference(**batch, use_cache=False).loss.backward()
    assert use_packed_attention(model) and model.config._attn_implementation == PACKED_ATTENTION
    with monkeypatch.context() as patch:
        patch.setattr(sdpa_attention, "sdpa_attention_forward", None)  # packed rows never need it
        model(**batch, use_cache=False).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)

    padded = PaddedCollator(phi3_tokenizer.pad_token_id)(
        [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}, {"input_ids": [9, 10], "labels": [9, 10]}]
    )
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits, reference(**padded).logits)
        prompt = torch.tensor([[5, 6, 7]])
        settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(prompt, **settings), reference.generate(prompt, **settings))
    assert not use_packed_attention(make_tiny_phi3(len(phi3_tokenizer), attn_implementation="eager"))


def test_packed_isolation_needs_use_cache_false(phi3_tokenizer, make_tiny_phi3, tmp_path):
    # transformers only derives the block-diagonal mask from position_ids when no cache is in
    # play; Phi3Config defaults to use_cache=True (Trainer turns it off). Pin that behaviour.
    train, batch = _packed_batch(phi3_tokenizer, tmp_path)
    model = make_tiny_phi3(len(phi3_tokenizer))
    assert model.config.use_cache is True
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        isolated = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    assert not torch.allclose(leaky, isolated, atol=1e-3)


def test_trainer_runs_on_packed_rows(phi3_tokenizer, make_tiny_phi3, tmp_path):
    from transformers import Trainer, TrainingArguments

    train, _ = _packed_batch(phi3_tokenizer, tmp_path)
    model = make_tiny_phi3(len(phi3_tokenizer)).train()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train, data_collator=collator_for(phi3_tokenizer, packing=True)
    )
    result = trainer.train()
    assert model.config.use_cache is False  # what makes the packed mask block-diagonal
    assert math.isfinite(result.training_loss)


# --------------------------------------------------------------------------------------------
# build_datasets: stats, splits, cache
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# prepare_tokenizer
# --------------------------------------------------------------------------------------------


def test_prepare_tokenizer(phi3_tokenizer, llama3_tokenizer):
    prepare_tokenizer(phi3_tokenizer, pad_token="unk", padding_side="right", model_max_length=4096)
    assert phi3_tokenizer.pad_token == "<unk>" and phi3_tokenizer.pad_token_id == phi3_tokenizer.unk_token_id
    assert phi3_tokenizer.padding_side == "right" and phi3_tokenizer.model_max_length == 4096
    prepare_tokenizer(phi3_tokenizer, pad_token="<|end|>")
    assert phi3_tokenizer.pad_token == "<|end|>"
    with pytest.raises(
        LorafitError,
        match=r"'<\|endoftxt\|>' is not in the tokenizer's vocabulary \(did you mean '<\|endoftext\|>'",
    ):
        prepare_tokenizer(phi3_tokenizer, pad_token="<|endoftxt|>")
    with pytest.raises(LorafitError, match="has no unk token; expected one of eos, bos"):
        prepare_tokenizer(llama3_tokenizer, pad_token="unk")
    with pytest.raises(LorafitError, match="padding_side: 'rigth' \\(did you mean 'right'"):
        prepare_tokenizer(phi3_tokenizer, padding_side="rigth")
    with pytest.raises(LorafitError, match="model_max_length: 0; expected a positive integer"):
        prepare_tokenizer(phi3_tokenizer, model_max_length=0)


# --------------------------------------------------------------------------------------------
# Bad records at scale; fuzzing the reader
# --------------------------------------------------------------------------------------------


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
