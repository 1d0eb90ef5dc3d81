"""Chat-instruction files -> masked, packed training examples for Hugging Face causal LMs.

The flow, top to bottom (``build_datasets`` runs it):

    read_records -> detect_format -> to_messages / to_text -> tokenize -> pack -> collate

Bad records. Every record is checked in file order before anything is tokenised. By default the
first bad one (malformed JSON, bytes that are not UTF-8, wrong types, unknown roles, empty turns,
a record of another format) stops the build with its file, line and field. With
``skip_bad_records`` each bad record becomes a ``BadRecord`` (where, reason) and the rest train;
``stats["skipped"]`` lists them, with the examples the length policy dropped.

Labels. With ``assistant_only_loss`` every assistant turn's content tokens and its end-of-turn
token (``<|end|>`` for Phi-3, ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, `` </s>``
for Llama 2) are labels; system, user and template tokens are -100. Assistant turns are found
by position, never by searching the text for a marker such as ``<|assistant|>``: the
tokenizer's own template renders ``messages[:i]`` with the generation prompt, which must be a
prefix of the whole rendering; the assistant content starts right there, and the fast
tokenizer's offset mapping turns that character span into token positions.

Packing. Examples are bin-packed (best-fit decreasing) into rows of at most ``max_length``
tokens. ``PackedCollator`` gives ``position_ids`` restarting at 0 for every example and no
``attention_mask``; transformers 5 (``masking_utils.find_packed_sequence_indices``) then reads
the example boundaries from the position_ids and builds a block-diagonal causal mask, for
``sdpa`` and ``eager`` alike (flash-attention uses the same position_ids as varlen boundaries).
It does so only when no KV cache is passed, so the model must run with ``use_cache=False``:
``transformers.Trainer`` sets ``model.config.use_cache = args.use_cache`` (False by default),
and gradient checkpointing forces it off too. ``tests/test_data.py`` checks on a tiny Phi-3
that packed logits equal per-example logits, and that ``use_cache=True`` would break that.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import random
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafit.errors import LorafitError, did_you_mean

__all__ = [
    "BadRecord",
    "FORMATS",
    "IGNORE_INDEX",
    "PackedCollator",
    "PackedDataset",
    "PaddedCollator",
    "Record",
    "TokenizedDataset",
    "build_datasets",
    "collator_for",
    "detect_format",
    "pack",
    "prepare_tokenizer",
    "read_records",
    "to_messages",
    "to_text",
    "tokenize_conversation",
    "tokenize_text",
]

IGNORE_INDEX = -100
"""Label value that the causal-LM loss skips."""

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
"""The record formats ``detect_format`` recognises (``format: auto`` picks one of them)."""

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
OVERLONG = ("truncate", "drop")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

# Bump when tokenisation or the cache layout changes, so old cache files are never reused.
_CACHE_VERSION = "lorafit-data-2"
_PROGRESS_MIN_RECORDS = 1000
_CHUNK = 512


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from, for error messages.

    ``where`` reads ``"data/train.jsonl line 12"`` (JSON lines: the file's line, 1-based),
    ``"data/train.json record 3"``, ``"data/train.csv row 3"`` / ``"x.parquet row 3"`` (data rows,
    1-based, header excluded) or ``"hf:NAME record 7"`` (1-based).
    """

    data: dict
    where: str


@dataclass(frozen=True)
class BadRecord:
    """A record that cannot be trained on: where it is (as ``Record.where``) and why."""

    where: str
    reason: str

    @classmethod
    def from_error(cls, where: str, error: LorafitError) -> BadRecord:
        text = str(error)
        return cls(where, text[len(where) + 2 :] if text.startswith(f"{where}: ") else text)

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def read_records(
    source: str | Path, *, split: str | None = None, bad: list[BadRecord] | None = None
) -> list[Record]:
    """Read every record of a local file, a folder, or a Hugging Face dataset.

    ``source`` is a ``.jsonl``, ``.json`` (a list of records, or an object with one list field),
    ``.csv`` or ``.parquet`` file; a folder (its supported files, sorted by name, not recursive);
    or ``hf:NAME[:SPLIT]``, loaded with ``datasets.load_dataset`` (the split is SPLIT, else
    ``split``, else ``"train"``). Raises ``LorafitError`` naming the file and line for a missing
    path, an unsupported extension, an empty file, or a file that cannot be parsed at all. A bad
    record (a JSON line that does not parse or is not an object, a line that is not UTF-8, a
    CSV row with extra fields, a JSON list item that is not an object) raises too, unless ``bad``
    is a list: then it is appended there and reading goes on.
    """
    records = []
    for item in _read_items(source, split):
        if isinstance(item, Record):
            records.append(item)
        elif bad is None:
            raise LorafitError(str(item))
        else:
            bad.append(item)
    return records


def _read_items(source: str | Path, split: str | None = None) -> list[Record | BadRecord]:
    """The records of ``source`` and its bad records, in file order (see ``read_records``)."""
    text = str(source)
    if text.startswith("hf:"):
        name, _, hf_split = text[3:].partition(":")
        return _read_hf(name, hf_split or split or "train")
    path = Path(source)
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and _suffix(p) in SUPPORTED_SUFFIXES
        )
        if not files:
            raise LorafitError(
                f"{path}: the folder has no data files; "
                f"expected files ending in {', '.join(SUPPORTED_SUFFIXES)}."
            )
        return [item for f in files for item in _read_file(f)]
    if not path.exists():
        siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
        raise LorafitError(f"{path}: no such file or folder{did_you_mean(path.name, siblings)}.")
    return _read_file(path)


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _read_file(path: Path) -> list[Record | BadRecord]:
    suffix = _suffix(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise LorafitError(
            f"{path}: unsupported file type '{suffix or '(none)'}'"
            f"{did_you_mean(suffix, SUPPORTED_SUFFIXES)}; "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}, a folder of them, or hf:NAME[:SPLIT]."
        )
    try:
        items = readers[suffix](path)
    except OSError as e:
        raise LorafitError(f"{path}: cannot be read ({e.strerror or e}).") from None
    if not items:
        raise LorafitError(f"{path}: the file holds no records; expected at least one.")
    return items


