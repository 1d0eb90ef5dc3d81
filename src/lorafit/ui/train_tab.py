"""The Train tab: the method, settings, the YAML they make, Start / Stop / Resume, and the live
view of a run (the loss; for a preference method also the rewards TRL logs).

Every second a timer reads the chosen run (its process state, ``metrics.jsonl``, ``samples.md``,
``loss.png`` and the tail of its output) through ``Runs.view``; the chart is redrawn only when
the run has logged something new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lorafit.config import RunConfig
from lorafit.errors import LorafitError
from lorafit.methods import METHODS
from lorafit.training.rundir import LOSS_PLOT_NAME
from lorafit.ui import form
from lorafit.ui.runs import Runs, RunView, chosen
from lorafit.ui.widgets import error_text, field_input

CHART_COLORS = {"train": "#2563eb", "eval": "#f59e0b"}
# The rewards chart's series: TRL's metric names (train, and eval_ for eval) -> the legend's words.
REWARD_SERIES = {
    "rewards/margins": "margin",
    "rewards/accuracies": "accuracy",
    "eval_rewards/margins": "eval margin",
    "eval_rewards/accuracies": "eval accuracy",
}
REWARD_COLORS = {
    "margin": "#2563eb",
    "accuracy": "#16a34a",
    "eval margin": "#f59e0b",
    "eval accuracy": "#db2777",
}
METHOD_INFO = (
    "sft learns the answers; dpo, orpo and simpo learn pairs (chosen over rejected); kto learns "
    "answers labelled good or bad. A preference method starts from lorafit's preference recipe."
)


def _chart(view: RunView) -> gr.LinePlot:
    """The loss chart's update: train loss at each logging step, eval loss at each eval."""
    points = [(r["step"], r["loss"], "train") for r in view.metrics if "loss" in r]
    points += [(r["step"], r["eval_loss"], "eval") for r in view.metrics if "eval_loss" in r]
    frame = pd.DataFrame(points, columns=["step", "loss", "series"])
    # Gradio redraws a plot whose value alone changed by swapping its data, and a series that
    # was not there at first (eval, after the first eval) then stays clipped away; a change of
    # colors_in_legend makes it draw the chart anew.
    present = [series for series in CHART_COLORS if series in set(frame["series"])]
    return gr.LinePlot(frame, colors_in_legend=present)


def _rewards_chart(view: RunView) -> gr.LinePlot:
    """The rewards chart's update: each logged reward margin and accuracy (the share of pairs whose
    chosen answer out-rewards the rejected one); hidden for a run that logs none (sft)."""
    points = [
        (r["step"], r[key], name) for key, name in REWARD_SERIES.items() for r in view.metrics if key in r
    ]
    frame = pd.DataFrame(points, columns=["step", "value", "series"])
    present = [series for series in REWARD_COLORS if series in set(frame["series"])]
    return gr.LinePlot(frame, colors_in_legend=present, visible=bool(points))


def method_input() -> gr.Dropdown:
    """The Method choice, made unrendered: the Data tab reads it, the Train tab shows it."""
    return gr.Dropdown(
        list(METHODS), value="sft", label="Method", info=METHOD_INFO, elem_id="method", render=False
    )


def _method_row(method: gr.Dropdown, fields: dict, defaults: dict[str, Any]) -> None:
    """The Method choice and its TRL keys; a key shows while its method is chosen."""
    with gr.Row():
        method.render()
        for f in form.METHOD_FIELDS:
            fields[f.name] = field_input(f, defaults[f.name], visible=method.value in f.methods)
    keys = [fields[f.name] for f in form.METHOD_FIELDS]
    method.change(
        lambda chosen: [gr.update(visible=chosen in f.methods) for f in form.METHOD_FIELDS],
        inputs=method,
        outputs=keys,
        show_progress="hidden",
    )


def train_tab(
    runs: Runs,
    downloads: Path,
    model: gr.Textbox,
    path: gr.Textbox,
    eval_path: gr.Textbox,
    method: gr.Dropdown,
    fields: dict,
    start_model: str,
) -> gr.Dropdown:
    """Lay out the Train tab (inside a ``gr.Tab``) and wire it; returns the Runs dropdown.

    ``fields`` already holds the Data tab's inputs; the LoRA, training and method fields are
    added, with the values ``start_model`` starts from. ``eval_path`` and ``method``
    (:func:`method_input`) are created unrendered by the caller, so the Data tab can use them.
    """
    tab = _lay_out(runs, model, path, eval_path, method, fields, start_model)
    _wire(tab, runs, downloads, fields)
    return tab.run_select


