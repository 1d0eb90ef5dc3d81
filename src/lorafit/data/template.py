"""Messages -> tokens and labels, with the tokenizer's own chat template.

Labels. With ``assistant_only_loss`` every assistant turn's content tokens and its end-of-turn
token (``<|end|>`` for Phi-3, ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, `` </s>``
for Llama 2) are labels; system, user and template tokens are -100. Assistant turns are found
by position, never by searching the text for a marker such as ``<|assistant|>``: the
tokenizer's own template renders ``messages[:i]`` with the generation prompt, which must be a
prefix of the whole rendering; the assistant content starts right there, and the fast
tokenizer's offset mapping turns that character span into token positions.
"""

from __future__ import annotations

from typing import Any

from lorafit.constants import IGNORE_INDEX, OVERLONG
from lorafit.errors import LorafitError, did_you_mean

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


NO_TEMPLATE = (
    "the tokenizer has no chat template (a base model?). Set tokenizer.chat_template to a built-in "
    "(chatml, phi3 or llama3), to a file holding a Jinja template, or to the Jinja text itself; "
    "or train on plain text with data.format: text"
)


def _render_full(tokenizer: Any, messages: list[dict], where: str) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise LorafitError(f"{where}: {NO_TEMPLATE}.")
    return _render(tokenizer, messages, False, where)


def end_of_turn_token(tokenizer: Any) -> int | None:
    """The token the chat template puts right after an assistant's answer (``<|end|>`` for Phi-3,
    ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3): where generation should stop. Found
    as the labels find it, from token positions in a rendered conversation; None without a
    template or when what follows the answer is not one special token."""
    if getattr(tokenizer, "chat_template", None) is None or not getattr(tokenizer, "is_fast", False):
        return None
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    try:
        ids, labels = _encode_conversations(tokenizer, [probe], ["probe"], True)[0]
    except LorafitError:
        return None
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not labelled or ids[labelled[-1]] not in special_token_ids(tokenizer):
        return None
    return ids[labelled[-1]]


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


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token: the named ones (bos, eos, unk, pad) and the added tokens marked
    special (``<|end|>``, ``<|im_end|>`` ...), which transformers 5's ``all_special_ids`` omits."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    marked = {i for i, token in added.items() if getattr(token, "special", False)}
    return set(tokenizer.all_special_ids) | marked


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
    special_ids = special_token_ids(tokenizer)
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
    check_length_settings(max_length, overlong)
    ids, labels = _encode_conversations(tokenizer, [messages], [where], assistant_only_loss)[0]
    return _fit(ids, labels, max_length, overlong)[0]


def tokenize_text(tokenizer: Any, text: str, *, max_length: int, overlong: str = "truncate") -> dict | None:
    """Tokenise plain text (special tokens as the tokenizer adds them, then eos); every token a label."""
    check_length_settings(max_length, overlong)
    ids, labels = _encode_texts(tokenizer, [text])[0]
    return _fit(ids, labels, max_length, overlong)[0]