def _not_utf8(raw: bytes, start: int) -> str:
    return (
        f"byte 0x{raw[start]:02x} at column {start + 1} is not valid UTF-8; "
        "expected UTF-8 text (re-save the file as UTF-8)."
    )


def _decode(path: Path) -> str:
    """The file's text, or an error naming the line of the first byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw[: e.start].count(b"\n") + 1
        reason = _not_utf8(raw[line_start:], e.start - line_start)
        raise LorafitError(f"{path} line {line}: {reason}") from None


def _parse_json(text: str) -> Any:
    """``json.loads``, with the errors it raises besides JSONDecodeError made into one."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # e.g. an integer longer than Python's 4300-digit limit
        raise json.JSONDecodeError(str(e).split(";")[0], text, 0) from None


def _read_jsonl(path: Path) -> list[Record | BadRecord]:
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    # Split the bytes, not the text: one line that is not UTF-8 is then one bad record, and
    # characters that str.splitlines() treats as line breaks (U+2028) stay inside their string.
    items: list[Record | BadRecord] = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        where = f"{path} line {number}"
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            items.append(BadRecord(where, _not_utf8(chunk, e.start)))
            continue
        if not line.strip():
            continue
        try:
            data = _parse_json(line)
        except json.JSONDecodeError as e:
            items.append(
                BadRecord(
                    where,
                    f"not valid JSON ({e.msg} at column {e.colno}); expected one JSON object per line.",
                )
            )
            continue
        if not isinstance(data, dict):
            items.append(
                BadRecord(where, f"found a JSON {_json_type(data)}; expected a JSON object per line.")
            )
            continue
        items.append(Record(data, where))
    return items


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _read_json(path: Path) -> list[Record | BadRecord]:
    try:
        data = _parse_json(_decode(path))
    except json.JSONDecodeError as e:
        hint = " (one JSON object per line? then name the file .jsonl)" if e.msg == "Extra data" else ""
        raise LorafitError(
            f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}){hint}; "
            "expected a list of records or an object with one list field."
        ) from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise LorafitError(
                f"{path}: the top-level object has {len(lists)} list fields ({', '.join(lists) or 'none'}); "
                "expected a list of records or an object with exactly one list field "
                f"(keys: {', '.join(data)})."
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise LorafitError(f"{path}: found a JSON {_json_type(data)}; expected a list of records.")
    items: list[Record | BadRecord] = []
    for number, item in enumerate(data, start=1):
        where = f"{path} record {number}"
        if isinstance(item, dict):
            items.append(Record(item, where))
        else:
            items.append(BadRecord(where, f"found a JSON {_json_type(item)}; expected a JSON object."))
    return items


def _read_csv(path: Path) -> list[Record | BadRecord]:
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""))
    items: list[Record | BadRecord] = []
    try:
        for number, row in enumerate(reader, start=1):
            where = f"{path} row {number}"
            if None in row:
                items.append(
                    BadRecord(
                        f"{where} (line {reader.line_num})",
                        f"more fields than the header's {len(reader.fieldnames or [])}; "
                        "expected one value per column (quote text with commas).",
                    )
                )
                continue
            items.append(Record(_parse_json_cells(row), where))
    except csv.Error as e:
        raise LorafitError(f"{path} line {reader.line_num}: malformed CSV ({e}).") from None
    return items


def _parse_json_cells(row: dict) -> dict:
    """CSV cells are text: a ``messages``/``conversations`` cell holding a JSON list is parsed."""
    for key in ("messages", "conversations"):
        cell = row.get(key)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            try:
                row[key] = _parse_json(cell)
            except json.JSONDecodeError:
                pass  # left as text; to_messages reports that it is not a list of messages
    return row


