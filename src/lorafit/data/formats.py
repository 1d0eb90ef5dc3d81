"""Records -> messages: the chat formats, detected and validated.

``messages`` (``[{role, content}]``), ShareGPT ``conversations`` (``from``/``value``), Alpaca
(``instruction``, ``input``, ``output``), ``prompt``/``completion`` and plain ``text``. Every
conversation is normalised to ``[{"role", "content"}]`` with an optional system turn first, then
user and assistant turns, ending with the assistant; errors name the record's file and line and
the field (``messages[2].role``).

Beyond role and content a message may carry (and keeps, in OpenAI's shape, only when given):

- ``tool_calls`` on an assistant turn: ``[{"type": "function", "function": {"name", "arguments"}}]``,
  ``arguments`` a JSON object or a string holding one (parsed: templates print it with ``tojson``);
  such a turn's content may be empty. ``tool`` turns carry a call's result (``tool_call_id``,
  ``name``). A record's ``tools`` list (JSON schemas; a JSON string of one, as LLaMA-Factory writes
  it) goes to the template beside the messages. ShareGPT's ``function_call`` and ``observation``
  turns (LLaMA-Factory) become an assistant turn with ``tool_calls`` and a ``tool`` turn.
- ``reasoning_content`` (or ``thinking``, or ``reasoning``) on an assistant turn: its reasoning
  trace, kept as ``reasoning_content``; an answer may also hold a ``<think>...</think>`` block.
- ``train: false`` (or ``weight: 0``) on an assistant turn: context, not trained.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorafit.constants import FORMATS
from lorafit.data.read import BadRecord, Record
from lorafit.errors import LorafitError, did_you_mean

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",  # LLaMA-Factory: the value is the call as JSON
    "observation": "tool",  # LLaMA-Factory: the call's result
    "tool": "tool",
}
# the keys a reasoning trace is written under, in the order they are looked for
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


@dataclass
class Conversation:
    """A chat record made ready for the chat template: its messages and its tool schemas."""

    messages: list[dict]
    tools: list[dict] | None = None


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
    items: Sequence[Record | BadRecord], fmt: str, skip: bool, tools: list[dict] | None = None
) -> tuple[str, list[tuple[Record, Any]], list[BadRecord]]:
    """Check and convert every record, in file order: ``(format, [(record, Conversation or text)], bad)``.

    With ``format: auto`` the first record decides the format (the most common one when
    ``skip``); a record in another format is bad. Without ``skip`` the first bad record raises.
    ``tools`` is the file-wide tool list (``data.tools``) for records without their own.
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
            good.append((item, to_text(item) if fmt == "text" else to_conversation(item, fmt, tools)))
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

    Roles are ``system`` (optional, first), then ``user`` and ``assistant`` turns starting with
    ``user`` and ending with ``assistant``; an assistant turn with ``tool_calls`` is followed by
    its ``tool`` results, then by the assistant again. A top-level ``system`` string field is put
    in front when the conversation has no system turn. Alpaca becomes one user turn (instruction,
    then a blank line and the input when there is one) and one assistant turn; prompt/completion
    strings likewise; prompt/completion lists of messages are joined. Errors name the record's
    file and line and the field (``messages[2].role``).
    """
    return to_conversation(record, fmt).messages


def to_conversation(record: Record | dict, fmt: str, tools: list[dict] | None = None) -> Conversation:
    """``to_messages`` plus the record's ``tools`` (else ``tools``, the file-wide list: ``data.tools``)."""
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
    if "tools" in record.data and record.data["tools"] not in (None, "", []):
        tools = _tools(record, record.data["tools"])
    return Conversation(messages, tools or None)


