"""The page: a header with the base model, then the Data, Train, Chat and Export tabs.

This module only lays out Gradio components and wires them to the lorafit functions in
``data_view``, ``form``, ``runs``, ``chat`` and ``export``; a ``LorafitError`` from any of them
is shown in the tab's status line, as the CLI prints it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lorafit.config import DataConfig
from lorafit.demo import default_model
from lorafit.errors import LorafitError
from lorafit.ui import data_view, form
from lorafit.ui.chat import ChatModels
from lorafit.ui.export import GGUF_DTYPES, gguf_run, merge_run
from lorafit.ui.runs import Runs, chosen
from lorafit.ui.train_tab import method_input, train_tab
from lorafit.ui.widgets import error_text, field_input

CSS = """
.lf-mask .lf-text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px;
  line-height: 1.6; background: none; border: none; padding: 0; margin: 0; }
.lf-tok { border-radius: 2px; }
.lf-text .lf-tok { box-shadow: inset -1px 0 0 rgba(0,0,0,0.08); }
.lf-trained { background: #fde68a; color: #111827; }
.lf-context { color: #9ca3af; }
.lf-cut { color: #d1d5db; text-decoration: line-through; }
.lf-legend .lf-tok { padding: 1px 6px; margin-right: 6px; font-size: 12px; }
.lf-where { font-size: 13px; margin: 0 0 4px 0; }
.lf-bad { color: #b91c1c; }
.lf-row { display: flex; align-items: center; gap: 8px; margin: 3px 0; font-size: 12px; }
.lf-row-label { width: 48px; color: #6b7280; }
.lf-row-fill { width: 90px; color: #6b7280; }
.lf-bar { flex: 1; display: flex; height: 16px; background: #e5e7eb; border-radius: 3px; overflow: hidden; }
.lf-seg { height: 100%; box-shadow: inset -1px 0 0 #fff; }
.lf-seg0 { background: #60a5fa; }
.lf-seg1 { background: #2563eb; }
.lf-note { font-size: 12px; color: #6b7280; }
.lf-pair .lf-prompt { margin-bottom: 8px; }
.lf-sides { display: flex; gap: 12px; align-items: flex-start; }
.lf-side { flex: 1 1 0; min-width: 0; border-left: 3px solid #e5e7eb; padding-left: 8px; }
.lf-side-name { font-size: 12px; font-weight: 600; margin: 0 0 4px 0; }
#samples h1 { font-size: 1.1em; }
#samples h2 { font-size: 1em; }
"""


class Page:
    """The page's shared state: the runs folder, loaded tokenizers, the chat models, and a temporary
    folder for the YAML files the page offers for download."""

    def __init__(self, runs: Runs, model: str | None = None) -> None:
        self.runs = runs
        self.model = model or default_model()  # what the Base model box starts with
        self.chat = ChatModels()
        self._tokenizers: dict[str, Any] = {}
        self.downloads = Path(tempfile.mkdtemp(prefix="lorafit-ui-"))

    def tokenizer(self, model: str) -> Any:
        """The tokenizer ``lorafit train`` would load for ``model`` (kept for the next call)."""
        from lorafit.models import load_tokenizer

        model = (model or "").strip() or self.model
        if model not in self._tokenizers:
            cfg = form.base_config(model)
            self._tokenizers[model] = load_tokenizer(cfg.model, cfg.tokenizer)
        return self._tokenizers[model]


def _data_settings(source: str, values: dict[str, Any]) -> DataConfig:
    """The data section the page's fields describe (validated by DataConfig itself)."""
    kwargs = {f.key: values[f.name] for f in form.DATA_FIELDS}
    kwargs["max_length"] = int(kwargs["max_length"])
    return DataConfig(train=(source or "").strip() or None, **kwargs)


def build(page: Page) -> gr.Blocks:
    """The whole page."""
    with gr.Blocks(title="lorafit", analytics_enabled=False) as app:
        gr.Markdown(
            "## lorafit\nFine-tune a causal LM with LoRA: inspect the data, train, watch, chat, "
            f"export. Runs are folders in `{page.runs.root}`; they keep going when this page closes."
        )
        model = gr.Textbox(
            page.model,
            label="Base model",
            info="a Hugging Face id, a local folder, a GGUF file, or lorafit-demo (a tiny random model)",
            elem_id="model",
        )
        fields: dict[str, gr.components.Component] = {}
        # Set by the Data tab's demo button, shown in the Train tab.
        eval_path = gr.Textbox(label="Eval data (optional)", elem_id="eval-path", scale=2, render=False)
        method = method_input()  # shown in the Train tab; the Data tab reads it too
        with gr.Tabs():
            with gr.Tab("Data", id="data"):
                data = _data_tab(page, model, method, fields)
            with gr.Tab("Train", id="train"):
                run_select = train_tab(
                    page.runs, page.downloads, model, data.path, eval_path, method, fields, page.model
                )
            with gr.Tab("Chat", id="chat") as chat_tab:
                chat_run = _chat_tab(page)
            with gr.Tab("Export", id="export") as export_tab:
                export_run = _export_tab(page)
        _follow_the_recipe(model, method, fields, page.model)
        _wire_demo_button(page, data, model, eval_path, fields)  # after the Train tab added its fields
        for tab, dropdown in ((chat_tab, chat_run), (export_tab, export_run)):
            tab.select(lambda: gr.update(choices=page.runs.finished()), outputs=dropdown)
        # A page opened (or reopened after a closed tab) while a run goes on shows that run.
        app.load(
            lambda: gr.update(choices=page.runs.list_runs(), value=page.runs.active()), outputs=run_select
        )
    return app


def _follow_the_recipe(
    model: gr.Textbox, method: gr.Dropdown, fields: dict[str, gr.components.Component], start: str
) -> None:
    """A model or method that takes another recipe (the demo's, the one for pretrained models, or
    the preference recipe) resets the settings to that recipe's, as ``lorafit train
    --model.name_or_path M --method X`` would start."""
    from lorafit.config import recipe_file

    recipe = gr.State(str(recipe_file(start)))

    def follow(name: str | None, method_name: str | None, current: str) -> list:
        name, method_name = (name or "").strip() or start, method_name or "sft"
        path = str(recipe_file(name, method_name))
        if path == current:
            return [gr.skip()] * len(fields) + [current]
        values = form.field_values(form.base_config(name, method_name))
        return [values[key] for key in fields] + [path]

    gr.on(
        [model.change, method.change],
        follow,
        inputs=[model, method, recipe],
        outputs=[*fields.values(), recipe],
        trigger_mode="always_last",
    )


@dataclass
class _DataTab:
    """What the Data tab hands on: its data path box (the Train tab reads it), its demo button, and
    its Inspect handler with that handler's inputs and outputs (the demo button runs it too)."""

    path: gr.Textbox
    demo: gr.Button
    inspect: Callable[..., tuple]
    inputs: list
    outputs: list


def _data_tab(page: Page, model: gr.Textbox, method: gr.Dropdown, fields: dict) -> _DataTab:
    """Lay out the Data tab and wire its own handlers; ``method`` (the Train tab's) says how a
    preference file is read."""
    defaults = form.field_values(form.base_config(page.model))

    with gr.Row():
        path = gr.Textbox(
            label="Data file",
            placeholder="data/train.jsonl, a folder of .jsonl/.json/.csv/.parquet files, or hf:NAME[:SPLIT]",
            elem_id="data-path",
            scale=3,
        )
        upload = gr.File(
            label="or upload one",
            file_types=[".jsonl", ".json", ".csv", ".parquet"],
            scale=1,
            height=110,
            elem_id="data-upload",
        )
    with gr.Row():
        demo = gr.Button("Use the demo data", elem_id="use-demo")
        inspect = gr.Button("Inspect", variant="primary", elem_id="inspect")
    with gr.Row():
        for f in form.DATA_FIELDS:
            fields[f.name] = field_input(f, defaults[f.name])
    summary = gr.Markdown(elem_id="data-summary")
    with gr.Row():
        histogram = gr.BarPlot(
            x="tokens",
            y="examples",
            label="Tokens per example",
            elem_id="length-histogram",
            y_lim=[0, None],
            x_label_angle=-45,
        )
        packing = gr.HTML(label="How packing fills rows", elem_id="packing")
    index = gr.Number(1, label="Example (record number)", minimum=1, precision=0, elem_id="example-index")
    mask = gr.HTML(elem_id="mask")
    bad = gr.Dataframe(
        headers=["where", "reason"],
        label="Records not trained on, then the checks' findings",
        elem_id="bad-records",
    )
    report = gr.State(None)
    data_inputs = [model, method, path, *(fields[f.name] for f in form.DATA_FIELDS)]

    def run_inspect(model_name: str, method_name: str, source: str, *values: Any) -> tuple:
        try:
            settings = _data_settings(
                source, dict(zip([f.name for f in form.DATA_FIELDS], values, strict=True))
            )
            tokenizer = page.tokenizer(model_name)
            result = data_view.inspect_any(tokenizer, settings, method_name or "sft")
            return _inspected(result, data_view.example_html(tokenizer, result, 0))
        except LorafitError as e:
            return error_text(e), None, "", gr.update(value=1), "", [], None

    def show_example(model_name: str, result: Any, number: float) -> str:
        if result is None:
            return ""
        try:
            return data_view.example_html(page.tokenizer(model_name), result, int(number) - 1)
        except LorafitError as e:
            return error_text(e)

    outputs = [summary, histogram, packing, index, mask, bad, report]
    inspect.click(run_inspect, inputs=data_inputs, outputs=outputs)
    upload.upload(lambda f: f, inputs=upload, outputs=path).then(
        run_inspect, inputs=data_inputs, outputs=outputs
    )
    index.input(show_example, inputs=[model, report, index], outputs=mask, trigger_mode="always_last")
    return _DataTab(path=path, demo=demo, inspect=run_inspect, inputs=data_inputs, outputs=outputs)


def _inspected(result: data_view.DataReport | data_view.PreferenceView, first: str) -> tuple:
    """The Data tab's outputs for an inspected file whose first record shows as ``first``."""
    bins = pd.DataFrame(data_view.length_histogram(result), columns=["tokens", "examples"])
    return (
        result.summary(),
        gr.BarPlot(bins, sort=list(bins["tokens"])),  # bins in order, not sorted as text
        data_view.packing_html(result),
        gr.update(maximum=len(result.records), value=1),
        first,
        [list(row) for row in (*result.skipped, *result.findings)],
        result,
    )


def _wire_demo_button(
    page: Page, data: _DataTab, model: gr.Textbox, eval_path: gr.Textbox, fields: dict
) -> None:
    """The demo button: the demo's data for the model in the box and, for the real demo model, the
    demo's settings in every field of both tabs; then the data is inspected."""
    keys = list(fields)

    def use_demo(model_name: str | None) -> list:
        train, evaluate, values = form.demo_settings((model_name or "").strip() or page.model)
        settings = [values[key] for key in keys] if values else [gr.skip()] * len(keys)
        return [train, evaluate, *settings]

    data.demo.click(use_demo, inputs=model, outputs=[data.path, eval_path, *fields.values()]).then(
        data.inspect, inputs=data.inputs, outputs=data.outputs
    )


def _chat_tab(page: Page) -> gr.Dropdown:
    with gr.Row():
        run = gr.Dropdown(page.runs.finished(), label="Run (its adapter)", elem_id="chat-run", scale=3)
        with_base = gr.Checkbox(True, label="the base model beside it (loads it a second time)", scale=2)
        load = gr.Button("Load", elem_id="chat-load", scale=1)
    note = gr.Markdown(elem_id="chat-note")
    with gr.Row():
        system = gr.Textbox(label="System prompt (optional)", scale=3)
        max_new = gr.Slider(
            8, 1024, value=256, step=8, label="max new tokens", scale=1, elem_id="chat-max-new"
        )
    with gr.Row():
        adapter_bot = gr.Chatbot(
            label="with the adapter", elem_id="chat-adapter", height=360, render_markdown=False
        )
        base_bot = gr.Chatbot(label="base model", elem_id="chat-base", height=360, render_markdown=False)
    with gr.Row():
        message = gr.Textbox(label="Message", placeholder="Ask something", elem_id="chat-message", scale=4)
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        clear = gr.Button("Clear", scale=1)
    histories = gr.State({"adapter": [], "base": []})

    def do_load(name: str | None, base: bool) -> tuple:
        try:
            text = page.chat.load(page.runs.run_dir(chosen(name)), with_base=base)
        except LorafitError as e:
            return error_text(e), [], [], {"adapter": [], "base": []}
        return text, [], [], {"adapter": [], "base": []}

    def do_send(text: str, state: dict, prompt: str, max_tokens: float) -> Iterator[tuple]:
        try:
            for out in page.chat.reply(text, state, system=prompt, max_new_tokens=int(max_tokens)):
                yield "", out["adapter"], out.get("base", []), out, gr.skip()
        except LorafitError as e:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), error_text(e)

    load.click(do_load, inputs=[run, with_base], outputs=[note, adapter_bot, base_bot, histories])
    chat_out = [message, adapter_bot, base_bot, histories, note]
    send.click(do_send, inputs=[message, histories, system, max_new], outputs=chat_out)
    message.submit(do_send, inputs=[message, histories, system, max_new], outputs=chat_out)
    clear.click(lambda: ([], [], {"adapter": [], "base": []}), outputs=[adapter_bot, base_bot, histories])
    return run


def _export_tab(page: Page) -> gr.Dropdown:
    gr.Markdown(
        "Fold the adapter into its base weights and write the result inside the run folder: a plain "
        "transformers model that `AutoModelForCausalLM.from_pretrained` loads without lorafit or PEFT, "
        "or one GGUF file with an Ollama `Modelfile` for llama.cpp, Ollama and LM Studio."
    )
    with gr.Row():
        run = gr.Dropdown(page.runs.finished(), label="Run", elem_id="export-run", scale=3)
        folder = gr.Textbox("merged", label="Folder inside the run", elem_id="export-folder", scale=2)
        dtype = gr.Dropdown(
            list(GGUF_DTYPES), value="f16", label="GGUF type", elem_id="export-dtype", scale=1
        )
    with gr.Row():
        merge = gr.Button("Merge (transformers folder)", variant="primary", elem_id="export-merge")
        gguf = gr.Button("GGUF + Modelfile", elem_id="export-gguf")
    result = gr.Markdown(elem_id="export-result")

    def report(out: Path, files: list[tuple[str, int]], note: str = "") -> str:
        listing = "\n".join(f"- `{n}` ({_size(size)})" for n, size in files)
        return f"saved in `{out}`:\n\n{listing}" + (f"\n\n{note}" if note else "")

    def do_merge(name: str | None, out_name: str) -> str:
        try:
            return "merged model " + report(*merge_run(page.runs.run_dir(chosen(name)), out_name))
        except LorafitError as e:
            return error_text(e)

    def do_gguf(name: str | None, out_name: str, gguf_type: str) -> str:
        try:
            out, files, note = gguf_run(page.runs.run_dir(chosen(name)), out_name, gguf_type)
        except LorafitError as e:
            return error_text(e)
        return f"GGUF {report(out, files, note)}\n\nthen: `ollama create NAME -f {out / 'Modelfile'}`"

    merge.click(do_merge, inputs=[run, folder], outputs=result)
    gguf.click(do_gguf, inputs=[run, folder, dtype], outputs=result)
    return run


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def serve(host: str, port: int, runs: Path, model: str | None = None) -> None:
    """Build the page and serve it until interrupted; ``model`` starts in the Base model box."""
    page = Page(Runs(runs), model)
    app = build(page)
    try:
        app.queue().launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            show_error=True,
            footer_links=[],
            run_history=False,
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            css=CSS,
        )
    except OSError as e:
        raise LorafitError(f"cannot serve on {host}:{port} ({e}); choose another --port") from None
