"""Preference records -> token rows for DPO, ORPO, SimPO (pairs) and KTO (unpaired).

TRL's dataset formats, detected from the fields:

* ``preference``: ``prompt``, ``chosen``, ``rejected``. Strings (the prompt becomes a user turn,
  each answer an assistant turn; a top-level ``system`` string goes first) or message lists
  (``prompt``: a system turn and/or earlier turns, ending with the user's; ``chosen`` and
  ``rejected``: the assistant's answer as a list of messages).
* ``implicit_preference``: ``chosen`` and ``rejected`` only, each a whole conversation; the prompt
  is the turns both share from the start (TRL's ``extract_prompt``).
* ``unpaired_preference``: ``prompt``, ``completion`` and a bool ``label`` (KTO).

The tokenizer's chat template renders prompt + answer as one conversation, and the answer's
tokens (its content and end-of-turn token, as SFT labels them) are found by position
(:mod:`lorafit.data.template`), so the answer mask is right for any template. A tokenizer
without a chat template gets TRL's plain-text rows: prompt + answer + eos, the answer starting
where the tokens of the prompt alone end.

Length, as TRL's collators: each sequence (prompt + answer) longer than ``max_length`` keeps
its first (``keep_start``) or last (``keep_end``) ``max_length`` tokens; a pair whose prompt fills
``max_length`` under ``keep_start`` is dropped (nothing of its answer would be left).
``overlong: drop`` drops every pair with a sequence over ``max_length`` instead, with a count.

A run keeps the tokenised examples in the cache SFT's rows use (``$LORAFIT_CACHE/tokenized``),
keyed by the records' content, the tokenizer, the method and these settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorafit.constants import IGNORE_INDEX
from lorafit.data.formats import _check_order, _check_unicode, _normalise_turns
from lorafit.data.read import BadRecord, Record, _read_items
from lorafit.data.template import _encode_conversations
from lorafit.errors import LorafitError, did_you_mean
from lorafit.methods import TRUNCATION_MODES

PREFERENCE_FORMATS = ("preference", "implicit_preference", "unpaired_preference")
_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def preference_format(data: dict) -> str | None:
    """The preference format a record's fields say (see the module docstring), or None."""
    if "completion" in data and "label" in data:
        return "unpaired_preference"
    if "chosen" in data or "rejected" in data:
        return "preference" if "prompt" in data else "implicit_preference"
    return None


@dataclass(frozen=True)
class PreferenceRecord:
    """A record as conversations: the prompt turns and one or two answers (assistant turns)."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict] | None = None  # None for an unpaired (KTO) record
    label: bool | None = None  # KTO: whether ``chosen`` (the completion) is desirable
    text: bool = False  # plain strings: rendered as text when the tokenizer has no chat template


def to_preference(record: Record, method: str) -> PreferenceRecord:
    """Check and convert one record; errors name the record's file and line and the field."""
    fmt = preference_format(record.data)
    paired = method != "kto"
    if fmt is None or (fmt == "unpaired_preference") == paired:
        expected = (
            "prompt + chosen + rejected (or chosen + rejected sharing their first turns)"
            if paired
            else "prompt + completion + label"
        )
        keys = list(record.data)
        known = ["prompt", "chosen", "rejected", "completion", "label", "system"]
        hints = "".join(
            f"; '{k}'{did_you_mean(k, known)}" for k in keys if k not in known and did_you_mean(k, known)
        )
        raise LorafitError(
            f"{record.where}: method {method} needs the fields {expected}; the record has "
            f"{', '.join(keys) or 'no fields'}{hints}."
        )
    data = record.data
    if fmt == "unpaired_preference":
        label = data["label"]
        if not isinstance(label, bool):
            raise LorafitError(
                f"{record.where}: field 'label' is {label!r} ({type(label).__name__}); expected true "
                "(a desirable completion) or false (an undesirable one)."
            )
        prompt, completion, text = _prompt_and_answer(record, "prompt", "completion")
        return PreferenceRecord(prompt, completion, None, label, text)
    for key in ("chosen", "rejected"):
        if key not in data:
            raise LorafitError(
                f"{record.where}: missing field '{key}'{did_you_mean(key, list(data))}; a preference pair "
                f"needs both 'chosen' and 'rejected' (the record has {', '.join(data)})."
            )
    if fmt == "implicit_preference":
        prompt, chosen, rejected = _split_implicit(record)
        text = False
    else:
        prompt, chosen, text = _prompt_and_answer(record, "prompt", "chosen")
        _, rejected, _ = _prompt_and_answer(record, "prompt", "rejected")
    if chosen == rejected:
        raise LorafitError(
            f"{record.where}: field 'rejected' is the same answer as 'chosen'; a pair teaches nothing "
            "unless the answers differ."
        )
    return PreferenceRecord(prompt, chosen, rejected, None, text)