def _tools(record: Record, value: Any) -> list[dict]:
    """A record's ``tools``: a list of JSON schemas (or a JSON string of one), each with a name."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise LorafitError(
                f"{record.where}: field 'tools' is a string that is not JSON ({e.msg}); expected a list "
                "of function schemas ({name, description, parameters}) or a JSON string of one."
            ) from None
    return check_tools(value, f"{record.where}: field 'tools'")


def check_tools(value: Any, where: str) -> list[dict]:
    """Check a ``tools`` list: JSON schemas ``{name, description, parameters}``, bare or wrapped
    as OpenAI writes them (``{"type": "function", "function": {...}}``). Returned as given."""
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise LorafitError(
            f"{where} is a {type(value).__name__}; expected a list of function schemas "
            "({name, description, parameters}, or {type: function, function: {...}})."
        )
    for i, tool in enumerate(value):
        inner = tool.get("function", tool)
        if not isinstance(inner, dict) or not isinstance(inner.get("name"), str) or not inner["name"]:
            raise LorafitError(f"{where}[{i}] has no 'name'; expected a function schema with a name.")
    return value


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
        calls = turn.get("tool_calls") or None  # [] and null (as some exports write): no calls
        for key in (role_key, content_key):
            if key not in turn and not (key == content_key and calls):
                raise LorafitError(
                    f"{record.where}: {name} has no '{key}'{did_you_mean(key, list(turn))} "
                    f"(it has {', '.join(turn) or 'nothing'}); expected '{role_key}' and '{content_key}'."
                )
        role, content = turn[role_key], turn.get(content_key)
        if not isinstance(role, str) or role not in roles:
            raise LorafitError(
                f"{record.where}: {name}.{role_key} is {role!r}{did_you_mean(str(role), list(roles))}; "
                f"accepted roles: {', '.join(roles)}."
            )
        message: dict[str, Any] = {"role": roles[role]}
        if role == "function_call":  # LLaMA-Factory: the value is the call (or a list of calls) as JSON
            message["content"] = ""
            message["tool_calls"] = _sharegpt_calls(record, f"{name}.{content_key}", content)
        else:
            if calls is not None and message["role"] != "assistant":
                raise LorafitError(
                    f"{record.where}: {name} is a '{role}' turn with tool_calls; "
                    "only assistant turns call tools."
                )
            if calls is not None:
                message["tool_calls"] = _tool_calls(record, f"{name}.tool_calls", calls)
            # a turn that only calls tools may have no text (OpenAI writes null)
            empty_ok = bool(message.get("tool_calls"))
            message["content"] = _turn_text(record, f"{name}.{content_key}", content, empty_ok)
        _turn_extras(record, name, turn, message)
        messages.append(message)
    return messages


def _turn_text(record: Record, name: str, content: Any, empty_ok: bool) -> str:
    if content is None and empty_ok:
        return ""
    if not isinstance(content, str):
        raise LorafitError(f"{record.where}: {name} is a {type(content).__name__}; expected a string.")
    if not content.strip() and not empty_ok:
        raise LorafitError(f"{record.where}: {name} is an empty turn; expected text.")
    _check_unicode(record, name, content)
    return content


def _turn_extras(record: Record, name: str, turn: dict, message: dict) -> None:
    """Copy what the template may render besides the text (reasoning, a tool result's call id and
    name) and the per-turn training switch (``train`` / ``weight``) into ``message``."""
    role = message["role"]
    for key in REASONING_KEYS:
        value = turn.get(key)
        if value is None or value == "":
            continue
        if role != "assistant":
            raise LorafitError(
                f"{record.where}: {name}.{key} is on a '{role}' turn; only assistant turns reason."
            )
        if not isinstance(value, str):
            raise LorafitError(
                f"{record.where}: {name}.{key} is a {type(value).__name__}; expected a string."
            )
        _check_unicode(record, f"{name}.{key}", value)
        message["reasoning_content"] = value
        break
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if turn.get(key) is not None:
                if not isinstance(turn[key], str):
                    raise LorafitError(
                        f"{record.where}: {name}.{key} is a {type(turn[key]).__name__}; expected a string."
                    )
                message[key] = turn[key]
    train = _train_switch(record, name, turn)
    if train is not None:
        if train and role != "assistant":
            raise LorafitError(
                f"{record.where}: {name} asks to train a '{role}' turn; only assistant turns are trained "
                "(remove its train/weight field)."
            )
        if role == "assistant" and not train:
            message["train"] = False


def _train_switch(record: Record, name: str, turn: dict) -> bool | None:
    """``train: true|false`` or ``weight: 1|0`` (LLaMA-Factory's and Axolotl's spelling); None if absent."""
    if turn.get("train") is not None:
        if not isinstance(turn["train"], bool):
            raise LorafitError(f"{record.where}: {name}.train is {turn['train']!r}; expected true or false.")
        return turn["train"]
    if turn.get("weight") is not None:
        weight = turn["weight"]
        if isinstance(weight, bool) or weight not in (0, 1):
            raise LorafitError(
                f"{record.where}: {name}.weight is {weight!r}; expected 0 (context only) or 1 (trained)."
            )
        return weight == 1
    return None


def _tool_calls(record: Record, name: str, calls: Any) -> list[dict]:
    """OpenAI's ``tool_calls``, normalised to ``{"type": "function", "function": {name, arguments}}``
    (plus ``id`` when given) with ``arguments`` an object; a bare ``{name, arguments}`` is accepted."""
    if not isinstance(calls, list) or not calls:
        raise LorafitError(
            f"{record.where}: {name} is {calls!r}; expected a non-empty list of "
            "{type: function, function: {name, arguments}} objects."
        )
    out = []
    for j, call in enumerate(calls):
        where = f"{name}[{j}]"
        inner = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(inner, dict) or not isinstance(inner.get("name"), str) or not inner["name"].strip():
            raise LorafitError(
                f"{record.where}: {where} has no function name; expected "
                "{type: function, function: {name, arguments}}."
            )
        normalised: dict[str, Any] = {
            "type": "function",
            "function": {
                "name": inner["name"],
                "arguments": _arguments(record, where, inner.get("arguments")),
            },
        }
        if isinstance(call.get("id"), str):
            normalised["id"] = call["id"]
        out.append(normalised)
    return out


def _arguments(record: Record, where: str, value: Any) -> dict:
    # templates print arguments with `tojson`: a string would be printed as a quoted string
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise LorafitError(
                f"{record.where}: {where}.function.arguments is a string that is not JSON ({e.msg} at "
                f"column {e.colno}); expected a JSON object of the arguments."
            ) from None
    if not isinstance(value, dict):
        raise LorafitError(
            f"{record.where}: {where}.function.arguments is a JSON {type(value).__name__}; expected an "
            "object mapping argument names to values."
        )
    return value


def _sharegpt_calls(record: Record, name: str, value: Any) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise LorafitError(
                f"{record.where}: {name} is not JSON ({e.msg}); a function_call turn holds the call as "
                'JSON: {"name": ..., "arguments": {...}} (or a list of them).'
            ) from None
    return _tool_calls(record, name, value if isinstance(value, list) else [value])


def _check_order(record: Record, messages: list[dict], field: str) -> None:
    """System first (optional), then from a user turn: user -> assistant; an assistant turn with
    tool calls -> its tool results -> assistant; an assistant turn without -> user. The last turn
    is the assistant's."""
    if not any(m["role"] == "assistant" for m in messages):
        raise LorafitError(f"{record.where}: field '{field}' has no assistant turn; expected at least one.")
    start = 1 if messages[0]["role"] == "system" else 0
    expected = ("user",)
    for i, message in enumerate(messages[start:], start=start):
        if message["role"] not in expected:
            raise LorafitError(
                f"{record.where}: roles out of order in '{field}': turn {i} is '{message['role']}', expected "
                f"{' or '.join(repr(e) for e in expected)} (an optional system turn first, then user and "
                "assistant alternating; an assistant turn that calls tools is followed by their results)."
            )
        if message["role"] == "user":
            expected = ("assistant",)
        elif message["role"] == "tool":
            expected = ("tool", "assistant")
        else:
            expected = ("tool",) if message.get("tool_calls") else ("user",)
    if messages[-1]["role"] != "assistant":
        what = "a user turn that has no" if messages[-1]["role"] == "user" else "a tool result with no"
        raise LorafitError(
            f"{record.where}: field '{field}' ends with {what} assistant reply; "
            "expected the conversation to end with an assistant turn."
        )