def _read_parquet(path: Path) -> list[Record | BadRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise LorafitError(f"{path}: not a readable Parquet file ({e}).") from None
    return [Record(row, f"{path} row {number}") for number, row in enumerate(rows, start=1)]


def _read_hf(name: str, split: str) -> list[Record | BadRecord]:
    import datasets

    if not name:
        raise LorafitError(
            "hf:: no dataset name; expected hf:NAME or hf:NAME:SPLIT (e.g. hf:org/data:train)."
        )
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # hub, network and builder errors all come here: report, do not hide
        raise LorafitError(
            f"hf:{name}: could not load split '{split}' with datasets.load_dataset ({type(e).__name__}: {e})."
        ) from e
    if len(dataset) == 0:
        raise LorafitError(f"hf:{name}:{split}: the split holds no records; expected at least one.")
    return [Record(row, f"hf:{name} record {number}") for number, row in enumerate(dataset, start=1)]


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------

_FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


def _record_format(data: dict) -> str | None:
    for fmt, keys in _FORMAT_KEYS.items():
        if all(key in data for key in keys):
            return fmt
    return None


def detect_format(records: Sequence[Record]) -> str:
    """Return the one format of ``records`` (see ``FORMATS``), judged by their fields.

    ``messages`` -> messages, ``conversations`` -> sharegpt, ``instruction`` + ``output`` ->
    alpaca, ``prompt`` + ``completion`` -> prompt_completion, ``text`` -> text. Every record must
    have the same format; the first that does not is named in the error.
    """
    if not records:
        raise LorafitError("no records to detect a format from; expected at least one.")
    first = _record_format(records[0].data)
    if first is None:
        raise LorafitError(_unknown_format_message(records[0]))
    for record in records[1:]:
        if _record_format(record.data) != first:
            raise LorafitError(_format_mismatch(record, first, records[0], skip=False))
    return first


def _unknown_format_message(record: Record) -> str:
    keys = list(record.data)
    known = sorted({key for keys_ in _FORMAT_KEYS.values() for key in keys_} | {"input", "system"})
    hints = "".join(
        f"; '{key}'{did_you_mean(key, known)}"
        for key in keys
        if key not in known and did_you_mean(key, known)
    )
    expected = "; ".join(f"{fmt}: {' + '.join(k)}" for fmt, k in _FORMAT_KEYS.items())
    return (
        f"{record.where}: cannot tell the format from the fields {', '.join(keys) or '(none)'}{hints}; "
        f"expected the fields of one format ({expected})."
    )


def _convert_items(
    items: Sequence[Record | BadRecord], fmt: str, skip: bool
) -> tuple[str, list[tuple[Record, Any]], list[BadRecord]]:
    """Check and convert every record, in file order: ``(format, [(record, messages or text)], bad)``.

    With ``format: auto`` the first record decides the format (the most common one when
    ``skip``); a record in another format is bad. Without ``skip`` the first bad record raises.
    """
    records = [item for item in items if isinstance(item, Record)]
    reference = None
    if fmt == "auto":
        found = [(f, r) for r in records if (f := _record_format(r.data)) is not None]
        if found:
            counts = Counter(f for f, _ in found)
            fmt = counts.most_common(1)[0][0] if skip else found[0][0]
            reference = next(r for f, r in found if f == fmt)
    good: list[tuple[Record, Any]] = []
    bad: list[BadRecord] = []
    for item in items:
        try:
            if isinstance(item, BadRecord):
                raise LorafitError(str(item))
            if fmt == "auto" or reference is not None and _record_format(item.data) != fmt:
                raise LorafitError(_format_mismatch(item, fmt, reference, skip))
            good.append((item, to_text(item) if fmt == "text" else to_messages(item, fmt)))
        except LorafitError as e:
            if not skip:
                raise
            bad.append(item if isinstance(item, BadRecord) else BadRecord.from_error(item.where, e))
    return fmt, good, bad


def _format_mismatch(record: Record, fmt: str, reference: Record | None, skip: bool) -> str:
    own = _record_format(record.data)
    if own is None or reference is None:
        return _unknown_format_message(record)
    others = "most records look like" if skip else f"{reference.where} looks like"
    return (
        f"{record.where}: looks like format '{own}' but {others} '{fmt}'; "
        "expected every record in one format."
    )


def _field(record: Record, key: str, fmt: str) -> Any:
    if key not in record.data:
        raise LorafitError(
            f"{record.where}: missing field '{key}' for format {fmt}{did_you_mean(key, list(record.data))}; "
            f"the record has {', '.join(record.data) or 'no fields'}."
        )
    return record.data[key]


def _string(record: Record, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise LorafitError(f"{record.where}: field '{key}' is a {type(value).__name__}; expected a string.")
    if not value.strip():
        raise LorafitError(f"{record.where}: field '{key}' is empty; expected text.")
    _check_unicode(record, key, value)
    return value


def _check_unicode(record: Record, key: str, value: str) -> None:
    # JSON's "\ud800" escapes decode to unpaired surrogates, which no tokenizer can encode.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LorafitError(
            f"{record.where}: {key} holds {value[e.start]!r} at character {e.start + 1}, an unpaired "
            "surrogate that is not valid Unicode; expected text (fix the \\u escape in the file)."
        ) from None


def to_text(record: Record | dict) -> str:
    """The ``text`` field of a ``text``-format record (checked to be a non-empty string)."""
    record = record if isinstance(record, Record) else Record(record, "record")
    return _string(record, "text", _field(record, "text", "text"))


def to_messages(record: Record | dict, fmt: str) -> list[dict]:
    """Normalise a chat record to ``[{"role": ..., "content": ...}, ...]`` and validate it.

    Roles are ``system`` (optional, first), then ``user`` and ``assistant`` alternating, starting
    with ``user`` and ending with ``assistant``. A top-level ``system`` string field is put in
    front when the conversation has no system turn. Alpaca becomes one user turn (instruction,
    then a blank line and the input when there is one) and one assistant turn; prompt/completion
    strings likewise; prompt/completion lists of messages are joined. Errors name the record's
    file and line and the field (``messages[2].role``).
    """
    record = record if isinstance(record, Record) else Record(record, "record")
    if fmt == "messages":
        turns = _field(record, "messages", fmt)
        messages = _normalise_turns(record, "messages", turns, "role", "content", {r: r for r in ROLES})
    elif fmt == "sharegpt":
        turns = _field(record, "conversations", fmt)
        messages = _normalise_turns(record, "conversations", turns, "from", "value", SHAREGPT_ROLES)
    elif fmt == "alpaca":
        instruction = _string(record, "instruction", _field(record, "instruction", fmt))
        extra = record.data.get("input")
        if extra is not None and not isinstance(extra, str):
            raise LorafitError(
                f"{record.where}: field 'input' is a {type(extra).__name__}; expected a string."
            )
        if extra:
            _check_unicode(record, "input", extra)
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        output = _string(record, "output", _field(record, "output", fmt))
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "prompt_completion":
        prompt, completion = _field(record, "prompt", fmt), _field(record, "completion", fmt)
        if isinstance(prompt, list) and isinstance(completion, list):
            roles = {r: r for r in ROLES}
            messages = _normalise_turns(record, "prompt", prompt, "role", "content", roles)
            messages += _normalise_turns(record, "completion", completion, "role", "content", roles)
        else:
            messages = [
                {"role": "user", "content": _string(record, "prompt", prompt)},
                {"role": "assistant", "content": _string(record, "completion", completion)},
            ]
    elif fmt == "text":
        raise LorafitError(f"{record.where}: format 'text' has no messages; use to_text for it.")
    else:
        raise LorafitError(
            f"unknown format '{fmt}'{did_you_mean(fmt, FORMATS)}; expected one of {', '.join(FORMATS)}."
        )

    system = record.data.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        _check_unicode(record, "system", system)
        messages.insert(0, {"role": "system", "content": system})
    _check_order(record, messages, {"messages": "messages", "sharegpt": "conversations"}.get(fmt, fmt))
    return messages


def _normalise_turns(
    record: Record,
    field: str,
    turns: Any,
    role_key: str,
    content_key: str,
    roles: dict[str, str],
) -> list[dict]:
    if not isinstance(turns, list):
        raise LorafitError(
            f"{record.where}: field '{field}' is a {type(turns).__name__}; "
            f"expected a list of {{{role_key}, {content_key}}} objects."
        )
    if not turns:
        raise LorafitError(f"{record.where}: field '{field}' is an empty conversation; expected turns.")
    messages = []
    for i, turn in enumerate(turns):
        name = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise LorafitError(
                f"{record.where}: {name} is a {type(turn).__name__}; expected an object with "
                f"'{role_key}' and '{content_key}'."
            )
        for key in (role_key, content_key):
            if key not in turn:
                raise LorafitError(
                    f"{record.where}: {name} has no '{key}'{did_you_mean(key, list(turn))} "
                    f"(it has {', '.join(turn) or 'nothing'}); expected '{role_key}' and '{content_key}'."
                )
        role, content = turn[role_key], turn[content_key]
        if not isinstance(role, str) or role not in roles:
            raise LorafitError(
                f"{record.where}: {name}.{role_key} is {role!r}{did_you_mean(str(role), list(roles))}; "
                f"accepted roles: {', '.join(roles)}."
            )
        if not isinstance(content, str):
            raise LorafitError(
                f"{record.where}: {name}.{content_key} is a {type(content).__name__}; expected a string."
            )
        if not content.strip():
            raise LorafitError(f"{record.where}: {name}.{content_key} is an empty turn; expected text.")
        _check_unicode(record, f"{name}.{content_key}", content)
        messages.append({"role": roles[role], "content": content})
    return messages


def _check_order(record: Record, messages: list[dict], field: str) -> None:
    """System first (optional), then user/assistant alternating from user, ending with assistant."""
    if not any(m["role"] == "assistant" for m in messages):
        raise LorafitError(f"{record.where}: field '{field}' has no assistant turn; expected at least one.")
    start = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise LorafitError(
                f"{record.where}: roles out of order in '{field}': turn {i} is '{message['role']}', expected "
                f"'{expected}' (an optional system turn first, then user and assistant alternating)."
            )
    if messages[-1]["role"] != "assistant":
        raise LorafitError(
            f"{record.where}: field '{field}' ends with a user turn that has no assistant reply; "
            "expected the conversation to end with an assistant turn."
        )


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

_PAD_ALIASES = ("unk", "eos", "bos")


def prepare_tokenizer(
    tokenizer: Any,
    *,
    pad_token: str | None = "unk",
    padding_side: str = "right",
    model_max_length: int | None = None,
) -> Any:
    """Set the pad token, padding side and maximum length of ``tokenizer`` (in place; returned).

    ``pad_token`` is ``"unk"``, ``"eos"`` or ``"bos"`` (the tokenizer's own token of that kind),
    a token in the vocabulary (``"<|endoftext|>"``), or None to leave it. Phi-3 fine-tuning uses
    ``unk`` with right padding. Labels of padding are set by position, never by id, so padding
    with the eos token does not hide real eos labels.
    """
    if pad_token is not None:
        if pad_token in _PAD_ALIASES:
            token = getattr(tokenizer, f"{pad_token}_token", None)
            if token is None:
                others = [a for a in _PAD_ALIASES if getattr(tokenizer, f"{a}_token", None) is not None]
                raise LorafitError(
                    f"tokenizer.pad_token: the tokenizer has no {pad_token} token; expected one of "
                    f"{', '.join(others) or '(none)'} or a token in its vocabulary."
                )
        else:
            token = pad_token
            if token not in tokenizer.get_vocab():
                choices = list(_PAD_ALIASES) + list(tokenizer.all_special_tokens)
                raise LorafitError(
                    f"tokenizer.pad_token: {token!r} is not in the tokenizer's vocabulary"
                    f"{did_you_mean(token, choices)}; expected unk, eos, bos or one of its tokens "
                    f"({', '.join(tokenizer.all_special_tokens)})."
                )
        tokenizer.pad_token = token
    if padding_side not in ("left", "right"):
        raise LorafitError(
            f"tokenizer.padding_side: {padding_side!r}{did_you_mean(str(padding_side), ['left', 'right'])}; "
            "expected 'left' or 'right'."
        )
    tokenizer.padding_side = padding_side
    if model_max_length is not None:
        if (
            not isinstance(model_max_length, int)
            or isinstance(model_max_length, bool)
            or model_max_length < 1
        ):
            raise LorafitError(
                f"tokenizer.model_max_length: {model_max_length!r}; expected a positive integer."
            )
        tokenizer.model_max_length = model_max_length
    return tokenizer


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, where: str) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        raise LorafitError(
            f"{where}: the tokenizer's chat template failed on this conversation ({e})."
        ) from e


