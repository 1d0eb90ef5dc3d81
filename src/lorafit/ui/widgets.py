"""Small pieces the tabs share: the input for a settings field, and how an error reads."""

from __future__ import annotations

from typing import Any

import gradio as gr

from lorafit.ui import form


def error_text(e: Exception) -> str:
    """A ``LorafitError`` as the tab's status line shows it (the CLI's wording)."""
    return f"**error:** {e}"


def field_input(f: form.Field, value: Any, visible: bool = True) -> gr.components.Component:
    """The Gradio input for one settings field; its element id is ``field-SECTION-KEY``."""
    common = {
        "label": f.label,
        "info": f.info or None,
        "elem_id": f"field-{f.section}-{f.key}",
        "visible": visible,
    }
    if f.choices:
        return gr.Dropdown(list(f.choices), value=value, **common)
    if f.kind is bool:
        return gr.Checkbox(value=value, **common)
    if f.kind in (int, float):
        return gr.Number(value=value, precision=0 if f.kind is int else None, **common)
    return gr.Textbox(value=value, **common)
