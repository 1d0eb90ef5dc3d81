"""Messages -> tokens and labels, with the tokenizer's own chat template.

Labels. With ``assistant_only_loss`` each trained assistant turn is labelled from where the
generation prompt ends through the first token generation stops at (its end-of-turn token:
``<|end|>`` for Phi-3, ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, `` </s>`` for
Llama 2): exactly the tokens the model must produce at serve time, its reasoning, tool calls
and answer included; system, user, tool results, tool definitions and headers are -100. Turns
are found by position, never by searching the text for a marker such as ``<|assistant|>``: the
template renders ``messages[:i]`` with the generation prompt (what chat, the UI and an exported
model feed the model), which must be a prefix of the whole rendering; the turn starts right
there, and the fast tokenizer's offset mapping turns character positions into token positions.

Tools and reasoning. A conversation's ``tools`` go to the template (``tools=``); a template that
does not render the tool definitions, calls or results is refused (``TemplateCannotRender``).
A reasoning trace goes to the template under the key it reads (``reasoning_content``, or
``thinking``); a template that reads neither gets it inline, ``<think>\ntrace\n</think>\n\n``
before the answer. ``reasoning="mask"`` leaves the trace's own tokens unlabelled (the
``<think>`` tags and the answer stay trained); ``"drop"`` removes it. A template that drops the
reasoning of earlier turns (Qwen3's) renders none for them: nothing of it is trained.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from lorafit.constants import IGNORE_INDEX, OVERLONG, REASONING, TRAIN_ON
from lorafit.errors import LorafitError, did_you_mean


class TemplateCannotRender(LorafitError):
    """The chat template leaves out part of the data (tool definitions, calls or results): every
    record with that part would train on something else than it says. Not skipped as a bad record."""


class PromptMismatch(LorafitError):
    """The generation prompt as served is not the prefix training saw for an assistant turn."""


@dataclass
class TurnLabels:
    """Where one trained assistant turn landed in the tokens (before any truncation).

    ``first``/``end``: its labelled token range ``[first, end)``; ``stopped``: it ends with a token
    generation stops at; ``trace``: whether it has a reasoning trace, and ``trace_rendered``
    whether the template rendered it."""

    index: int
    first: int
    end: int
    stopped: bool
    trace: bool = False
    trace_rendered: bool = False


_PAD_ALIASES = ("unk", "eos", "bos")


def prepare_tokenizer(
    tokenizer: Any,
    *,
    pad_token: str | None = "auto",
    padding_side: str = "right",
    model_max_length: int | None = None,
) -> Any:
    """Set the pad token, padding side and maximum length of ``tokenizer`` (in place; returned).

    ``pad_token`` is ``"auto"`` (the tokenizer's own pad token when it has one, else its unk
    token, else its eos token: every tokenizer gets one), ``"unk"``, ``"eos"`` or ``"bos"`` (the
    tokenizer's own token of that kind: the Phi-3 samples pad with ``unk``), a token in the
    vocabulary (``"<|endoftext|>"``), or None to leave it. Labels of padding are set by
    position, never by id, so padding with the eos token does not hide real eos labels.
    """
    if pad_token == "auto":
        pad_token = None if tokenizer.pad_token is not None else "unk" if tokenizer.unk_token else "eos"
    if pad_token is not None:
        if pad_token in _PAD_ALIASES:
            token = getattr(tokenizer, f"{pad_token}_token", None)
            if token is None:
                others = [a for a in _PAD_ALIASES if getattr(tokenizer, f"{a}_token", None) is not None]
                raise LorafitError(
                    f"tokenizer.pad_token: the tokenizer has no {pad_token} token; expected auto, one of "
                    f"{', '.join(others) or '(none)'} or a token in its vocabulary."
                )
        else:
            token = pad_token
            if token not in tokenizer.get_vocab():
                choices = ["auto", *_PAD_ALIASES, *tokenizer.all_special_tokens]
                raise LorafitError(
                    f"tokenizer.pad_token: {token!r} is not in the tokenizer's vocabulary"
                    f"{did_you_mean(token, choices)}; expected auto, unk, eos, bos or one of its tokens "
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


def _render(
    tokenizer: Any,
    messages: list[dict],
    generation_prompt: bool,
    where: str,
    tools: list[dict] | None = None,
) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise LorafitError(
            f"{where}: the tokenizer's chat template failed on this conversation ({e}); fix the record's "
            "roles or fields, or set tokenizer.chat_template to a template that accepts them."
        ) from e


NO_TEMPLATE = (
    "the tokenizer has no chat template (a base model?). Set tokenizer.chat_template to a built-in "
    "(chatml, phi3 or llama3), to a file holding a Jinja template, or to the Jinja text itself; "
    "or train on plain text with data.format: text"
)


def _check_template(tokenizer: Any, where: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise LorafitError(f"{where}: {NO_TEMPLATE}.")


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return template if isinstance(template, str) else json.dumps(template)


# a reasoning block at the start of an answer (DeepSeek-R1 and Qwen3 write their traces so)
_THINK_BLOCK = re.compile(r"\A\s*<think>(.*?)</think>\s*", re.S)


def messages_and_tools(conversation: Any) -> tuple[list[dict], list[dict] | None]:
    """``(messages, tools)`` of a ``Conversation`` or of a plain list of messages (no tools)."""
    if isinstance(conversation, list):
        return conversation, None
    return conversation.messages, conversation.tools


def _present(messages: list[dict], template: str, reasoning: str) -> tuple[list[dict], list[str | None]]:
    """The messages as the template takes them, and each one's reasoning trace (or None).

    lorafit's own keys (``train``) are removed. With ``reasoning="drop"`` every trace is removed
    (``reasoning_content`` and a leading ``<think>`` block); else a ``reasoning_content`` trace is
    passed under the key the template reads, or written inline before the answer."""
    out, traces = [], []
    for message in messages:
        message = {k: v for k, v in message.items() if k != "train"}
        trace = message.get("reasoning_content")
        inline = _THINK_BLOCK.match(message.get("content") or "") if message["role"] == "assistant" else None
        if reasoning == "drop":
            message.pop("reasoning_content", None)
            if inline:
                message["content"] = message["content"][inline.end() :]
            trace = None
        elif trace is not None:
            if "reasoning_content" not in template:
                del message["reasoning_content"]
                if re.search(r"\bthinking\b", template):  # gpt-oss and others read message.thinking
                    message["thinking"] = trace
                else:
                    message["content"] = f"<think>\n{trace.strip()}\n</think>\n\n{message['content']}"
        elif inline:
            trace = inline.group(1)
        out.append(message)
        traces.append(trace if trace and trace.strip() else None)
    return out, traces


def _trained_turns(messages: list[dict], train_on: str) -> list[int]:
    """Indices of the assistant turns to label: all (``train_on="all"``) or those after the last
    user turn (``"last"``), less those marked ``train: false``."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return [
        i
        for i, m in enumerate(messages)
        if m["role"] == "assistant" and m.get("train", True) and (train_on == "all" or i > last_user)
    ]


