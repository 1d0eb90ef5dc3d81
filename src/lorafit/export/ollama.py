"""An Ollama ``Modelfile`` beside an exported GGUF, so that ``ollama create NAME -f Modelfile`` and
``ollama run NAME`` work as written.

The chat template is written in Ollama's Go-template syntax for the families lorafit recognises in
the tokenizer's own (Jinja) chat template, each rendering a conversation to the same text as the
tokenizer's template with ``add_generation_prompt=True``:

- ``chatml`` (Qwen, SmolLM2): ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message.
- ``phi3``: ``<|role|>\\ncontent<|end|>\\n`` per message.
- ``llama3``: ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`` per message (bos
  comes from the GGUF's ``add_bos_token``, as Ollama adds it).

A template that writes a default system prompt into a conversation that has none (SmolLM2's,
Qwen2.5's) gets it as the Modelfile's ``SYSTEM``, which Ollama uses when a request has no system
message: the prompt is then the one training saw. Each TEMPLATE is checked against the tokenizer's
template on a conversation with and without a system turn.

For any other template, for one that renders differently, and for a run trained with tools
(``tools``: the Go templates here render messages only, and a prompt without the tool definitions
is not the prompt training saw), the Modelfile has no TEMPLATE line but a comment saying why, and
a warning says it too: Ollama then picks a template from the chat template stored in the GGUF
(``tokenizer.chat_template``) when it recognises it, and otherwise sends the bare prompt.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorafit.data.chat_templates import FAMILIES, ChatFamily, template_family
from lorafit.disk import write_text_atomic
from lorafit.errors import LorafitError

MODELFILE_NAME = "Modelfile"


def _go_template(family: ChatFamily) -> str:
    """The family's turns in Ollama's Go-template syntax, ending with the assistant's turn opened."""
    head = family.head.replace("{role}", "{{ .Role }}")
    turn = head + "{{ .Content }}" + family.end + family.sep
    return "{{- range .Messages }}" + turn + "{{ end }}" + family.head.replace("{role}", "assistant")


TEMPLATES = {name: _go_template(family) for name, family in FAMILIES.items()}


_PROBE = [{"role": "user", "content": "Hi there"}]
_PROBE_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "How are you?"},
]
_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe_tool", "parameters": {"type": "object"}}}]


def _family_text(family: ChatFamily, messages: list[dict]) -> str:
    """What the family's Ollama template renders for ``messages`` (see :func:`_go_template`)."""
    turns = "".join(family.turn(m["role"], m["content"]) + family.sep for m in messages)
    return turns + family.head.replace("{role}", "assistant")


def _check_template(tokenizer: Any, family: ChatFamily, tools: bool) -> tuple[str | None, str | None]:
    """``(default system prompt or None, why the family's template does not render as the
    tokenizer's or None)``: both judged by rendering probe conversations with the tokenizer's own
    template (a leading bos token left out: Ollama adds it from the GGUF's ``add_bos_token``;
    unless the family's turns start with it, as ChatML's do where bos is ``<|im_start|>``)."""

    def rendered(messages: list[dict], with_tools: list[dict] | None = None) -> str:
        text = tokenizer.apply_chat_template(
            messages, tools=with_tools, tokenize=False, add_generation_prompt=True
        )
        bos = getattr(tokenizer, "bos_token", None)
        return text.removeprefix(bos) if bos and not family.head.startswith(bos) else text

    if rendered(_PROBE_CHAT) != _family_text(family, _PROBE_CHAT):
        return None, "the chat template renders a conversation differently from lorafit's Ollama template"
    system = None
    bare, ours = rendered(_PROBE), _family_text(family, _PROBE)
    if bare != ours:
        head, tail = family.head.replace("{role}", "system"), family.end + family.sep + ours
        if not (bare.startswith(head) and bare.endswith(tail)):
            return None, "the chat template adds text to a conversation that lorafit's Ollama template cannot"
        system = bare[len(head) : -len(tail)]
    if tools and rendered(_PROBE, _PROBE_TOOLS) != bare:
        return system, (
            "the run was trained with tools, which the chat template renders and lorafit's Ollama "
            "template does not"
        )
    return system, None


def _default_stops(tokenizer: Any, family: str | None) -> list[str]:
    """eos, the end-of-turn token and the family's role markers that are in the vocabulary."""
    from lorafit.models import stop_token_ids

    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    vocab = tokenizer.get_vocab()
    stops += [t for t in (FAMILIES[family].tokens if family in FAMILIES else ()) if t in vocab]
    return list(dict.fromkeys(stops))


def _quoted(text: str) -> str:
    if '"""' in text:
        raise LorafitError('a Modelfile value cannot hold """ (it ends the value)')
    return f'"""{text}"""'


def write_modelfile(
    folder: str | os.PathLike,
    gguf_filename: str,
    tokenizer: Any,
    *,
    stop_tokens: Sequence[str] | None = None,
    system: str | None = None,
    tools: bool = False,
    notes: Callable[[str], Any] | None = None,
) -> Path:
    """Write ``folder/Modelfile`` for the GGUF file ``gguf_filename`` in the same folder.

    Args:
        folder: where the GGUF file is (and the Modelfile goes).
        gguf_filename: the GGUF file's name; the Modelfile says ``FROM ./<name>``.
        tokenizer: the exported tokenizer; its chat template picks the TEMPLATE (see the module
            docstring) and its eos / end-of-turn tokens the default stop tokens.
        stop_tokens: one ``PARAMETER stop`` line each; by default eos, the end-of-turn token
            (``<|end|>`` for Phi-3) and the template family's role markers.
        system: an optional system prompt (``SYSTEM``); by default the one the chat template
            writes into a conversation without one, if it does.
        tools: whether the run was trained with tools (``data.tools``): a TEMPLATE that cannot
            render them is not written.
        notes: called with the note that the chat template is not one lorafit can write (without
            it, the note is a ``UserWarning``).

    Returns the Modelfile's path.
    """
    folder = Path(folder)
    if Path(gguf_filename).name != gguf_filename:
        raise LorafitError(f"gguf_filename {gguf_filename!r} must be a file name in {folder}, not a path")
    family = template_family(tokenizer)
    stops = list(stop_tokens) if stop_tokens is not None else _default_stops(tokenizer, family)
    lines = [f"FROM ./{gguf_filename}", ""]
    default_system, why = _check_template(tokenizer, FAMILIES[family], tools) if family else (None, None)
    if family is not None and why is None:
        lines.append(f"# chat template: {family}, the tokenizer's own template in Ollama's syntax")
        lines.append(f"TEMPLATE {_quoted(TEMPLATES[family])}")
        if system is None and default_system is not None:
            lines.append("# the chat template's default system prompt, for requests without one")
            system = default_system
    else:
        why = why or "lorafit has no Ollama template for this model's chat template"
        note = (
            f"{why}; Ollama picks one from the chat template stored in the GGUF when it recognises it, "
            "and otherwise sends the bare prompt"
        )
        lines.append(f"# no TEMPLATE: {note}")
        if notes is None:
            warnings.warn(f"Modelfile: {note}", UserWarning, stacklevel=2)
        else:
            notes(f"Modelfile: {note}")
    if system is not None:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines.append("")
    for stop in stops:
        if '"' in stop or "\n" in stop:
            raise LorafitError(f"stop token {stop!r} cannot be written on a PARAMETER line")
        lines.append(f'PARAMETER stop "{stop}"')
    return write_text_atomic(folder / MODELFILE_NAME, "\n".join(lines) + "\n")