@dataclass
class _Tab:
    """The Train tab's components that its handlers read or write."""

    inputs: list  # what a run config is built from, in the order RunConfig's builder takes them
    name: gr.Textbox
    yaml_view: gr.Code
    download: gr.DownloadButton
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    note: gr.Markdown
    status: gr.Markdown
    chart: gr.LinePlot
    rewards: gr.LinePlot
    run_select: gr.Dropdown
    refresh: gr.Button
    samples: gr.Markdown
    loss_png: gr.Image
    log: gr.Textbox
    timer: gr.Timer
    seen: gr.State  # what the chart last showed, so an unchanged run is not redrawn


def _lay_out(
    runs: Runs,
    model: gr.Textbox,
    path: gr.Textbox,
    eval_path: gr.Textbox,
    method: gr.Dropdown,
    fields: dict,
    start_model: str,
) -> _Tab:
    """The settings, the run config's YAML, the run buttons, the charts and the run's output."""
    defaults = form.field_values(form.base_config(start_model))
    _method_row(method, fields, defaults)
    with gr.Row():
        for f in form.TRAIN_FIELDS[:4]:
            fields[f.name] = field_input(f, defaults[f.name])
    with gr.Row():
        for f in form.TRAIN_FIELDS[4:]:
            fields[f.name] = field_input(f, defaults[f.name])
    with gr.Row():
        qlora = gr.Checkbox(label="QLoRA: 4-bit NF4 base (bitsandbytes)", elem_id="qlora")
        eval_path.render()
        # a function: each page load asks for a fresh name, so a reopened page never offers a used one
        name = gr.Textbox(runs.new_name, label=f"Run folder, inside {runs.root}", elem_id="run-name")
    extra = gr.Textbox(
        label="More settings, as on the command line",
        placeholder="--training_config.logging_steps 1 --training_config.eval_steps 10",
        elem_id="extra",
    )
    with gr.Row():
        with gr.Column(scale=2):
            yaml_view = gr.Code(
                language="yaml",
                label="Run config: what Start runs",
                interactive=False,
                elem_id="run-yaml",
                max_lines=18,
            )
            download = gr.DownloadButton("Download the YAML", elem_id="download-yaml")
        with gr.Column(scale=3):
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="start")
                stop = gr.Button("Stop (checkpoint)", variant="stop", elem_id="stop")
                resume = gr.Button("Resume", elem_id="resume")
            note = gr.Markdown(elem_id="run-note")
            status = gr.Markdown(elem_id="run-status")
            chart, rewards = _charts()
            with gr.Row():
                run_select = gr.Dropdown(runs.list_runs(), label="Runs", elem_id="run-select", scale=3)
                refresh = gr.Button("Refresh the list", scale=1)
    with gr.Row():
        samples = gr.Markdown(elem_id="samples")
        loss_png = gr.Image(label=LOSS_PLOT_NAME, type="pil", interactive=False, elem_id="loss-png")
    log = gr.Textbox(label="lorafit train output", lines=10, max_lines=10, autoscroll=True, elem_id="run-log")
    return _Tab(
        inputs=[model, path, eval_path, extra, name, qlora, method, *fields.values()],
        name=name,
        yaml_view=yaml_view,
        download=download,
        start=start,
        stop=stop,
        resume=resume,
        note=note,
        status=status,
        chart=chart,
        rewards=rewards,
        run_select=run_select,
        refresh=refresh,
        samples=samples,
        loss_png=loss_png,
        log=log,
        timer=gr.Timer(1.0),
        seen=gr.State(None),
    )


