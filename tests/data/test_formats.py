"""lorafit.data.formats: detecting and converting every record format, with errors naming the field."""

from __future__ import annotations

import pytest

from lorafit.data import (
    Record,
    detect_format,
    read_records,
    to_messages,
    to_text,
)
from lorafit.errors import LorafitError

from chat_data import EXPECTED_CHAT, write_jsonl


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
