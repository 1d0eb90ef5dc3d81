"""Shared fixtures: tiny real fast tokenizers with real chat templates, and a tiny Phi-3.

Nothing is downloaded. Each tokenizer is a BPE trained in a few milliseconds on a small corpus,
wrapped in ``PreTrainedTokenizerFast`` with one model family's special tokens, chat template and
kind of pre-tokenizer (SentencePiece-style ``▁`` for Phi-3 and Llama 2, byte-level otherwise):

- ``phi3_tokenizer``: Phi-3-mini-instruct's template and tokens (``<|user|>``, ``<|end|>``, ...),
  which, like Phi-3's, swallow the whitespace after them (``rstrip``).
- ``llama2_tokenizer``: Llama 2's ``[INST]`` template (no generation prompt, `` </s>`` after answers).
- ``chatml_tokenizer``: Qwen2's ChatML (``<|im_start|>role\\n...<|im_end|>``).
- ``llama3_tokenizer``: Llama 3's headers, ``<|eot_id|>``, bos first and trimmed content.

The fixtures return a fresh tokenizer per test (they are mutable); ``make_tokenizer(family)``
builds one on demand, ``make_tiny_phi3(vocab_size, ...)`` a tiny random ``Phi3ForCausalLM``.
``write_broken_dataset(path, records)`` writes a large chat JSONL file with every kind of bad record.
"""

from __future__ import annotations

import functools
import json
import os
import string

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

# The real SmolLM2 model, converted once per session, for every test folder (tests/models/...).
from real_models import smollm2_session  # noqa: F401
from tiny import SIZES

# Tiny models gain nothing from intra-op threads, and OpenMP threads that spin against a busy or
# parallel test run (pytest-xdist, another job on the same cores) make each op 100x slower.
torch.set_num_threads(1)

# `lorafit train` with no model named runs the tiny demo model in every test and every process a test
# starts, not the real one (tests/test_demo.py tries the real demo by clearing this).
os.environ["LORAFIT_DEMO"] = "tiny"

# The chat template of microsoft/Phi-3-mini-4k-instruct, verbatim.
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Llama-2-chat's template: no generation prompt, and " </s>" after each answer.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# Qwen2-Instruct's ChatML, without its default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's template (bos first, content trimmed).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

FAMILIES = {
    "phi3": {
        "specials": ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        # as in Phi-3's tokenizer.json: the chat tokens swallow the whitespace after them
        "rstrip": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "kwargs": {
            "unk_token": "<unk>",
            "bos_token": "<s>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        },
        "template": PHI3_TEMPLATE,
        "end_of_turn": "<|end|>",
        "sentencepiece": True,
    },
    "llama2": {
        "specials": ["<unk>", "<s>", "</s>"],
        "kwargs": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
        "template": LLAMA2_TEMPLATE,
        "end_of_turn": "</s>",
        "sentencepiece": True,
    },
    "chatml": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "kwargs": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "template": CHATML_TEMPLATE,
        "end_of_turn": "<|im_end|>",
    },
    "llama3": {
        "specials": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "kwargs": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "template": LLAMA3_TEMPLATE,
        "end_of_turn": "<|eot_id|>",
    },
}

CORPUS = [
    "system user assistant You are a helpful assistant. Be brief and kind.",
    "Hello there! How are you today? I am fine, thank you.",
    "What is two plus two? Two plus two is four. What about three plus five? That is eight.",
    "Summarize: cats sleep a lot and dogs like to play outside in the sun.",
    "Translate to French: good morning. Bonjour. The sky is blue because of scattering.",
    "Write a haiku about the sea.\nWaves fold into foam,\nsalt wind, gull voices,\nthe tide keeps time.",
    "Explain LoRA: low rank adapters train small matrices A and B while the base weights stay frozen.",
    "Question answer instruction input output prompt completion text conversation role content",
    "[INST] <<SYS>> [/INST] <</SYS>>",
]


@functools.cache
def _tokenizer_json(family: str) -> str:
    """A BPE trained on ``CORPUS`` with the family's special tokens, as tokenizer.json text.

    ``sentencepiece`` families (Phi-3, Llama 2) mark spaces with ``▁`` (Metaspace), as their
    real tokenizers do; the others are byte-level BPEs like GPT-2's, Qwen's and Llama 3's.
    """
    spec = FAMILIES[family]
    if spec.get("sentencepiece"):
        tokenizer = Tokenizer(models.BPE(unk_token=spec["kwargs"]["unk_token"], byte_fallback=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set(string.printable) | set("".join(CORPUS)))
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[
            AddedToken(t, rstrip=t in spec.get("rstrip", ()), normalized=False, special=True)
            for t in spec["specials"]
        ],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return tokenizer.to_str()


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    spec = FAMILIES[family]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(family)),
        additional_special_tokens=[t for t in spec["specials"] if t not in spec["kwargs"].values()],
        model_max_length=4096,
        **spec["kwargs"],
    )
    tokenizer.chat_template = spec["template"]
    tokenizer.name_or_path = f"tiny-{family}"
    return tokenizer


