"""Files -> records: JSONL, JSON, CSV, Parquet, folders of them, and ``hf:`` datasets.

Every record keeps where it came from (``Record.where``: file and line), so every later error
can name it. A record that cannot be read (a JSON line that does not parse, bytes that are not
UTF-8, a CSV row with extra fields) is a ``BadRecord`` in file order: ``read_records`` raises on
the first unless it is given a list to collect them in (``skip_bad_records``).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError, did_you_mean

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


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
