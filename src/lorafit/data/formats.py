"""Records -> messages: the chat formats, detected and validated.

``messages`` (``[{role, content}]``), ShareGPT ``conversations`` (``from``/``value``), Alpaca
(``instruction``, ``input``, ``output``), ``prompt``/``completion`` and plain ``text``. Every
conversation is normalised to ``[{"role", "content"}]`` with an optional system turn first, then
user and assistant alternating, ending with the assistant; errors name the record's file and
line and the field (``messages[2].role``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from lorafit.constants import FORMATS
from lorafit.data.read import BadRecord, Record
from lorafit.errors import LorafitError, did_you_mean

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


_FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


def check_format_name(fmt: str) -> None:
    """The one rule for ``data.format``: ``auto`` or one of ``FORMATS``."""
    if fmt != "auto" and fmt not in FORMATS:
        raise LorafitError(
            f"data.format: {fmt!r}{did_you_mean(str(fmt), FORMATS)}; expected auto or one of "
            f"{', '.join(FORMATS)}."
        )


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