def _check_tools_rendered(
    tokenizer: Any,
    messages: list[dict],
    presented: list[dict],
    tools: list[dict] | None,
    full: str,
    where: str,
) -> None:
    """Refuse a template that leaves out tool definitions, calls or results (Phi-3's, SmolLM2's:
    they render a tool-calling turn as an empty answer). A call counts as rendered when the
    rendering changes without it (its name alone may be in the tool definitions)."""
    missing = []
    for tool in tools or []:
        name = tool.get("function", tool)["name"]
        if name not in full:
            missing.append(f"the tool definition '{name}'")
    if any(m.get("tool_calls") for m in presented):
        without = [{k: v for k, v in m.items() if k != "tool_calls"} for m in presented]
        try:
            unchanged = _render(tokenizer, without, False, where, tools) == full
        except LorafitError:  # the template needs the calls (Mistral's checks the roles around them)
            unchanged = False
        if unchanged:
            turns = [i for i, m in enumerate(messages) if m.get("tool_calls")]
            missing.append(f"the tool calls (turn {', '.join(map(str, turns))})")
    for i, message in enumerate(messages):
        content = message.get("content") or ""
        if message["role"] == "tool" and content.strip():
            if content not in full and json.dumps(content)[1:-1] not in full:
                missing.append(f"the tool result of turn {i}")
    if missing:
        raise TemplateCannotRender(
            f"{where}: the tokenizer's chat template does not render {missing[0]}"
            + (f" (and {len(missing) - 1} more tool parts)" if len(missing) > 1 else "")
            + ", so the model would be trained on conversations without them. Ways out: set "
            "tokenizer.chat_template to a template that renders tools, written in this tokenizer's "
            "tokens (e.g. Qwen2.5's for a ChatML tokenizer such as SmolLM2's); train a model whose own "
            "template renders tools (Qwen2.5, Qwen3, Llama 3.1+, Hermes, Mistral); or remove the "
            "tools, tool_calls and tool turns from the data."
        )