def _wire(tab: _Tab, runs: Runs, downloads: Path, fields: dict) -> None:
    """The handlers: the YAML preview, Start / Stop / Resume, and the run's view, refreshed each second."""

    def config(
        model_name: str,
        source: str,
        eval_source: str,
        extra_text: str,
        run_name: str,
        use_qlora: bool,
        method: str,
        *values,
    ) -> RunConfig:
        """The run config of the page's fields (the order of ``tab.inputs``)."""
        return form.build_run_config(
            model_name,
            dict(zip(fields, values, strict=True)),
            train=(source or "").strip() or None,
            eval=(eval_source or "").strip() or None,
            extra=extra_text,
            run_dir=runs.run_dir(run_name),
            qlora=use_qlora,
            method=method,
        )[0]

    def preview(*args: Any) -> tuple:
        try:
            cfg = config(*args)
        except LorafitError as e:
            return f"# {e}", None
        out = downloads / f"{args[4]}.yaml"
        out.write_text(cfg.to_yaml(), encoding="utf-8")
        return cfg.to_yaml(), str(out)

    def show(run: str | None, last: Any) -> tuple:
        return _show(runs, run, last)

    def act(what: Callable[..., tuple]) -> Callable[..., tuple]:
        def handler(*args: Any) -> tuple:
            try:
                return what(*args)
            except LorafitError as e:
                return error_text(e), gr.skip(), gr.skip()

        return handler

    def do_start(*args: Any) -> tuple:
        cfg = config(*args)
        run_name = args[4]
        runs.start(run_name, cfg)
        listing = gr.update(choices=runs.list_runs(), value=run_name)
        return f"started {run_name}", listing, runs.new_name()

    def do_resume(run: str | None) -> tuple:
        runs.resume(chosen(run, "a stopped run"))
        return f"resuming {run}", gr.skip(), gr.skip()

    def do_stop(run: str | None) -> tuple:
        return runs.stop(chosen(run, "the running run")), gr.skip(), gr.skip()

    live = [tab.status, tab.chart, tab.rewards, tab.samples, tab.loss_png, tab.log, tab.seen]
    acted = [tab.note, tab.run_select, tab.name]
    # triggers=None: on page load and whenever any of the inputs changes
    gr.on(
        None,
        preview,
        inputs=tab.inputs,
        outputs=[tab.yaml_view, tab.download],
        show_progress="hidden",
        trigger_mode="always_last",
    )
    tab.start.click(act(do_start), inputs=tab.inputs, outputs=acted)
    tab.resume.click(act(do_resume), inputs=tab.run_select, outputs=acted)
    tab.stop.click(act(do_stop), inputs=tab.run_select, outputs=acted)
    tab.refresh.click(lambda: gr.update(choices=runs.list_runs()), outputs=tab.run_select)
    tab.run_select.change(lambda run: show(run, None), inputs=tab.run_select, outputs=live)
    tab.timer.tick(show, inputs=[tab.run_select, tab.seen], outputs=live, show_progress="hidden")


def _charts() -> tuple[gr.LinePlot, gr.LinePlot]:
    """The loss chart, and the rewards chart that a preference run's metrics show."""
    loss = gr.LinePlot(
        x="step", y="loss", color="series", color_map=CHART_COLORS, label="Loss", elem_id="loss-chart"
    )
    rewards = gr.LinePlot(
        x="step",
        y="value",
        color="series",
        color_map=REWARD_COLORS,
        label="Rewards (margin: chosen - rejected; accuracy: share of pairs chosen wins)",
        elem_id="rewards-chart",
        visible=False,
    )
    return loss, rewards


def _show(runs: Runs, run: str | None, last: Any) -> tuple:
    """The run's view for the live outputs (status, charts, samples, loss.png, log, what was seen):
    the charts and files are redrawn only when the run has logged something new since ``last``."""
    if not run:
        return "", gr.skip(), gr.skip(), gr.skip(), gr.skip(), "", last
    try:
        view = runs.view(run)
    except LorafitError as e:
        return error_text(e), gr.skip(), gr.skip(), gr.skip(), gr.skip(), "", last
    key = (run, len(view.metrics), view.samples is not None, view.state)
    if key == last:
        return view.headline(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), view.log_tail, last
    charts = (_chart(view), _rewards_chart(view))
    return view.headline(), *charts, view.samples or "", _image(view.loss_png), view.log_tail, key


def _image(path: Path | None) -> Any:
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as image:
        return image.copy()  # a copy: the run rewrites loss.png while the page holds it