def _prompt_and_answer(record: Record, prompt_key: str, answer_key: str) -> tuple[list, list, bool]:
    prompt, answer = record.data[prompt_key], record.data[answer_key]
    if isinstance(prompt, str) and isinstance(answer, str):
        for key, value in ((prompt_key, prompt), (answer_key, answer)):
            if not value.strip():
                raise LorafitError(f"{record.where}: field '{key}' is empty; expected text.")
            _check_unicode(record, key, value)
        turns = [{"role": "user", "content": prompt}]
        system = record.data.get("system")
        if isinstance(system, str) and system.strip():
            turns.insert(0, {"role": "system", "content": system})
        return turns, [{"role": "assistant", "content": answer}], True
    if isinstance(prompt, list) and isinstance(answer, list):
        turns = _normalise_turns(record, prompt_key, prompt, "role", "content", _ROLES)
        reply = _normalise_turns(record, answer_key, answer, "role", "content", _ROLES)
        system = record.data.get("system")
        if isinstance(system, str) and system.strip() and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system})
        if turns[-1]["role"] != "user":
            raise LorafitError(
                f"{record.where}: field '{prompt_key}' ends with a {turns[-1]['role']} turn; expected the "
                "prompt to end with the user's turn that the answers reply to."
            )
        if reply[0]["role"] != "assistant":
            raise LorafitError(
                f"{record.where}: {answer_key}[0].role is '{reply[0]['role']}'; expected the answer to start "
                "with an assistant turn."
            )
        _check_order(record, turns + reply, answer_key)
        return turns, reply, False
    raise LorafitError(
        f"{record.where}: fields '{prompt_key}' and '{answer_key}' are a {type(prompt).__name__} and a "
        f"{type(answer).__name__}; expected two strings or two lists of {{role, content}} messages."
    )


def _split_implicit(record: Record) -> tuple[list, list, list]:
    """TRL's implicit prompt: the turns ``chosen`` and ``rejected`` share from the start."""
    convs = []
    for key in ("chosen", "rejected"):
        value = record.data[key]
        if not isinstance(value, list):
            raise LorafitError(
                f"{record.where}: field '{key}' is a {type(value).__name__} and there is no 'prompt'; "
                "expected whole conversations (lists of {role, content}) sharing their first turns, "
                "or a 'prompt' field."
            )
        convs.append(_normalise_turns(record, key, value, "role", "content", _ROLES))
    chosen, rejected = convs
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # the answers start at the first assistant turn after the shared part's last user turn
    while shared > 0 and chosen[shared - 1]["role"] != "user":
        shared -= 1
    if shared == 0:
        raise LorafitError(
            f"{record.where}: 'chosen' and 'rejected' share no prompt (no common turns ending with a "
            "user turn); expected the same conversation up to the answers, or a 'prompt' field."
        )
    prompt = chosen[:shared]
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        _check_order(record, conv, key)
    return prompt, chosen[shared:], rejected[shared:]


def check_truncation_mode(mode: str) -> None:
    if mode not in TRUNCATION_MODES:
        raise LorafitError(
            f"training_config.truncation_mode: {mode!r}{did_you_mean(str(mode), TRUNCATION_MODES)}; "
            f"expected one of {', '.join(TRUNCATION_MODES)}."
        )