def render_text(
    tokenizer: Any, conversation: Any, reasoning: str = "train", where: str = "conversation"
) -> str:
    """The text ``tokenize_conversation`` encodes: the template's rendering of the conversation
    (a ``Conversation`` or a list of messages) with its tools and its reasoning as ``reasoning``
    presents it."""
    _check_template(tokenizer, where)
    raw, tools = messages_and_tools(conversation)
    messages, _ = _present(raw, _template_text(tokenizer), reasoning)
    return _render(tokenizer, messages, False, where, tools)


@dataclass
class _Rendered:
    text: str
    turns: list[tuple[int, int, int, tuple[int, int] | None, bool]]  # index, start, bound, trace span, trace
    content_ends: dict[int, int]  # where each turn's text (content) ends, to stop without a stop token
    mask_traces: bool = False  # reasoning="mask": leave the trace spans unlabelled


def _render_conversation(
    tokenizer: Any, conversation: Any, where: str, reasoning: str = "train", train_on: str = "all"
) -> _Rendered:
    """The full chat-template text and, per trained assistant turn, where it starts and the
    furthest it may reach (the next assistant turn's generation prompt).

    Turn ``i`` starts where ``render(messages[:i], add_generation_prompt=True)`` ends; that must
    be a prefix of the full rendering (true for Phi-3, ChatML, Llama 3, Mistral, Qwen3; false
    for templates that render a prompt's last turn differently from the same turn followed by
    more), else ``PromptMismatch``.
    """
    _check_template(tokenizer, where)
    raw, tools = messages_and_tools(conversation)
    messages, traces = _present(raw, _template_text(tokenizer), reasoning)
    full = _render(tokenizer, messages, False, where, tools)
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in raw):
        _check_tools_rendered(tokenizer, raw, messages, tools, full, where)
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prefixes: dict[int, str] = {}

    def prompt_end(i: int) -> int | None:
        if i not in prefixes:
            prefixes[i] = _render(tokenizer, messages[:i], True, where, tools)
        return len(prefixes[i]) if full.startswith(prefixes[i]) else None

    turns, content_ends = [], {}
    for i in _trained_turns(raw, train_on):
        start = prompt_end(i)
        if start is None:
            served = prefixes[i]
            common = len(os.path.commonprefix([served, full]))  # where the two part
            raise PromptMismatch(
                f"{where}: the chat template renders the conversation before assistant turn {i} with the "
                "generation prompt (the prompt chat, the UI and an exported model give the model) "
                "differently from the same turns inside the whole conversation (what training sees): "
                f"served {served[max(0, common - 20) : common + 20]!r}, trained "
                f"{full[max(0, common - 20) : common + 20]!r}. Turn {i} would be learned after a prompt "
                "it never gets when served. Use a template (tokenizer.chat_template) whose generation "
                "prompt and earlier turns render as they do inside a whole conversation, or set "
                "assistant_only_loss: false."
            )
        later = [k for k in assistants if k > i]
        bound = (prompt_end(later[0]) if later else None) or len(full)
        span = None
        if traces[i] is not None:
            found = full.find(traces[i].strip(), start, bound)
            span = (found, found + len(traces[i].strip())) if found >= 0 else None
        content = messages[i].get("content") or ""
        for text in (content, content.strip()):
            found = full.find(text, start, bound) if text.strip() else -1
            if found >= 0:
                content_ends[i] = found + len(text)
                break
        turns.append((i, start, bound, span, traces[i] is not None))
    return _Rendered(full, turns, content_ends, reasoning == "mask")


