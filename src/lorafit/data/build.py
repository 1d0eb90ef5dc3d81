"""The whole data flow, cached: read -> check and convert -> tokenise -> pack.

Bad records. Every record is checked in file order before anything is tokenised. By default the
first bad one (malformed JSON, bytes that are not UTF-8, wrong types, unknown roles, empty turns,
a record of another format) stops the build with its file, line and field. With
``skip_bad_records`` each bad record becomes a ``BadRecord`` (where, reason) and the rest train;
``stats["skipped"]`` lists them, with the examples the length policy dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafit.constants import IGNORE_INDEX
from lorafit.data.formats import _convert_items, check_format_name, check_tools
from lorafit.data.pack import PackedDataset, TokenizedDataset, pack
from lorafit.data.read import BadRecord, Record, _read_items, read_records
from lorafit.data.template import (
    TemplateCannotRender,
    _encode_conversations,
    _encode_texts,
    _fit,
    check_length_settings,
    check_turn_settings,
)
from lorafit.disk import atomic_write
from lorafit.errors import LorafitError

# Bump when tokenisation or the cache layout changes, so old cache files are never reused.
_CACHE_VERSION = "lorafit-data-3"  # 3: turns labelled through the stop token; tools, reasoning


_PROGRESS_MIN_RECORDS = 1000


_CHUNK = 512


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


def _encode(tokenizer: Any, fmt: str, chunk: Sequence[tuple[Record, Any]], turns: dict) -> list:
    """``turns``: ``assistant_only_loss``, ``reasoning`` and ``train_on``."""
    if fmt == "text":
        return _encode_texts(tokenizer, [text for _, text in chunk])
    return _encode_conversations(
        tokenizer,
        [conversation for _, conversation in chunk],
        [r.where for r, _ in chunk],
        turns["assistant_only_loss"],
        reasoning=turns["reasoning"],
        train_on=turns["train_on"],
    )


def _encode_chunk(
    tokenizer: Any, fmt: str, chunk: Sequence[tuple[Record, Any]], turns: dict, skip: bool
) -> list:
    """``_encode`` of a chunk as one batch; with ``skip``, a chunk that fails is encoded again one
    record at a time, so that only the records that fail become ``BadRecord``s. A template that
    cannot render the data's tools stops the build even so: no record with tools would train."""
    try:
        return _encode(tokenizer, fmt, chunk, turns)
    except TemplateCannotRender:
        raise
    except LorafitError:
        if not skip:
            raise
    encoded: list = []
    for pair in chunk:
        try:
            encoded += _encode(tokenizer, fmt, [pair], turns)
        except TemplateCannotRender:
            raise
        except LorafitError as e:
            encoded.append(BadRecord.from_error(pair[0].where, e))
    return encoded


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
    reasoning: str = "train",
    train_on: str = "all",
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
            turns = {"assistant_only_loss": assistant_only_loss, "reasoning": reasoning, "train_on": train_on}
            encoded = _encode_chunk(tokenizer, fmt, chunk, turns, skip)
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
        **{
            k: settings[k]
            for k in ("max_length", "assistant_only_loss", "overlong", "skip", "reasoning", "train_on")
        },
        # the file-wide tools change the rendering; a record's own tools are in its fingerprint
        "tools": settings.pop("tools_fingerprint"),
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
    arrays = {"input_ids": dataset.input_ids, "labels": dataset.labels, "offsets": dataset.offsets}
    metadata = {"stats": json.dumps(stats), "key": json.dumps(key_fields)}
    # atomic: a concurrent reader (another rank) sees the old file or the whole new one
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))
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
    reasoning: str = "train",
    train_on: str = "all",
    tools: list[dict] | None = None,
) -> tuple[torch.utils.data.Dataset, dict]:
    fmt, converted, bad = _convert_items(items, fmt, skip_bad_records, tools)
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
        reasoning=reasoning,
        train_on=train_on,
        tools_fingerprint=hashlib.sha256(json.dumps(tools, sort_keys=True).encode()).hexdigest(),
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
    reasoning: str = "train",
    train_on: str = "all",
    tools: str | Path | list[dict] | None = None,
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

    ``reasoning`` (train, mask, drop) and ``train_on`` (all, last) decide which assistant tokens
    are labelled (see :mod:`lorafit.data.template`); ``tools`` is the tool list for records that
    have none of their own: a list of function schemas or a JSON file holding one.
    """
    check_length_settings(max_length, overlong)
    check_format_name(format)
    check_turn_settings(reasoning, train_on)
    tool_list = load_tools(tools)
    train_items, eval_items = _read_splits(
        train, eval, eval_split, eval_fraction, format=format, skip=skip_bad_records, seed=seed
    )
    common = {
        "max_length": max_length,
        "packing": packing,
        "assistant_only_loss": assistant_only_loss,
        "overlong": overlong,
        "skip_bad_records": skip_bad_records,
        "cache_root": _cache_root(cache_dir),
        "progress": progress,
        "reasoning": reasoning,
        "train_on": train_on,
        "tools": tool_list,
    }
    train_set, stats = _build_split(tokenizer, train_items, format, "train", **common)
    eval_set, stats["eval"] = None, None
    if eval_items is not None:
        eval_set, stats["eval"] = _build_split(tokenizer, eval_items, format, "eval", **common)
    return train_set, eval_set, stats


def load_tools(tools: str | Path | list[dict] | None) -> list[dict] | None:
    """``data.tools``: None, a list of function schemas, or a JSON file holding one."""
    if tools is None or isinstance(tools, list):
        return check_tools(tools, "data.tools") if tools else None
    path = Path(tools)
    if not path.is_file():
        raise LorafitError(f"data.tools: {path} is not a file; expected a JSON file holding a list of tools.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorafitError(f"{path}: not a JSON file ({e}); expected a list of function schemas.") from None
    return check_tools(value, f"data.tools ({path})")


def _read_splits(
    train: str | Path,
    eval: str | Path | None,
    eval_split: str | None,
    eval_fraction: float | None,
    *,
    format: str,
    skip: bool,
    seed: int,
) -> tuple[list[Record | BadRecord], list[Record | BadRecord] | None]:
    """The train items and the eval items (None without eval data) from at most one eval source."""
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
    if eval is not None:
        return train_items, _read_items(eval)
    if eval_split is not None:
        if not str(train).startswith("hf:"):
            raise LorafitError(
                f"data.eval_split: {eval_split!r} needs an hf:NAME train source, "
                f"but train is {str(train)!r}; "
                "use data.eval (a file) or data.eval_fraction for local files."
            )
        name = str(train)[3:].partition(":")[0]
        return train_items, _read_items(f"hf:{name}:{eval_split}")
    if eval_fraction is None:
        return train_items, None
    if not skip:
        _convert_items(train_items, format, skip=False)  # the first bad record, in file order
    records = [item for item in train_items if isinstance(item, Record)]
    kept, eval_items = _split_fraction(records, eval_fraction, seed)
    return [item for item in train_items if isinstance(item, BadRecord)] + kept, eval_items


def held_out_records(train: str | Path, fraction: float, seed: int) -> list[Record]:
    """The records ``eval_fraction`` holds out of ``train`` (as ``build_datasets`` draws them)."""
    return _split_fraction(read_records(train, bad=[]), fraction, seed)[1]


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
