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

# The tokens each built-in is written in, which a tokenizer should know as single tokens.
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}


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
    return [token for token in TEMPLATE_TOKENS.get(name, ()) if token not in vocab]
