"""A transformers fast tokenizer as GGUF metadata (``tokenizer.*``), so llama.cpp needs no other file.

Two kinds of BPE tokenizer are written, the two llama.cpp reads for Llama and Phi-3 models:

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): ``tokenizer.ggml.model = gpt2``, the vocabulary in
  its byte-level spelling, the merges, and the name of the pre-tokenizer that splits text before
  the merges (``tokenizer.ggml.pre``: ``gpt-2``, ``smollm``, ``llama-bpe``, ``qwen2``).
- SentencePiece-style BPE (Llama 2, Mistral, Phi-3): ``tokenizer.ggml.model = llama``, the
  vocabulary with ``▁`` for spaces, and a score per token instead of merges. llama.cpp merges
  the adjacent pair whose result scores highest, so the token made by merge ``k`` (0 first) is
  given score ``-(k + 1)``: the merge order is kept.

Token types are llama.cpp's: special added tokens CONTROL, other added tokens USER_DEFINED,
``<0xNN>`` BYTE, the unknown token UNKNOWN, rows of the embedding beyond the tokenizer's
vocabulary UNUSED (named ``[PADn]``), everything else NORMAL.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gguf import GGUFValueType, TokenType

from lorafit.errors import LorafitError
from lorafit.export.gguf_arch import KV

# The split regexes of the Llama 3 and Qwen2 tokenizers (tokenizer.json pre_tokenizer Split).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "gpt-2": "ByteLevel with its GPT-2 regex",
    "smollm": "Digits(individual_digits) then ByteLevel with its GPT-2 regex",
    "llama-bpe": "Split(Llama 3 regex) then ByteLevel without regex",
    "qwen2": "Split(Qwen2 regex) then ByteLevel without regex",
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# llama.cpp gives every added token of a Phi-3 model but these "rstrip" (drop the whitespace after
# it), and only when general.name contains "phi-3" or "phi3" (llama-vocab.cpp); it then looks up
# these and "</s>" by text and stops loading the model if one is missing.
_PHI3_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")
_PHI3_LOOKED_UP = (*_PHI3_NO_RSTRIP, "</s>")


def _str(value: str) -> KV:
    return value, GGUFValueType.STRING


def _array(values: list[Any]) -> KV:
    return values, GGUFValueType.ARRAY


def _parts(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The steps of a normalizer or pre-tokenizer, a Sequence flattened."""
    if not node:
        return []
    if node["type"] == "Sequence":
        key = "pretokenizers" if "pretokenizers" in node else "normalizers"
        return [part for child in node[key] for part in _parts(child)]
    return [node]


def _split_regex(part: dict[str, Any]) -> str | None:
    pattern = part.get("pattern", {})
    return pattern.get("Regex") if part.get("behavior") == "Isolated" else None