def build_tiny_phi3(
    vocab_size: int,
    *,
    attn_implementation: str = "sdpa",
    sliding_window: int | None = None,
    seed: int = 0,
    pad_token_id: int = 0,
) -> Phi3ForCausalLM:
    """A 2-layer random Phi-3 (fp32, eval mode); grouped-query attention like Phi-3-medium."""
    torch.manual_seed(seed)
    config = Phi3Config(
        **{**SIZES, "vocab_size": vocab_size, "pad_token_id": pad_token_id},
        sliding_window=sliding_window,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation=attn_implementation,
    )
    return Phi3ForCausalLM(config).float().eval()


@pytest.fixture
def make_tokenizer():
    """``make_tokenizer("phi3" | "llama2" | "chatml" | "llama3")`` -> a fresh tiny fast tokenizer."""
    return build_tokenizer


@pytest.fixture
def phi3_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer("phi3")


@pytest.fixture
def llama2_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer("llama2")


@pytest.fixture
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer("chatml")


@pytest.fixture
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer("llama3")


@pytest.fixture
def make_tiny_phi3():
    """``make_tiny_phi3(vocab_size, attn_implementation=..., sliding_window=...)`` -> tiny Phi-3."""
    return build_tiny_phi3


@pytest.fixture
def lorafit_cache(tmp_path, monkeypatch):
    """Point ``$LORAFIT_CACHE`` at a per-test folder (returned)."""
    cache = tmp_path / "lorafit-cache"
    monkeypatch.setenv("LORAFIT_CACHE", str(cache))
    return cache


# One line of each kind of bad record and the start of the reason lorafit gives for it. The first
# kind is a bad conversation, the second a line that does not parse: the default must stop at the
# first bad record in file order, whichever stage finds it.
BROKEN_KINDS = [
    (
        b'{"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]}',
        "messages[0].role is 'robot'",
    ),
    (b'{"messages": [{"role": "user", "content": "hi"}, oops', "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "byte 0xe9 at column 47 is not valid UTF-8"),
    (b'["a", "list"]', "found a JSON list; expected a JSON object"),
    (
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}',
        "messages[1].content is a int; expected a string",
    ),
    (
        b'{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "ok"}]}',
        "messages[0].content is an empty turn",
    ),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "field 'messages' has no assistant turn"),
    (
        b'{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "ok"}]}',
        "roles out of order",
    ),
    (b'{"messages": [{"role": "user"}]}', "messages[0] has no 'content'"),
    (b'{"instruction": "Add 2 and 2.", "output": "4"}', "looks like format 'alpaca'"),
    (
        b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "ok"}]}',
        "messages[0].content holds '\\ud800'",
    ),
    (b'{"messages": ' + b"9" * 5000 + b"}", "not valid JSON (Exceeds the limit"),
    (b"[" * 100_000, "not valid JSON (nested too deeply"),
    (b'{"messages": "hello"}', "field 'messages' is a str"),
]


def _over_long() -> bytes:
    answer = " ".join(["The tide keeps time, and salt wind carries gull voices."] * 60)
    messages = [{"role": "user", "content": "Talk at length."}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages}).encode()


def write_broken_dataset(path, records: int = 3000, every: int = 10) -> tuple:
    """A chat JSONL file of ``records`` lines: the demo's conversations, with line 7 and every
    ``every``-th line after it bad (each kind of ``BROKEN_KINDS`` in turn, and an over-long one).

    Returns ``(path, {line: (kind, start of the reason)})``; the over-long record's reason assumes
    ``max_length`` 256 with ``overlong: drop``.
    """
    from lorafit.demo import train_file

    good = train_file().read_bytes().splitlines()
    kinds = [*BROKEN_KINDS, (_over_long(), "longer than max_length 256 tokens")]
    lines, broken = [], {}
    for number in range(1, records + 1):
        if number >= 7 and (number - 7) % every == 0:
            line, reason = kinds[len(broken) % len(kinds)]
            broken[number] = (line, reason)
        else:
            line = good[number % len(good)]
        lines.append(line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, broken


@pytest.fixture
def broken_dataset():
    """``broken_dataset(path, records=3000)`` -> (path, {line: (kind, reason start)}); see
    ``write_broken_dataset``."""
    return write_broken_dataset
