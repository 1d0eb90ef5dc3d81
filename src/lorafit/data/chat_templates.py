"""Chat templates for tokenizers that have none (base models): built-in ones by name, a file, or a
Jinja string, as ``tokenizer.chat_template`` takes them.

The built-ins write the three common conversation formats:

- ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` (Qwen, SmolLM2, many others);
- ``phi3``: ``<|role|>\\ncontent<|end|>\\n``, then the eos token after the conversation (Phi-3);
- ``llama3``: the bos token, then ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``.

Labels never depend on the template's text: they come from token positions
(:mod:`lorafit.data.template`), so any template that renders earlier turns unchanged works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError, did_you_mean

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}
"""The built-in templates, by the name ``tokenizer.chat_template`` takes."""


@dataclass(frozen=True)
class ChatFamily:
    """One conversation format, written once: a turn is ``head`` (``{role}`` standing for the role),
    the content, then ``end`` (the end-of-turn token), and ``sep`` before the next turn.
    ``tokens`` are the special tokens it is written in, end of turn first (a tokenizer should know
    each as one token; a model writing any of them has ended its turn). The built-in Jinja template
    (:data:`BUILTIN_TEMPLATES`), the recognition of a tokenizer's own template
    (:func:`template_family`) and the Ollama template (:mod:`lorafit.export.ollama`) derive from it."""

    head: str
    end: str
    sep: str
    tokens: tuple[str, ...]

    def turn(self, role: str, content: str) -> str:
        return self.head.replace("{role}", role) + content + self.end


FAMILIES = {
    "chatml": ChatFamily("<|im_start|>{role}\n", "<|im_end|>", "\n", ("<|im_end|>", "<|im_start|>")),
    "phi3": ChatFamily(
        "<|{role}|>\n", "<|end|>", "\n", ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>")
    ),
    "llama3": ChatFamily(
        "<|start_header_id|>{role}<|end_header_id|>\n\n",
        "<|eot_id|>",
        "",
        ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    ),
}
"""The families lorafit writes and recognises, by built-in template name."""


def template_family(tokenizer: Any) -> str | None:
    """``"chatml"``, ``"phi3"`` or ``"llama3"``: the family whose turns the tokenizer's chat template
    writes, judged by rendering a conversation (not by the template's text, which builds its
    markers in many ways); None for any other template or none."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    probe = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that fails on a plain conversation has no family
        return None
    for name, family in FAMILIES.items():
        if all(family.turn(m["role"], m["content"]) in text for m in probe):
            return name
    return None


def resolve_chat_template(value: str) -> tuple[str, str | None]:
    """``(template text, built-in name or None)`` for a ``tokenizer.chat_template`` value: a
    built-in name, the path of a ``.jinja`` (or any text) file, or the Jinja text itself."""
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value], value
    if "{{" in value or "{%" in value:
        return value, None
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), None
        except (OSError, UnicodeDecodeError) as e:
            raise LorafitError(f"tokenizer.chat_template: {path} is not readable UTF-8 text ({e})") from None
    raise LorafitError(
        f"tokenizer.chat_template: {value!r} is not a built-in template"
        f"{did_you_mean(value, BUILTIN_TEMPLATES)} ({', '.join(BUILTIN_TEMPLATES)}), an existing file, "
        "or Jinja text (with {{ ... }} or {% ... %})"
    )


def missing_template_tokens(tokenizer: Any, name: str) -> list[str]:
    """The tokens built-in template ``name`` is written in that ``tokenizer`` lacks as one token:
    they would be split into ordinary pieces (and learned as text)."""
    vocab = tokenizer.get_vocab()
    return [token for token in FAMILIES[name].tokens if token not in vocab] if name in FAMILIES else []