def _label_turns(
    rendered: _Rendered,
    ids: list[int],
    offsets: list[tuple[int, int]],
    special_ids: set[int],
    stop_ids: set[int],
    where: str,
) -> tuple[list[int], list[TurnLabels]]:
    """Labels for each trained turn: its tokens from the turn's start through the first stop token.

    A token counts from the start when its characters reach past it, so a word piece that also
    holds the template's separator (SentencePiece's ``▁Hello``) counts; a special token that
    starts before it never does (Phi-3's ``<|assistant|>`` swallows the newline after it). Without
    a stop token before the next turn (a template that ends turns with plain text) the turn ends
    with its content, followed by whitespace tokens and one special token if the template puts
    one there. A reasoning span (``reasoning="mask"``) is unlabelled afterwards.
    """
    text = rendered.text
    labels = [IGNORE_INDEX] * len(ids)
    n, j = len(ids), 0
    out = []
    for index, start, bound, trace_span, has_trace in rendered.turns:
        while j < n and (
            (offsets[j][1] <= start if offsets[j][0] < offsets[j][1] else offsets[j][0] < start)
            or (offsets[j][0] < start and ids[j] in special_ids)
        ):
            j += 1
        first, k = j, j
        while k < n and offsets[k][0] < bound and ids[k] not in stop_ids:
            k += 1
        stopped = k < n and offsets[k][0] < bound
        if stopped:
            end = k + 1
        else:
            content_end = rendered.content_ends.get(index)
            if content_end is None:
                raise LorafitError(
                    f"{where}: assistant turn {index} has no token generation stops at before the next "
                    "turn, and its text cannot be found; expected a template that ends turns with an "
                    "end-of-turn token."
                )
            end = first
            while end < n and offsets[end][0] < content_end:
                end += 1
            # whitespace, then one special token: the template's end of turn (Llama 2's " </s>")
            m = end
            while m < n and ids[m] not in special_ids and not text[offsets[m][0] : offsets[m][1]].strip():
                m += 1
            if m < n and ids[m] in special_ids and offsets[m][0] < bound:
                end = m + 1
        if end <= first:
            raise LorafitError(f"{where}: assistant turn {index} produced no tokens; expected text.")
        for m in range(first, end):
            labels[m] = ids[m]
        if trace_span is not None and rendered.mask_traces:
            a, b = trace_span
            for m in range(first, end):
                if offsets[m][0] < b and offsets[m][1] > a and ids[m] not in special_ids:
                    labels[m] = IGNORE_INDEX
        out.append(TurnLabels(index, first, end, stopped, has_trace, trace_span is not None))
        j = end
    return labels, out


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token: the named ones (bos, eos, unk, pad) and the added tokens marked
    special (``<|end|>``, ``<|im_end|>`` ...), which transformers 5's ``all_special_ids`` omits."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    marked = {i for i, token in added.items() if getattr(token, "special", False)}
    return set(tokenizer.all_special_ids) | marked


def end_of_turn_token(tokenizer: Any) -> int | None:
    """The token the chat template puts right after an assistant's answer (``<|end|>`` for Phi-3,
    ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3): where generation should stop. Found
    from token positions in a rendered conversation: the first special token after the answer,
    with only whitespace between; None without a template or when there is none."""
    if getattr(tokenizer, "chat_template", None) is None or not getattr(tokenizer, "is_fast", False):
        return None
    answer = "Hello there"
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
    try:
        full = _render(tokenizer, probe, False, "probe")
        prefix = _render(tokenizer, probe[:1], True, "probe")
    except LorafitError:
        return None
    found = full.find(answer, len(prefix) if full.startswith(prefix) else 0)
    if found < 0:
        return None
    end = found + len(answer)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    specials = special_token_ids(tokenizer)
    for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if b <= end and a < b:
            continue
        if token in specials:
            return token
        if a < end or not full[a:b].strip():
            continue  # a piece of the answer, or whitespace before the end of the turn
        return None
    return None