def _render_full(tokenizer: Any, messages: list[dict], where: str) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise LorafitError(
            f"{where}: the tokenizer has no chat template; set tokenizer.chat_template or use format: text."
        )
    return _render(tokenizer, messages, False, where)


def _render_conversation(
    tokenizer: Any, messages: list[dict], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The full chat-template text and the character span of each assistant turn's content.

    The assistant turn ``i`` starts where ``render(messages[:i], add_generation_prompt=True)``
    ends; that must be a prefix of the full rendering (true for Phi-3, ChatML, Llama 3, Mistral;
    false for templates that rewrite earlier turns, e.g. ones that drop past reasoning). The
    content is then found from that offset: at it, or after text the template inserts there (the
    first occurrence), trimmed if the template trims it.
    """
    full = _render_full(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True, where)
        if not full.startswith(prefix):
            raise LorafitError(
                f"{where}: the chat template renders turns 0..{i - 1} plus the generation prompt differently "
                f"from the same turns inside the whole conversation (not a prefix), so the tokens of "
                f"assistant turn {i} cannot be located; use a template that renders earlier turns unchanged, "
                "or set assistant_only_loss: false."
            )
        # the content as given, or trimmed (Llama 3's template trims): whichever starts first
        found = [
            (full.find(content, len(prefix)), -len(content))
            for content in {message["content"], message["content"].strip()}
        ]
        found = [(start, -minus_length) for start, minus_length in sorted(found) if start >= 0]
        if not found:
            raise LorafitError(
                f"{where}: the chat template does not copy assistant turn {i}'s content into its text, "
                "so its tokens cannot be located; set assistant_only_loss: false or fix the template."
            )
        start, length = found[0]
        spans.append((start, start + length))
    return full, spans


def _assistant_labels(
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int]],
    special_ids: set[int],
    where: str,
) -> list[int]:
    """Labels for the content tokens of each span of ``text``, plus its end-of-turn token.

    A content token is one whose characters overlap the span, so a word piece that also holds
    the template's separator (SentencePiece's ``▁Hello``) counts. A special token never counts:
    one that swallows whitespace next to it (``rstrip``/``lstrip``, as Phi-3's do) may overlap
    the content's first or last space; after the content it is the end-of-turn token. The
    end-of-turn token is the token right after the content, or the first special token after
    it when only whitespace tokens lie between (those are labelled too: the model must emit them).
    """
    labels = [IGNORE_INDEX] * len(ids)
    n, j = len(ids), 0
    for start, end in spans:
        # skip tokens before the span (a zero-width token counts as a point), and a special
        # token that starts before it
        while j < n and (
            (offsets[j][1] <= start if offsets[j][0] < offsets[j][1] else offsets[j][0] < start)
            or (offsets[j][0] < start and ids[j] in special_ids)
        ):
            j += 1
        first = j
        while j < n and offsets[j][0] < end and not (ids[j] in special_ids and offsets[j][1] > end):
            labels[j] = ids[j]
            j += 1
        if j == first:
            raise LorafitError(f"{where}: an assistant turn produced no tokens; expected text.")
        # the end-of-turn token (<|end|>, <|im_end|>, <|eot_id|>): the next token, or, when only
        # whitespace separates the content from a special token (Llama 2's " </s>"), up to it
        k = j
        while k < n and ids[k] not in special_ids and not text[offsets[k][0] : offsets[k][1]].strip():
            k += 1
        last = k if k < n and ids[k] in special_ids else j
        for m in range(j, min(last + 1, n)):
            labels[m] = ids[m]
        j = last + 1
    return labels


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise LorafitError(
            "assistant_only_loss needs a fast tokenizer (offset mapping); "
            f"{type(tokenizer).__name__} is not. "
            "Load it with AutoTokenizer (use_fast=True) or set assistant_only_loss: false."
        )


def _encode_conversations(
    tokenizer: Any, conversations: list[list[dict]], wheres: list[str], assistant_only_loss: bool
) -> list[tuple[list[int], list[int]]]:
    """Untruncated (input_ids, labels) for each conversation, tokenised as one batch."""
    if not assistant_only_loss:
        texts = [_render_full(tokenizer, m, w) for m, w in zip(conversations, wheres, strict=True)]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [(list(ids), list(ids)) for ids in encoded]
    _check_fast(tokenizer)
    rendered = [_render_conversation(tokenizer, m, w) for m, w in zip(conversations, wheres, strict=True)]
    texts = [text for text, _ in rendered]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    special_ids = set(tokenizer.all_special_ids)
    for ids, offsets, (text, spans), where in zip(
        encoded["input_ids"], encoded["offset_mapping"], rendered, wheres, strict=True
    ):
        out.append((list(ids), _assistant_labels(text, ids, offsets, spans, special_ids, where)))
    return out


def _encode_texts(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) for plain texts: the tokenizer's own special tokens, then eos; all labels."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append((ids, list(ids)))
    return out


def _fit(ids: list[int], labels: list[int], max_length: int, overlong: str) -> tuple[dict | None, str]:
    """Apply the length policy: (example or None, "ok" | "truncated" | "too_long" | "no_labels")."""
    status = "ok"
    if len(ids) > max_length:
        if overlong == "drop":
            return None, "too_long"
        ids, labels, status = ids[:max_length], labels[:max_length], "truncated"
    if all(label == IGNORE_INDEX for label in labels):
        return None, "no_labels"
    return {"input_ids": ids, "labels": labels}, status


def _check_length_settings(max_length: int, overlong: str) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise LorafitError(f"data.max_length: {max_length!r}; expected an integer of at least 2.")
    if overlong not in OVERLONG:
        raise LorafitError(
            f"data.overlong: {overlong!r}{did_you_mean(str(overlong), OVERLONG)}; expected one of "
            f"{', '.join(OVERLONG)}."
        )


def tokenize_conversation(
    tokenizer: Any,
    messages: list[dict],
    *,
    max_length: int,
    assistant_only_loss: bool = True,
    overlong: str = "truncate",
    where: str = "conversation",
) -> dict | None:
    """Tokenise ``messages`` with the tokenizer's own chat template: ``{"input_ids", "labels"}``.

    With ``assistant_only_loss`` the labels are each assistant turn's content tokens and its
    end-of-turn token; everything else is -100 (see the module docstring for how the tokens are
    located). Without it every token is a label. Longer than ``max_length``: ``overlong="truncate"``
    cuts it, ``"drop"`` returns None. None too when no label is left (e.g. truncation removed every
    assistant token). ``where`` names the record in errors.
    """
    _check_length_settings(max_length, overlong)
    ids, labels = _encode_conversations(tokenizer, [messages], [where], assistant_only_loss)[0]
    return _fit(ids, labels, max_length, overlong)[0]


def tokenize_text(tokenizer: Any, text: str, *, max_length: int, overlong: str = "truncate") -> dict | None:
    """Tokenise plain text (special tokens as the tokenizer adds them, then eos); every token a label."""
    _check_length_settings(max_length, overlong)
    ids, labels = _encode_texts(tokenizer, [text])[0]
    return _fit(ids, labels, max_length, overlong)[0]


# --------------------------------------------------------------------------------------------
# Packing and collation
# --------------------------------------------------------------------------------------------


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of at most ``max_length``.

    Longest example first (ties: lower index first), each into the open row with the least room
    that still fits it, else a new row. Deterministic; indices within a row are sorted. Open rows
    are kept in buckets by free room, so each step is one bisect over the (at most
    ``max_length``) distinct free-room values: 5000 examples pack in milliseconds.
    """
    if max_length < 1:
        raise LorafitError(f"pack: max_length {max_length}; expected a positive integer.")
    bad = next((i for i, n in enumerate(lengths) if not 1 <= n <= max_length), None)
    if bad is not None:
        raise LorafitError(f"pack: example {bad} has length {lengths[bad]}; expected 1..{max_length}.")
    rows: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct free room values that have at least one open row
    by_room: dict[int, list[int]] = {}  # free room -> open rows (indices into `rows`)
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        k = bisect_left(rooms, length)
        if k == len(rooms):
            row = len(rows)
            rows.append([index])
            room = max_length - length
        else:
            room = rooms[k]
            bucket = by_room[room]
            row = bucket.pop()
            if not bucket:
                del by_room[room]
                rooms.pop(k)
            rows[row].append(index)
            room -= length
        if room > 0:
            if room not in by_room:
                by_room[room] = []
                insort(rooms, room)
            by_room[room].append(row)
    return [sorted(row) for row in rows]


def _as_list(values: Any) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _concat_row(row: Any) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, position_ids) of one packed row; each example's first label is -100."""
    if isinstance(row, dict) and "position_ids" in row:
        ids, labels, positions = (
            _as_list(row["input_ids"]),
            _as_list(row["labels"]),
            _as_list(row["position_ids"]),
        )
        # a token at position 0 starts an example: nothing before it may predict it
        labels = [IGNORE_INDEX if p == 0 else label for p, label in zip(positions, labels, strict=True)]
        return ids, labels, positions
    examples = [row] if isinstance(row, dict) else row
    ids, labels, positions = [], [], []
    for example in examples:
        example_ids = _as_list(example["input_ids"])
        ids += example_ids
        labels += [IGNORE_INDEX] + _as_list(example["labels"])[1:]
        positions += list(range(len(example_ids)))
    return ids, labels, positions