def byte_level_pre(spec: dict[str, Any]) -> str | None:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer, or None if it is none of
    :data:`PRE_TOKENIZERS`."""
    parts = _parts(spec.get("pre_tokenizer"))
    kinds = [part["type"] for part in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(_split_regex(parts[0]))
    return None


def _is_byte_level(spec: dict[str, Any]) -> bool:
    return any(p["type"] == "ByteLevel" for p in _parts(spec.get("pre_tokenizer"))) or (
        (spec.get("decoder") or {}).get("type") == "ByteLevel"
    )


def _space_prefix(spec: dict[str, Any]) -> str | None:
    """How a SentencePiece-style tokenizer marks the start of text with ``▁``: ``"each"`` (before
    every stretch of text, special tokens included, as llama.cpp does), ``"first"`` (only at the
    very start), ``"never"``, or None when it uses no ``▁`` at all."""
    for part in _parts(spec.get("normalizer")):
        if part["type"] == "Prepend" and part.get("prepend") == "▁":
            return "each"
    for part in _parts(spec.get("pre_tokenizer")):
        if part["type"] == "Metaspace" and part.get("replacement") == "▁":
            return {"always": "each", "first": "first", "never": "never"}[
                part.get("prepend_scheme", "always")
            ]
    for part in _parts(spec.get("normalizer")):
        if part["type"] == "Replace" and part.get("content") == "▁":
            return "never"
    return None


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    merges = model.get("merges") or []
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _add_flags(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds bos first / eos last, found by encoding a word both ways."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    return add_bos, add_eos


def _chat_templates(tokenizer: Any) -> dict[str, KV]:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return {}
    if isinstance(template, str):
        return {"tokenizer.chat_template": _str(template)}
    # named templates (transformers' dict form): "default" is llama.cpp's plain chat_template
    kv = {
        f"tokenizer.chat_template.{name}": _str(text) for name, text in template.items() if name != "default"
    }
    if "default" in template:
        kv["tokenizer.chat_template"] = _str(template["default"])
    named = [name for name in template if name != "default"]
    if named:
        kv["tokenizer.chat_templates"] = _array(named)
    return kv


def tokenizer_metadata(
    tokenizer: Any, n_vocab: int, *, model_name: str, pre: str | None = None
) -> tuple[dict[str, KV], list[str]]:
    """``(tokenizer.* metadata, notes)`` for ``tokenizer`` over an embedding of ``n_vocab`` rows.

    ``pre`` names the byte-level pre-tokenizer for llama.cpp when the tokenizer's own is not one
    of :data:`PRE_TOKENIZERS` (a wrong name tokenizes text differently; llama.cpp lists its names
    in llama-vocab.cpp). ``model_name`` is the file's ``general.name``: llama.cpp keys Phi-3's
    whitespace handling on it. Raises LorafitError for tokenizers llama.cpp could not reproduce;
    the notes say where it will tokenize some text differently.
    """
    spec, vocab, byte_level, space_prefix = _bpe_spec(tokenizer, n_vocab)
    tokens, types = _token_table(tokenizer, vocab, n_vocab, model_name)
    if byte_level:
        kv, notes = _byte_level_kv(spec, tokens, types, pre), []
    else:
        kv, notes = _sentencepiece_kv(tokenizer, spec["model"], vocab, tokens, types, space_prefix)
    kv.update(_special_ids_kv(tokenizer))
    kv.update(_chat_templates(tokenizer))
    notes += _rstrip_notes(tokenizer.added_tokens_decoder, model_name)
    return kv, notes


def _bpe_spec(tokenizer: Any, n_vocab: int) -> tuple[dict, dict[str, int], bool, str | None]:
    """The tokenizer's tokenizer.json, its vocabulary, whether it is byte-level, and (if not) where
    it puts SentencePiece's space prefix; LorafitError for a kind llama.cpp cannot read."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LorafitError(
            f"GGUF export needs a fast tokenizer (tokenizer.json); got {type(tokenizer).__name__}"
        )
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise LorafitError(
            f"the tokenizer is a {model['type']} model; GGUF export writes BPE tokenizers "
            "(byte-level like GPT-2 / Llama 3, or SentencePiece-style like Llama 2 / Phi-3)"
        )
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise LorafitError(
            f"the tokenizer has {size} tokens but the model's embedding only {n_vocab} rows; "
            "resize the embedding (model.resize_token_embeddings(len(tokenizer))) before exporting"
        )
    byte_level = _is_byte_level(spec)
    space_prefix = None if byte_level else _space_prefix(spec)
    if not byte_level and (space_prefix is None or not model.get("byte_fallback")):
        raise LorafitError(
            "the tokenizer is neither byte-level BPE (ByteLevel pre-tokenizer) nor SentencePiece-style "
            "BPE (byte_fallback with '▁' for spaces); llama.cpp reads only those two kinds of BPE"
        )
    return spec, vocab, byte_level, space_prefix