def encode_sequence(
    tokenizer: Any, prompt: list[dict], answer: list[dict], text: bool, where: str
) -> tuple[list[int], list[int], int]:
    """``(input_ids, labels, prompt_length)`` of prompt + answer, untruncated.

    With a chat template: the whole conversation's tokens, labels on the answer's assistant
    turns only (content + end-of-turn token, as SFT), ``prompt_length`` where the answer's first
    label is. Without one (plain strings only): prompt + answer + eos as text, labels from where
    the prompt's own tokens stop matching (TRL's rule).
    """
    if getattr(tokenizer, "chat_template", None) is not None:
        ids, labels = _encode_conversations(tokenizer, [prompt + answer], [where], True)[0]
        # the prompt's own assistant turns were labelled too: keep the answer's runs only
        runs, inside = [], False
        for i, label in enumerate(labels):
            if label != IGNORE_INDEX and not inside:
                runs.append(i)
            inside = label != IGNORE_INDEX
        earlier = sum(m["role"] == "assistant" for m in prompt)
        if len(runs) <= earlier:
            raise LorafitError(f"{where}: the answer produced no tokens; expected text.")
        start = runs[earlier]
        labels = [IGNORE_INDEX] * start + labels[start:]
        return list(ids), labels, start
    if not text:
        raise LorafitError(
            f"{where}: the tokenizer has no chat template to render message lists; set "
            "tokenizer.chat_template (chatml, phi3, llama3, a file or Jinja text)."
        )
    prompt_text = "".join(m["content"] for m in prompt if m["role"] != "system")
    system = "".join(m["content"] for m in prompt if m["role"] == "system")
    answer_text = answer[0]["content"]
    eos = tokenizer.eos_token or ""
    if eos and not answer_text.endswith(eos):
        answer_text += eos
    prompt_ids = tokenizer(system + prompt_text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(system + prompt_text + answer_text, add_special_tokens=False)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
        start += 1
    return list(ids), [IGNORE_INDEX] * start + list(ids[start:]), start


def _truncate(ids: list[int], labels: list[int], max_length: int, mode: str) -> tuple[list[int], list[int]]:
    if len(ids) <= max_length:
        return ids, labels
    cut = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    return ids[cut], labels[cut]


def tokenize_preference(
    tokenizer: Any,
    record: PreferenceRecord,
    *,
    max_length: int,
    truncation_mode: str = "keep_start",
    overlong: str = "truncate",
    where: str = "record",
) -> tuple[dict | None, str]:
    """One record's rows: ``(example or None, "ok" | "truncated" | "too_long")``.

    A pair: ``{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}``.
    Unpaired: ``{"input_ids", "labels", "prompt_length", "label"}``.
    """
    answers = (
        [("chosen", record.chosen)]
        if record.rejected is None
        else [
            ("chosen", record.chosen),
            ("rejected", record.rejected),
        ]
    )
    encoded = {
        name: encode_sequence(tokenizer, record.prompt, answer, record.text, where)
        for name, answer in answers
    }
    longest = max(len(ids) for ids, _, _ in encoded.values())
    status = "ok"
    if longest > max_length:
        if overlong == "drop":
            return None, "too_long"
        if truncation_mode == "keep_start" and any(p >= max_length for _, _, p in encoded.values()):
            return None, "too_long"  # the prompt alone fills max_length: no answer token is left
        status = "truncated"
    out: dict[str, Any] = {}
    for name, (ids, labels, prompt_length) in encoded.items():
        ids, labels = _truncate(ids, labels, max_length, truncation_mode)
        if all(label == IGNORE_INDEX for label in labels):
            return None, "too_long"
        if record.rejected is None:
            out.update(input_ids=ids, labels=labels, prompt_length=min(prompt_length, len(ids)))
            out["label"] = bool(record.label)
            # the prompt as TRL cuts it for the KL rows: its first tokens (keep_start)
        else:
            out[f"{name}_input_ids"], out[f"{name}_labels"] = ids, labels
    return out, status


def build_preference_split(
    tokenizer: Any,
    source: str,
    *,
    method: str,
    max_length: int,
    truncation_mode: str = "keep_start",
    overlong: str = "truncate",
    skip_bad_records: bool = False,
    records: Sequence[Record] | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[list[dict], dict[str, Any]]:
    """Read ``source`` (or take ``records``) and tokenise every record: ``(examples, stats)``.

    Without ``skip_bad_records`` the first bad record in file order raises (file, line, field);
    with it the bad ones are listed in ``stats["bad"]`` (``BadRecord``, in file order) and counted.
    With ``cache_dir`` the examples and stats are kept on disk beside SFT's
    (``cache_dir/tokenized/``), keyed by the records' content, the tokenizer, the method and
    the length settings, and a second build with all of them the same reads them back
    (``stats["cache_hit"]``).
    """
    check_truncation_mode(truncation_mode)
    items = _read_items(source) if records is None else list(records)
    settings = dict(
        method=method,
        max_length=max_length,
        truncation_mode=truncation_mode,
        overlong=overlong,
        skip_bad_records=skip_bad_records,
    )
    if cache_dir is None:
        return _tokenize_split(tokenizer, source, items, **settings)
    path = Path(cache_dir) / "tokenized" / f"{_cache_key(tokenizer, items, settings)}.safetensors"
    cached = _read_cached(path, items)
    if cached is not None:
        return cached
    examples, stats = _tokenize_split(tokenizer, source, items, **settings)
    _write_cached(path, examples, stats, items)
    return examples, {**stats, "cache_hit": False}


def _tokenize_split(
    tokenizer: Any,
    source: str,
    items: list[Record | BadRecord],
    *,
    method: str,
    max_length: int,
    truncation_mode: str,
    overlong: str,
    skip_bad_records: bool,
) -> tuple[list[dict], dict[str, Any]]:
    bad: list[BadRecord] = []
    examples: list[dict] = []
    counts = {"truncated": 0, "dropped_too_long": 0}
    fmt = None
    for record in items:
        try:
            if isinstance(record, BadRecord):  # a line that could not be read
                raise LorafitError(str(record))
            converted = to_preference(record, method)
            fmt = fmt or preference_format(record.data)
            example, status = tokenize_preference(
                tokenizer,
                converted,
                max_length=max_length,
                truncation_mode=truncation_mode,
                overlong=overlong,
                where=record.where,
            )
        except LorafitError as e:
            if not skip_bad_records:
                raise
            bad.append(record if isinstance(record, BadRecord) else BadRecord.from_error(record.where, e))
            continue
        if example is None:
            counts["dropped_too_long"] += 1
            continue
        counts["truncated"] += status == "truncated"
        examples.append(example)
    if not examples:
        raise LorafitError(
            f"{source}: no usable preference records ({len(bad)} bad, {counts['dropped_too_long']} too long "
            f"for max_length {max_length})."
        )
    tokens = sum(
        len(e.get("chosen_input_ids", e.get("input_ids"))) + len(e.get("rejected_input_ids", ()))
        for e in examples
    )
    stats = {
        "format": fmt,
        "records": len(items),
        "examples": len(examples),
        "tokens": tokens,
        "bad_records": len(bad),
        "bad": bad,
        **counts,
    }
    return examples, stats


# Preference examples in the tokenisation cache: each list field (``chosen_input_ids``, ...) as one
# flat int64 array with its offsets, each scalar field (``prompt_length``, ``label``) as an array.
_CACHE_VERSION = "lorafit-preference-1"


def _cache_key(tokenizer: Any, items: Sequence[Record | BadRecord], settings: dict[str, Any]) -> str:
    from lorafit.data.build import _tokenizer_fingerprint

    h = hashlib.sha256()
    for item in items:  # the content, not where it is: a moved file hits; bad records are named anew
        if isinstance(item, BadRecord):
            text = f"bad: {item.reason}"
        else:
            text = json.dumps(item.data, sort_keys=True, ensure_ascii=False, default=str)
        h.update(text.encode("utf-8", "surrogatepass") + b"\n")
    fields = {
        "version": _CACHE_VERSION,
        "records": h.hexdigest(),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        **settings,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _write_cached(path: Path, examples: list[dict], stats: dict[str, Any], items: list) -> None:
    from safetensors.numpy import save_file

    from lorafit.disk import atomic_write

    arrays, kinds = {}, {}
    for name, value in examples[0].items():
        if isinstance(value, list):
            kinds[name] = "list"
            arrays[name] = np.array([t for e in examples for t in e[name]], dtype=np.int64)
            arrays[f"{name}.offsets"] = np.cumsum([0] + [len(e[name]) for e in examples], dtype=np.int64)
        else:
            kinds[name] = type(value).__name__  # int or bool
            arrays[name] = np.array([e[name] for e in examples], dtype=np.int64)
    index = {item.where: i for i, item in enumerate(items)}
    metadata = {
        "kinds": json.dumps(kinds),
        "stats": json.dumps({k: v for k, v in stats.items() if k != "bad"}),
        # a bad record by its place among the records: read back, it is named where it is now
        "bad": json.dumps([[index[b.where], b.reason] for b in stats["bad"]]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))


def _read_cached(path: Path, items: list) -> tuple[list[dict], dict[str, Any]] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata()
            kinds = json.loads(meta["kinds"])
            columns = {name: f.get_tensor(name) for name in f.keys()}
            stats = json.loads(meta["stats"])
            bad = [BadRecord(items[i].where, reason) for i, reason in json.loads(meta["bad"])]
    except Exception:  # a truncated or foreign file: tokenise again and overwrite it
        return None
    n = stats["examples"]
    examples: list[dict] = [{} for _ in range(n)]
    for name, kind in kinds.items():
        if kind == "list":
            flat, offsets = columns[name].tolist(), columns[f"{name}.offsets"].tolist()
            for i, example in enumerate(examples):
                example[name] = flat[offsets[i] : offsets[i + 1]]
        else:
            cast = bool if kind == "bool" else int
            for example, value in zip(examples, columns[name].tolist(), strict=True):
                example[name] = cast(value)
    return examples, {**stats, "bad": bad, "cache_hit": True}


class PreferenceDataset(torch.utils.data.Dataset):
    """The tokenised examples of :func:`build_preference_split`, with optional reference log-probs."""

    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


@dataclass
class PreferenceCollator:
    """Pack a batch's sequences into one row: no padding, attention within each sequence.

    Pairs: the B chosen sequences, then the B rejected ones, end to end in a (1, T) row whose
    ``position_ids`` restart at every sequence (transformers and lorafit's packed attention then
    keep attention inside each). ``sequence_ids`` (1, T) says which of the 2B sequences a token
    belongs to; ``labels`` are the answers' tokens (-100 elsewhere). KTO: the B prompt +
    completion sequences in one row, and under ``kl_*`` keys the B mismatched sequences TRL's
    KL estimate uses (prompt ``i`` with completion ``i - 1``, cyclically, cut to ``max_length``).
    Precomputed reference log-probs travel as ``ref_*`` tensors.
    """

    pad_token_id: int
    example_boundaries: bool = False
    max_length: int | None = None

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if "chosen_input_ids" in examples[0]:
            sequences = [(e["chosen_input_ids"], e["chosen_labels"]) for e in examples]
            sequences += [(e["rejected_input_ids"], e["rejected_labels"]) for e in examples]
            batch = self._row(sequences)
            for key in ("ref_chosen_logps", "ref_rejected_logps"):
                if key in examples[0]:
                    batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
            return batch
        batch = self._row([(e["input_ids"], e["labels"]) for e in examples])
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
        kl = []
        for i, e in enumerate(examples):
            other = examples[i - 1]
            p = e["prompt_length"]
            completion = other["input_ids"][other["prompt_length"] :]
            ids = e["input_ids"][:p] + completion
            labels = [IGNORE_INDEX] * p + list(completion)
            if self.max_length is not None:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            kl.append((ids, labels))
        batch.update({f"kl_{k}": v for k, v in self._row(kl).items()})
        for key in ("ref_logps", "ref_kl_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch

    def _row(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        ids = [t for s, _ in sequences for t in s]
        labels = []
        for _, seq_labels in sequences:
            labels += [IGNORE_INDEX, *seq_labels[1:]]  # a sequence's first token is never predicted
        positions = [p for s, _ in sequences for p in range(len(s))]
        owner = [i for i, (s, _) in enumerate(sequences) for _ in s]
        batch = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "sequence_ids": torch.tensor([owner], dtype=torch.long),
        }
        if self.example_boundaries:
            lengths = torch.tensor([0] + [len(s) for s, _ in sequences])
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = lengths.cumsum(0).to(torch.int32)
        return batch
