"""Chat data for the data tests: a conversation, varied chat rows, and label helpers."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lorafit.data import IGNORE_INDEX

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


EXPECTED_CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


# Published chat templates (tests/fixtures/templates/README.md) and a tool-calling conversation.
TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "templates"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city."}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C and sunny"},
    {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
]


def with_template(tokenizer, name: str):
    tokenizer.chat_template = (TEMPLATES / name).read_text(encoding="utf-8")
    return tokenizer