def _check_pad_id(pad_token_id: Any, name: str) -> None:
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise LorafitError(
            f"{name}: pad_token_id is {pad_token_id!r}; expected the tokenizer's pad id (an integer). "
            "Set one with prepare_tokenizer(tokenizer, pad_token='unk')."
        )


def _padded_length(longest: int, multiple: int | None) -> int:
    return longest if not multiple else -(-longest // multiple) * multiple


@dataclass
class PackedCollator:
    """Collate packed rows into ``input_ids``, ``labels``, ``position_ids``, all (B, T) int64, and
    with ``example_boundaries`` the examples' starts ``cu_seq_lens_q`` = ``cu_seq_lens_k`` (int32,
    over the B * T tokens, then B * T).

    A row is a list of examples (``{"input_ids", "labels"}``), one such example, or a row already
    concatenated with ``position_ids`` (what ``PackedDataset`` yields). There is deliberately no
    ``attention_mask``: transformers finds the example boundaries where position_ids restart and
    masks attention block-diagonally (the model must run with ``use_cache=False``, as under
    ``Trainer``). Each example's first label is -100, so the previous example's last token never
    learns to predict it. Rows are right-padded to the batch's longest row (or a multiple of
    ``pad_to_multiple_of``) with ``pad_token_id`` and label -100; padding gets its own
    position_ids 0, 1, ... so it forms a separate block that no example attends to.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    example_boundaries: bool = False  # add cu_seq_lens_q/k (a model given lorafit.attention needs them)

    def __post_init__(self) -> None:
        _check_pad_id(self.pad_token_id, "PackedCollator")

    def __call__(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        parts = [_concat_row(row) for row in rows]
        width = _padded_length(max(len(ids) for ids, _, _ in parts), self.pad_to_multiple_of)
        input_ids = torch.full((len(parts), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(parts), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(parts), width), dtype=torch.long)
        for b, (ids, row_labels, positions) in enumerate(parts):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            labels[b, :n] = torch.tensor(row_labels)
            position_ids[b, :n] = torch.tensor(positions)
            position_ids[b, n:] = torch.arange(width - n)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.example_boundaries:
            # Over the flattened (B * T) tokens, padding blocks included, under the names
            # transformers passes on to attention functions (only to models whose forward takes
            # **kwargs: hence opt-in). sdpa and eager ignore them; flash-attention (without
            # max_length_q/k) still goes by the position_ids.
            starts = (position_ids.view(-1) == 0).nonzero().view(-1)
            cu_seq_lens = torch.cat([starts, torch.tensor([position_ids.numel()])]).to(torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
        return batch


@dataclass
class PaddedCollator:
    """Collate single examples (no packing): right-padded ``input_ids``, ``attention_mask``, ``labels``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        _check_pad_id(self.pad_token_id, "PaddedCollator")

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = _padded_length(max(len(e["input_ids"]) for e in examples), self.pad_to_multiple_of)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for b, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[b, :n] = torch.tensor(_as_list(example["input_ids"]))
            labels[b, :n] = torch.tensor(_as_list(example["labels"]))
            attention_mask[b, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collator_for(
    tokenizer: Any, *, packing: bool, pad_to_multiple_of: int | None = None, example_boundaries: bool = False
):
    """The collator matching ``build_datasets(packing=...)``, padding with the tokenizer's pad id;
    ``example_boundaries`` (packed rows only) is :class:`PackedCollator`'s."""
    if packing:
        return PackedCollator(tokenizer.pad_token_id, pad_to_multiple_of, example_boundaries)
    return PaddedCollator(tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples stored flat: item ``i`` is ``{"input_ids": [...], "labels": [...]}``.

    ``input_ids`` and ``labels`` are int32 arrays of all tokens back to back; example ``i`` spans
    ``offsets[i]:offsets[i + 1]``.
    """

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> None:
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets

    @classmethod
    def from_examples(cls, examples: Iterable[dict]) -> TokenizedDataset:
        examples = list(examples)
        lengths = [len(e["input_ids"]) for e in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = [t for e in examples for t in e["input_ids"]]
        flat_labels = [t for e in examples for t in e["labels"]]
        return cls(np.asarray(flat, dtype=np.int32), np.asarray(flat_labels, dtype=np.int32), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        a, b = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.input_ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class PackedDataset(torch.utils.data.Dataset):
    """Rows of packed examples: item ``i`` is ``{"input_ids", "labels", "position_ids"}``.

    Row ``i`` concatenates the examples ``rows[i]``; position_ids restart at 0 per example and
    each example's first label is -100 (see ``PackedCollator``).
    """

    def __init__(self, examples: TokenizedDataset, rows: list[list[int]]) -> None:
        self.examples, self.rows = examples, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples
        spans = [(ex.offsets[j], ex.offsets[j + 1]) for j in self.rows[i]]
        input_ids = np.concatenate([ex.input_ids[a:b] for a, b in spans])
        labels = np.concatenate([ex.labels[a:b] for a, b in spans])
        starts = np.cumsum([0] + [b - a for a, b in spans[:-1]])
        labels[starts] = IGNORE_INDEX
        positions = np.concatenate([np.arange(b - a) for a, b in spans])
        return {
            "input_ids": input_ids.tolist(),
            "labels": labels.tolist(),
            "position_ids": positions.tolist(),
        }


# --------------------------------------------------------------------------------------------
# Building (read -> convert -> tokenise, cached -> pack)
# --------------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("LORAFIT_CACHE") or Path.home() / ".cache" / "lorafit")


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about the tokenizer that changes the tokens (not the pad token)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        **{k: str(getattr(tokenizer, k, None)) for k in ("bos_token", "eos_token", "unk_token")},
        **{k: str(getattr(tokenizer, k, None)) for k in ("add_bos_token", "add_eos_token")},
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _records_fingerprint(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for record in records:
        text = json.dumps(record.data, sort_keys=True, ensure_ascii=False, default=str)
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def _encode(tokenizer: Any, fmt: str, chunk: Sequence[tuple[Record, Any]], assistant_only_loss: bool) -> list:
    if fmt == "text":
        return _encode_texts(tokenizer, [text for _, text in chunk])
    return _encode_conversations(
        tokenizer, [messages for _, messages in chunk], [r.where for r, _ in chunk], assistant_only_loss
    )


def _tokenize_records(
    tokenizer: Any,
    converted: Sequence[tuple[Record, Any]],
    fmt: str,
    *,
    max_length: int,
    assistant_only_loss: bool,
    overlong: str,
    skip: bool,
    progress: bool,
    desc: str,
) -> tuple[TokenizedDataset, dict]:
    """Tokenise ``(record, messages or text)`` pairs in chunks and apply the length policy.

    ``stats["skipped"]`` holds ``[where, reason]`` for each record the template could not
    tokenise (with ``skip``; else that raises) and each the length policy dropped.
    """
    from tqdm.auto import tqdm

    examples: list[dict] = []
    skipped: list[list[str]] = []
    counts = {"ok": 0, "truncated": 0, "too_long": 0, "no_labels": 0}
    reasons = {
        "too_long": f"longer than max_length {max_length} tokens (data.overlong: drop)",
        "no_labels": f"no assistant tokens left within max_length {max_length} tokens",
    }
    bar = tqdm(
        total=len(converted),
        desc=desc,
        unit="rec",
        disable=not progress or len(converted) < _PROGRESS_MIN_RECORDS,
    )
    with bar:
        for begin in range(0, len(converted), _CHUNK):
            chunk = converted[begin : begin + _CHUNK]
            try:
                encoded: list = _encode(tokenizer, fmt, chunk, assistant_only_loss)
            except LorafitError:
                if not skip:
                    raise
                encoded = []  # find the records that fail, one at a time
                for pair in chunk:
                    try:
                        encoded += _encode(tokenizer, fmt, [pair], assistant_only_loss)
                    except LorafitError as e:
                        encoded.append(BadRecord.from_error(pair[0].where, e))
            for (record, _), result in zip(chunk, encoded, strict=True):
                if isinstance(result, BadRecord):
                    skipped.append([result.where, result.reason])
                    continue
                example, status = _fit(*result, max_length, overlong)
                counts[status] += 1
                if example is not None:
                    examples.append(example)
                elif status in reasons:
                    skipped.append([record.where, reasons[status]])
            bar.update(len(chunk))
    dataset = TokenizedDataset.from_examples(examples)
    stats = {
        "records": len(converted),
        "examples": len(dataset),
        "dropped_too_long": counts["too_long"],
        "dropped_no_assistant": counts["no_labels"],
        "truncated": counts["truncated"],
        "tokens": int(len(dataset.input_ids)),
        "label_tokens": int((dataset.labels != IGNORE_INDEX).sum()),
        "skipped": skipped,
    }
    return dataset, stats


def _cached_tokenize(
    tokenizer: Any, converted: Sequence[tuple[Record, Any]], fmt: str, cache_root: Path, **settings
) -> tuple:
    """``_tokenize_records`` behind an on-disk cache (safetensors arrays + JSON stats in its metadata)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    key_fields = {
        "version": _CACHE_VERSION,
        "records": _records_fingerprint([record for record, _ in converted]),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "format": fmt,
        **{k: settings[k] for k in ("max_length", "assistant_only_loss", "overlong", "skip")},
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_root / "tokenized" / f"{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="np") as f:
                stats = json.loads(f.metadata()["stats"])
                dataset = TokenizedDataset(
                    f.get_tensor("input_ids"), f.get_tensor("labels"), f.get_tensor("offsets")
                )
            return dataset, stats, True
        except Exception:  # a truncated or foreign file: tokenise again and overwrite it
            pass
    dataset, stats = _tokenize_records(tokenizer, converted, fmt, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    arrays = {"input_ids": dataset.input_ids, "labels": dataset.labels, "offsets": dataset.offsets}
    save_file(arrays, str(tmp), metadata={"stats": json.dumps(stats), "key": json.dumps(key_fields)})
    os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    return dataset, stats, False


def _build_split(
    tokenizer: Any,
    items: list[Record | BadRecord],
    fmt: str,
    name: str,
    *,
    max_length: int,
    packing: bool,
    assistant_only_loss: bool,
    overlong: str,
    skip_bad_records: bool,
    cache_root: Path,
    progress: bool,
) -> tuple[torch.utils.data.Dataset, dict]:
    fmt, converted, bad = _convert_items(items, fmt, skip_bad_records)
    if not converted:
        raise LorafitError(
            f"data.{name}: all {len(items)} records are bad (the first: {bad[0]}); "
            "expected at least one record to train on."
        )
    dataset, stats, hit = _cached_tokenize(
        tokenizer,
        converted,
        fmt,
        cache_root,
        max_length=max_length,
        assistant_only_loss=assistant_only_loss,
        overlong=overlong,
        skip=skip_bad_records,
        progress=progress,
        desc=f"Tokenising {name}",
    )
    failed = len(stats["skipped"]) - stats["dropped_too_long"] - stats["dropped_no_assistant"]
    skipped = [{"where": b.where, "reason": b.reason} for b in bad]
    skipped += [{"where": where, "reason": reason} for where, reason in stats["skipped"]]
    stats = {
        "format": fmt,
        **stats,
        "records": len(items),
        "bad_records": len(bad) + failed,
        "skipped": skipped,
        "cache_hit": hit,
    }
    if len(dataset) == 0:
        raise LorafitError(
            f"data.{name}: no example left out of {stats['records']} records "
            f"({stats['dropped_too_long']} longer than max_length {max_length}, "
            f"{stats['dropped_no_assistant']} with no assistant tokens after truncation"
            + (f", {stats['bad_records']} bad" if stats["bad_records"] else "")
            + "); raise data.max_length or use overlong: truncate."
        )
    if packing:
        rows = pack(dataset.lengths.tolist(), max_length)
        stats["packed_rows"] = len(rows)
        stats["packing_efficiency"] = stats["tokens"] / (len(rows) * max_length)
        return PackedDataset(dataset, rows), stats
    stats["packed_rows"] = None
    stats["packing_efficiency"] = None
    return dataset, stats


def build_datasets(
    tokenizer: Any,
    *,
    train: str | Path,
    eval: str | Path | None = None,  # named after the config key
    eval_split: str | None = None,
    eval_fraction: float | None = None,
    format: str = "auto",  # named after the config key
    max_length: int = 2048,
    packing: bool = True,
    assistant_only_loss: bool = True,
    overlong: str = "truncate",
    skip_bad_records: bool = False,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None, dict]:
    """Read, check, convert, tokenise (cached) and pack the train and optional eval data.

    ``train`` / ``eval`` are sources for ``read_records``. At most one of ``eval`` (a source),
    ``eval_split`` (another split of an ``hf:`` train source) and ``eval_fraction`` (that share of
    the train records, drawn with ``seed``). The first bad record stops the build with its file
    and line, unless ``skip_bad_records``. Tokenisation is cached under ``cache_dir`` (default
    ``$LORAFIT_CACHE`` or ``~/.cache/lorafit``), keyed by the records' content, the tokenizer and
    the settings. Returns ``(train, eval or None, stats)``: ``PackedDataset`` rows for
    ``PackedCollator`` when ``packing``, else ``TokenizedDataset`` examples for ``PaddedCollator``
    (``collator_for`` picks). ``stats`` holds the train counts (records, examples, bad_records,
    dropped_too_long, dropped_no_assistant, truncated, tokens, label_tokens, packed_rows,
    packing_efficiency, format, cache_hit), ``skipped`` (``{"where", "reason"}`` for every record
    not trained on: bad ones and those the length policy dropped) and ``stats["eval"]`` the same
    for eval, or None.
    """
    _check_length_settings(max_length, overlong)
    if format != "auto" and format not in FORMATS:
        raise LorafitError(
            f"data.format: {format!r}{did_you_mean(str(format), FORMATS)}; expected auto or one of "
            f"{', '.join(FORMATS)}."
        )
    chosen = [
        name
        for name, value in (("eval", eval), ("eval_split", eval_split), ("eval_fraction", eval_fraction))
        if value is not None
    ]
    if len(chosen) > 1:
        raise LorafitError(
            f"data: {' and '.join(chosen)} are both set; expected at most one way to get eval data."
        )

    train_items = _read_items(train)
    eval_items: list[Record | BadRecord] | None = None
    if eval is not None:
        eval_items = _read_items(eval)
    elif eval_split is not None:
        if not str(train).startswith("hf:"):
            raise LorafitError(
                f"data.eval_split: {eval_split!r} needs an hf:NAME train source, "
                f"but train is {str(train)!r}; "
                "use data.eval (a file) or data.eval_fraction for local files."
            )
        name = str(train)[3:].partition(":")[0]
        eval_items = _read_items(f"hf:{name}:{eval_split}")
    elif eval_fraction is not None:
        if not skip_bad_records:
            _convert_items(train_items, format, skip=False)  # the first bad record, in file order
        records = [item for item in train_items if isinstance(item, Record)]
        kept, eval_items = _split_fraction(records, eval_fraction, seed)
        train_items = [item for item in train_items if isinstance(item, BadRecord)] + kept

    common = {
        "max_length": max_length,
        "packing": packing,
        "assistant_only_loss": assistant_only_loss,
        "overlong": overlong,
        "skip_bad_records": skip_bad_records,
        "cache_root": _cache_root(cache_dir),
        "progress": progress,
    }
    train_set, stats = _build_split(tokenizer, train_items, format, "train", **common)
    eval_set, stats["eval"] = None, None
    if eval_items is not None:
        eval_set, stats["eval"] = _build_split(tokenizer, eval_items, format, "eval", **common)
    return train_set, eval_set, stats


def _split_fraction(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise LorafitError(
            f"data.eval_fraction: {fraction!r}; expected a number between 0 and 1 (e.g. 0.05)."
        )
    n_eval = max(1, round(len(records) * fraction))
    if n_eval >= len(records):
        raise LorafitError(
            f"data.eval_fraction: {fraction} of {len(records)} records leaves no training data; "
            "expected a smaller fraction or more records."
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held_out]
    eval_ = [r for i, r in enumerate(records) if i in held_out]
    return train, eval_


def dataset_fingerprint(dataset: Any) -> str:
    """A hash of a lorafit dataset's tokens, labels, example boundaries and packed rows.

    Works on ``TokenizedDataset`` and ``PackedDataset`` (whose ``examples`` and ``rows`` say
    which examples share a row); any other dataset is hashed through its items.
    """
    h = hashlib.sha256()
    examples = getattr(dataset, "examples", dataset)
    arrays = [getattr(examples, name, None) for name in ("input_ids", "labels", "offsets")]
    if all(a is not None for a in arrays):
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        rows = getattr(dataset, "rows", None)
        if rows is not None:
            h.update(np.asarray([len(r) for r in rows], dtype=np.int64).tobytes())
            h.update(np.asarray([i for r in rows for i in r], dtype=np.int64).tobytes())
    else:
        for i in range(len(dataset)):
            h.update(repr(dataset[i]).encode())
    h.update(str(len(dataset)).encode())
    return h.hexdigest()