def stop_ids_for(tokenizer: Any) -> set[int]:
    """The tokens generation stops at: eos and the template's end-of-turn token
    (``lorafit.models.stop_token_ids``, which chat and export use, lists the same)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    end = end_of_turn_token(tokenizer)
    return ids | ({end} if end is not None else set())


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise LorafitError(
            "assistant_only_loss needs a fast tokenizer (offset mapping); "
            f"{type(tokenizer).__name__} is not. "
            "Load it with AutoTokenizer (use_fast=True) or set assistant_only_loss: false."
        )


def check_turn_settings(reasoning: str, train_on: str) -> None:
    """The one rule for ``data.reasoning`` and ``data.train_on``."""
    for key, value, allowed in (("reasoning", reasoning, REASONING), ("train_on", train_on, TRAIN_ON)):
        if value not in allowed:
            raise LorafitError(
                f"data.{key}: {value!r}{did_you_mean(str(value), allowed)}; expected one of "
                f"{', '.join(allowed)}."
            )


def _encode_conversations(
    tokenizer: Any,
    conversations: list[Any],
    wheres: list[str],
    assistant_only_loss: bool,
    *,
    reasoning: str = "train",
    train_on: str = "all",
    details: bool = False,
) -> list[tuple]:
    """Untruncated ``(input_ids, labels)`` for each conversation (a ``Conversation`` or a list of
    messages), tokenised as one batch; with ``details``, ``(input_ids, labels, [TurnLabels])``."""
    check_turn_settings(reasoning, train_on)
    if not assistant_only_loss:
        texts = []
        for conversation, where in zip(conversations, wheres, strict=True):
            texts.append(render_text(tokenizer, conversation, reasoning, where))
            raw, tools = messages_and_tools(conversation)
            if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in raw):
                presented, _ = _present(raw, _template_text(tokenizer), reasoning)
                _check_tools_rendered(tokenizer, raw, presented, tools, texts[-1], where)
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [(list(ids), list(ids), []) if details else (list(ids), list(ids)) for ids in encoded]
    _check_fast(tokenizer)
    rendered = [
        _render_conversation(tokenizer, c, w, reasoning, train_on)
        for c, w in zip(conversations, wheres, strict=True)
    ]
    encoded = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    special_ids = special_token_ids(tokenizer)
    stop_ids = stop_ids_for(tokenizer)
    for ids, offsets, r, where in zip(
        encoded["input_ids"], encoded["offset_mapping"], rendered, wheres, strict=True
    ):
        labels, turns = _label_turns(r, ids, offsets, special_ids, stop_ids, where)
        out.append((list(ids), labels, turns) if details else (list(ids), labels))
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


def check_length_settings(max_length: int, overlong: str) -> None:
    """The one rule for ``data.max_length`` (a label needs a token before it) and ``data.overlong``;
    the run config and ``build_datasets`` both apply it."""
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise LorafitError(f"data.max_length: {max_length!r}; expected an integer of at least 2.")
    if overlong not in OVERLONG:
        raise LorafitError(
            f"data.overlong: {overlong!r}{did_you_mean(str(overlong), OVERLONG)}; expected one of "
            f"{', '.join(OVERLONG)}."
        )


def tokenize_conversation(
    tokenizer: Any,
    messages: Any,
    *,
    max_length: int,
    assistant_only_loss: bool = True,
    overlong: str = "truncate",
    where: str = "conversation",
    reasoning: str = "train",
    train_on: str = "all",
) -> dict | None:
    """Tokenise ``messages`` (a list, or a ``Conversation`` with its tools) with the tokenizer's own
    chat template: ``{"input_ids", "labels"}``.

    With ``assistant_only_loss`` the labels are each trained assistant turn's tokens through its
    end-of-turn token; everything else is -100 (see the module docstring for how the tokens are
    located, and for ``reasoning`` and ``train_on``). Without it every token is a label. Longer
    than ``max_length``: ``overlong="truncate"`` cuts it, ``"drop"`` returns None. None too when no
    label is left (e.g. truncation removed every assistant token). ``where`` names the record in
    errors.
    """
    check_length_settings(max_length, overlong)
    ids, labels = _encode_conversations(
        tokenizer, [messages], [where], assistant_only_loss, reasoning=reasoning, train_on=train_on
    )[0]
    return _fit(ids, labels, max_length, overlong)[0]


def tokenize_text(tokenizer: Any, text: str, *, max_length: int, overlong: str = "truncate") -> dict | None:
    """Tokenise plain text (special tokens as the tokenizer adds them, then eos); every token a label."""
    check_length_settings(max_length, overlong)
    ids, labels = _encode_texts(tokenizer, [text])[0]
    return _fit(ids, labels, max_length, overlong)[0]