def _token_table(tokenizer: Any, vocab: dict[str, int], n_vocab: int, model_name: str) -> tuple[list, list]:
    """Every embedding row's token text and GGUF token type (rows past the tokenizer: unused pads)."""
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = int(TokenType.NORMAL)
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    for index, token in added.items():
        tokens[index] = token.content
        types[index] = int(TokenType.CONTROL if token.special else TokenType.USER_DEFINED)
    seen: dict[str, int] = {}
    for index, text in enumerate(tokens):
        # llama.cpp maps text to id as well as id to text, and stops on a token spelled twice
        if seen.setdefault(text, index) != index:
            raise LorafitError(
                f"tokens {seen[text]} and {index} are both {text!r}; "
                "a GGUF vocabulary holds each spelling once"
            )
    if named_phi3(model_name):
        missing = [t for t in _PHI3_LOOKED_UP if t not in seen]
        if missing:
            raise LorafitError(
                f"the model is named {model_name!r}, and for a name containing 'phi-3' or 'phi3' llama.cpp "
                f"looks up {', '.join(_PHI3_LOOKED_UP)} and fails to load without them; this vocabulary "
                f"lacks {', '.join(missing)}. Name it otherwise with metadata={{'general.name': ...}}"
            )
    return tokens, types


def _byte_level_kv(spec: dict, tokens: list, types: list, pre: str | None) -> dict[str, KV]:
    """GPT-2-style byte-level BPE: tokens, types and merges, under llama.cpp's pre-tokenizer name."""
    model = spec["model"]
    detected = byte_level_pre(spec)
    if pre is None and detected is None:
        raise LorafitError(
            f"the tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))} is not one lorafit "
            f"maps to llama.cpp's: {'; '.join(f'{k} ({v})' for k, v in PRE_TOKENIZERS.items())}. "
            "Name llama.cpp's pre-tokenizer yourself with metadata={'tokenizer.ggml.pre': NAME}"
        )
    merges = []
    for left, right in _merge_pairs(model):
        if " " in left or " " in right:
            raise LorafitError(f"merge ({left!r}, {right!r}) holds a space, which a GGUF merge cannot")
        merges.append(f"{left} {right}")
    kv: dict[str, KV] = {"tokenizer.ggml.model": _str("gpt2")}
    kv["tokenizer.ggml.pre"] = _str(pre or detected)
    kv["tokenizer.ggml.tokens"] = _array(tokens)
    kv["tokenizer.ggml.token_type"] = _array(types)
    kv["tokenizer.ggml.merges"] = _array(merges)
    return kv


def _sentencepiece_kv(
    tokenizer: Any, model: dict, vocab: dict[str, int], tokens: list, types: list, space_prefix: str | None
) -> tuple[dict[str, KV], list[str]]:
    """SentencePiece-style BPE (Llama 2, Phi-3): tokens, scores ranked by merge order, byte tokens."""
    n_vocab, notes = len(tokens), []
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise LorafitError(
            f"this SentencePiece-style tokenizer lacks {len(missing)} of the 256 byte tokens <0x00> .. "
            f"<0xFF> (e.g. <0x{missing[0]:02X}>); llama.cpp spells every character outside the "
            "vocabulary with them and aborts when one is missing"
        )
    if space_prefix == "first":
        notes.append(
            "this SentencePiece-style tokenizer puts '▁' only at the very start of the text; "
            "llama.cpp puts it after every special token too, so text right after a special token "
            "(a chat template's role tokens) can tokenize differently there"
        )
    scores = [0.0] * n_vocab
    for rank, (left, right) in enumerate(_merge_pairs(model)):
        made = vocab.get(left + right)
        if made is not None and scores[made] == 0.0:  # the first merge that makes a token ranks it
            scores[made] = -(rank + 1.0)
    for index, text in enumerate(tokens):
        if types[index] in (TokenType.CONTROL, TokenType.USER_DEFINED):
            scores[index] = -1000.0  # as llama.cpp's converters score added tokens
        elif _BYTE_TOKEN.fullmatch(text):
            types[index] = int(TokenType.BYTE)
    if tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = int(TokenType.UNKNOWN)
    kv: dict[str, KV] = {"tokenizer.ggml.model": _str("llama")}
    kv["tokenizer.ggml.pre"] = _str("default")
    kv["tokenizer.ggml.tokens"] = _array(tokens)
    kv["tokenizer.ggml.scores"] = _array(scores)
    kv["tokenizer.ggml.token_type"] = _array(types)
    kv["tokenizer.ggml.add_space_prefix"] = (space_prefix != "never", GGUFValueType.BOOL)
    return kv, notes


def _special_ids_kv(tokenizer: Any) -> dict[str, KV]:
    """The special token ids llama.cpp reads, and whether the tokenizer adds bos and eos."""
    kv: dict[str, KV] = {}
    for key, index in (
        ("bos_token_id", tokenizer.bos_token_id),
        ("eos_token_id", tokenizer.eos_token_id),
        ("unknown_token_id", tokenizer.unk_token_id),
        ("padding_token_id", tokenizer.pad_token_id),
        ("eot_token_id", _end_of_turn(tokenizer)),
    ):
        if index is not None:
            kv[f"tokenizer.ggml.{key}"] = (int(index), GGUFValueType.UINT32)
    add_bos, add_eos = _add_flags(tokenizer)
    kv["tokenizer.ggml.add_bos_token"] = (add_bos, GGUFValueType.BOOL)
    kv["tokenizer.ggml.add_eos_token"] = (add_eos, GGUFValueType.BOOL)
    return kv


def _end_of_turn(tokenizer: Any) -> int | None:
    """The chat template's end-of-turn token when it is not eos (``<|end|>``, ``<|eot_id|>``, ...)."""
    from lorafit.models import stop_token_ids

    others = [i for i in stop_token_ids(tokenizer) if i != tokenizer.eos_token_id]
    return others[0] if others else None


def named_phi3(model_name: str) -> bool:
    """Whether llama.cpp treats a model of this general.name as Phi-3 (its tokenizer rules)."""
    name = model_name.lower()
    return "phi-3" in name or "phi3" in name


def phi3_rstrip_tokens(added: dict[int, Any]) -> set[str]:
    """The added tokens llama.cpp strips the whitespace after in a model named Phi-3: all of them
    (CONTROL and USER_DEFINED) but <unk>, <s> and <|endoftext|>."""
    return {t.content for t in added.values() if t.content not in _PHI3_NO_RSTRIP}


def wants_phi3_rule(tokenizer: Any) -> bool:
    """Whether the tokenizer drops whitespace after exactly the tokens llama.cpp's Phi-3 rule does,
    and holds the tokens that rule looks up: a file named for Phi-3 then tokenizes as it does."""
    added = tokenizer.added_tokens_decoder
    wanted = {t.content for t in added.values() if t.rstrip}
    vocab = tokenizer.get_vocab()
    return bool(wanted) and wanted == phi3_rstrip_tokens(added) and all(t in vocab for t in _PHI3_LOOKED_UP)


def _rstrip_notes(added: dict[int, Any], model_name: str) -> list[str]:
    """A note when the tokenizer drops whitespace after other tokens than llama.cpp will: GGUF has
    no field for it, and llama.cpp applies its Phi-3 rule by the model's name."""
    wanted = {t.content for t in added.values() if t.rstrip}
    applied = phi3_rstrip_tokens(added) if named_phi3(model_name) else set()
    if wanted == applied:
        return []
    return [
        f"the tokenizer drops the whitespace after {sorted(wanted) or 'no token'}, and llama.cpp will "
        f"after {sorted(applied) or 'no token'} for a model named {model_name!r} (llama.cpp does so only "
        "for names containing 'phi-3' or 'phi3', after every special token but <unk>, <s> and "
        "<|endoftext|>); text right after those tokens will tokenize differently"
    ]
