"""``lorafit ui`` in a real headless Chromium: data, a real training run, stop, resume, chat, merge.

The server is ``python -m lorafit ui`` (this checkout), the runs are real ``lorafit train``
processes on the demo model, and every check reads what the browser shows, compared with what
lorafit's own functions give for the same input. Each tab's screenshot is saved under the
test's temporary folder (``pytest --basetemp`` to keep them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from lorafit.constants import RUN_CONFIG_NAME
from lorafit.ui.runs import read_metrics

# A short run: 16 steps of one 256-token row, float32 (bfloat16 is slow on CPUs without
# AVX-512 BF16), an eval halfway and at the end, one before/after sample, no checkpoint but
# Stop's. The run pauses itself after step 2, and the resumed run after step 8 (conftest's
# PAUSE_AT_STEPS), until the test lets it go on: Stop certainly reaches the run mid-way, and the
# reopened page certainly finds the resumed run running, however fast or slow the machine.
STEPS = 16
RUN_SETTINGS = (
    f"--training_config.max_steps {STEPS} --training_config.logging_steps 1 "
    f"--training_config.eval_steps {STEPS // 2} --training_config.save_steps 1000 --data.eval_prompts 1"
)


# -- driving the page -----------------------------------------------------------------------


def paused(pid: int) -> bool:
    """Whether the process has stopped itself (SIGSTOP: its state in /proc is T)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"


def wait_for(what: str, check: Callable[[], Any], timeout: float, driver: Any = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` (and the page's
    status lines) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # an element being re-rendered: look again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            shown = ""
            if driver is not None:
                shown = " | ".join(
                    e.text
                    for e in driver.find_elements("css selector", "#run-status, #run-note, #data-summary")
                )
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; the page shows: {shown}")
        time.sleep(0.3)


def tab(driver: Any, name: str) -> None:
    """Open the tab and wait until the page says it is the selected one."""

    def button() -> Any:
        return next(b for b in driver.find_elements("css selector", "button[role=tab]") if b.text == name)

    wait_for(f"the {name} tab's button", lambda: button().is_enabled(), 30, driver)
    button().click()
    wait_for(f"the {name} tab to open", lambda: button().get_attribute("aria-selected") == "true", 30, driver)


def field(driver: Any, elem_id: str) -> Any:
    return driver.find_element("css selector", f"#{elem_id} textarea, #{elem_id} input")


def type_into(driver: Any, elem_id: str, text: str) -> None:
    """Replace the box's text as a paste does: one input event, not one per character (each
    would be a round trip to the server on a busy machine)."""
    box = field(driver, elem_id)
    driver.execute_script(
        "arguments[0].value = arguments[1];arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
        box,
        text,
    )
    assert box.get_attribute("value") == text


def choose(driver: Any, elem_id: str, value: str) -> None:
    """Pick ``value`` in a Gradio dropdown, and wait until the box shows it."""
    field(driver, elem_id).click()
    option = wait_for(
        f"option {value} in #{elem_id}",
        lambda: driver.find_element("css selector", f"li[role=option][aria-label='{value}']"),
        10,
    )
    option.click()
    wait_for(
        f"#{elem_id} to show {value}", lambda: field(driver, elem_id).get_attribute("value") == value, 10
    )


def text_of(driver: Any, elem_id: str) -> str:
    """The element's visible text with its whitespace (line breaks of the layout) collapsed."""
    return " ".join(driver.find_element("id", elem_id).text.split())


def chart_points(driver: Any) -> list[tuple[int, float, str]]:
    """``(step, loss, series)`` of every point the loss chart draws (Vega's SVG labels them)."""
    labels = driver.execute_script(
        "return Array.from(document.querySelectorAll("
        "'#loss-chart path[aria-roledescription=\"point\"]')).map(p => p.getAttribute('aria-label'))"
    )
    points = []
    for label in labels:
        found = dict(part.split(": ", 1) for part in label.split("; "))
        points.append((int(float(found["step"])), float(found["loss"]), found["series"]))
    return sorted(set(points))


def screenshot(driver: Any, path: Path) -> Path:
    """The whole page, not just the window."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, max(height, full + 120))
    time.sleep(0.5)
    driver.save_screenshot(str(path))
    driver.set_window_size(width, height)
    return path


def requests_off_this_machine(driver: Any) -> list[str]:
    """The URLs the page asked for that are not on 127.0.0.1 (read from Chromium's network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if (
                urlparse(url).scheme in ("http", "https", "ws", "wss")
                and urlparse(url).hostname != "127.0.0.1"
            ):
                urls.append(url)
    return urls


def open_page(driver: Any, url: str) -> None:
    driver.get(url)
    wait_for(
        "the page to render its tabs", lambda: driver.find_elements("css selector", "button[role=tab]"), 60
    )


def use_demo_data(driver: Any) -> str:
    tab(driver, "Data")
    type_into(driver, "field-data-max_length", "256")
    driver.find_element("id", "use-demo").click()
    return wait_for(
        "the demo data's summary",
        lambda: "480 records" in text_of(driver, "data-summary") and text_of(driver, "data-summary"),
        120,
        driver,
    )


# -- the tests ------------------------------------------------------------------------------


def test_data_tab_shows_format_mask_and_bad_records(server, browser, tmp_path) -> None:
    from lorafit.data import read_records, to_messages, tokenize_conversation
    from lorafit.demo import train_file
    from lorafit.models import load_tokenizer
    from lorafit.ui.form import base_config

    open_page(browser, server.url)
    summary = use_demo_data(browser)
    assert "format messages" in summary and "480 records" in summary
    assert re.search(r"packed into \d+ rows of 256 tokens, \d+\.\d% full", summary), summary
    bars = wait_for(
        "the token-length histogram's bars",
        lambda: browser.find_elements("css selector", "#length-histogram [aria-roledescription='bar']"),
        30,
        browser,
    )
    assert len(bars) >= 2
    assert browser.find_elements("css selector", "#packing .lf-row .lf-seg"), "packed rows are drawn"

    # The mask of record 1, against the labels lorafit trains on.
    first = read_records(train_file())[0]
    messages = to_messages(first, "messages")
    cfg = base_config("lorafit-demo")
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    labels = tokenize_conversation(tokenizer, messages, max_length=256)["labels"]
    trained = [t.text for t in browser.find_elements("css selector", "#mask .lf-text .lf-trained")]
    context = "".join(
        t.get_attribute("textContent")
        for t in browser.find_elements("css selector", "#mask .lf-text .lf-context")
    )
    assert len(trained) == sum(label != -100 for label in labels)
    for turn in messages:
        where = "".join(trained) if turn["role"] == "assistant" else context
        assert turn["content"] in where.replace("\n", " ") or turn["content"] in where, turn
    assert f"{sum(label != -100 for label in labels)}" in text_of(browser, "mask")
    screenshot(browser, tmp_path / "ui-data.png")

    # A file with bad records: each listed with its file, line and reason, as the CLI words them.
    bad_file = server.work / "bad.jsonl"
    good = json.dumps({"messages": messages})
    bad_file.write_text(
        "\n".join(
            [
                good,
                "{not json",
                json.dumps(
                    {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
                ),
                json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            ]
        )
        + "\n"
    )
    type_into(browser, "data-path", str(bad_file))
    browser.find_element("id", "inspect").click()
    wait_for("the bad records' summary", lambda: "3 not trained on" in text_of(browser, "data-summary"), 60)

    def table() -> list[str]:
        rows = browser.find_elements("css selector", "#bad-records [role=row].virtual-row")
        return [" ".join(r.text.split()) for r in rows]

    rows = wait_for(
        "three rows in the bad records' table", lambda: len(table()) == 3 and table(), 30, browser
    )
    for line, reason in ((2, "not valid JSON"), (3, "accepted roles"), (4, "no assistant turn")):
        assert any(f"{bad_file} line {line}" in row and reason in row for row in rows), (line, rows)

    # An uploaded file in another format, detected (the demo's recipe says messages).
    choose(browser, "field-data-format", "auto")
    alpaca = server.work / "alpaca.jsonl"
    alpaca.write_text(
        "".join(
            json.dumps({"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)}) + "\n"
            for i in range(3)
        )
    )
    browser.find_element("css selector", "#data-upload input[type=file]").send_keys(str(alpaca))
    summary = wait_for(
        "the uploaded file's summary",
        lambda: "format alpaca" in text_of(browser, "data-summary") and text_of(browser, "data-summary"),
        60,
        browser,
    )
    assert "3 records -> 3 examples" in summary
    assert field(browser, "data-path").get_attribute("value").endswith("alpaca.jsonl")

    # Another model takes lorafit's recipe for pretrained models, as lorafit train would.
    pretrained = form_values("org/some-model")
    tab(browser, "Train")
    for model, values in (("org/some-model", pretrained), ("lorafit-demo", form_values("lorafit-demo"))):
        type_into(browser, "model", model)
        lr = str(values["training_config.learning_rate"])
        wait_for(
            f"{model}'s learning rate",
            lambda lr=lr: field(browser, "field-training_config-learning_rate").get_attribute("value") == lr,
            30,
            browser,
        )
    assert requests_off_this_machine(browser) == []


def form_values(model: str) -> dict:
    from lorafit.ui.form import base_config, field_values

    return field_values(base_config(model))


def test_train_watch_close_stop_resume_chat_merge(server, browser, tmp_path) -> None:
    open_page(browser, server.url)
    use_demo_data(browser)
    tab(browser, "Train")
    choose(browser, "field-model-torch_dtype", "float32")
    type_into(browser, "field-training_config-per_device_train_batch_size", "1")
    type_into(browser, "extra", RUN_SETTINGS)
    run = field(browser, "run-name").get_attribute("value")

    # The YAML shown is the config that runs; it parses back to the settings typed.
    def shown_config() -> dict | None:
        text = browser.execute_script(
            "return Array.from(document.querySelectorAll('#run-yaml .cm-line'))"
            ".map(l => l.textContent).join('\\n')"
        )
        cfg = yaml.safe_load(text) if text and not text.startswith("#") else None
        ok = (
            cfg
            and cfg["training_config"].get("max_steps") == STEPS
            and cfg["model"]["torch_dtype"] == "float32"
        )
        return cfg if ok and cfg["training_config"].get("per_device_train_batch_size") == 1 else None

    cfg = wait_for("the YAML to show the settings", shown_config, 30, browser)
    assert cfg["training_config"]["output_dir"] == str(server.runs / run)
    assert cfg["data"]["max_length"] == 256 and cfg["data"]["train"].endswith("chat_train.jsonl")

    browser.find_element("id", "start").click()
    wait_for("the run to start", lambda: f"started {run}" in text_of(browser, "run-note"), 30, browser)
    train_points = lambda: [p for p in chart_points(browser) if p[2] == "train"]  # noqa: E731
    pid = json.loads((server.runs / ".lorafit-ui" / run / "process.json").read_text())["pid"]
    pause_at, resumed_pause_at = server.pause_at_steps
    wait_for(f"the run to pause after step {pause_at}", lambda: paused(pid), 240, browser)
    # Paused after step 2: the run is certainly mid-way when Stop arrives. (The chart is checked
    # once more points are in: below, after the resume, and all of them at the end.)
    assert len(read_metrics(server.runs / run / "metrics.jsonl")) >= pause_at

    browser.find_element("id", "stop").click()
    wait_for("Stop to be sent", lambda: f"asked {run} to stop" in text_of(browser, "run-note"), 30, browser)
    os.kill(pid, signal.SIGCONT)  # the run goes on with Stop's SIGINT pending: it ends this step
    wait_for("the run to stop", lambda: "stopped" in text_of(browser, "run-status"), 120, browser)
    run_dir = server.runs / run
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1, "Stop saved a checkpoint"
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert stopped_at == pause_at + 1  # the step Stop arrived in
    state = json.loads((server.runs / ".lorafit-ui" / run / "process.json").read_text())
    assert state["returncode"] == 130, "lorafit train ended as Ctrl-C ends it"
    assert not (run_dir / "adapter_model.safetensors").exists()

    # Resume, then close the tab at once and open the page again: the run goes on (its own
    # process), and the new page finds it and follows it to the end.
    browser.find_element("id", "resume").click()
    wait_for("the run to resume", lambda: f"resuming {run}" in text_of(browser, "run-note"), 30, browser)
    old = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.switch_to.window(old)
    browser.close()
    browser.switch_to.window(browser.window_handles[0])
    open_page(browser, server.url)
    tab(browser, "Train")
    status = wait_for(
        "the reopened page to show the run",
        lambda: run in text_of(browser, "run-status") and text_of(browser, "run-status"),
        30,
        browser,
    )
    assert f"{run}: starting" in status or f"{run}: running" in status, status
    pid = json.loads((server.runs / ".lorafit-ui" / run / "process.json").read_text())["pid"]
    wait_for(f"the resumed run to pause after step {resumed_pause_at}", lambda: paused(pid), 240, browser)
    os.kill(pid, signal.SIGCONT)
    wait_for("the chart to go on", lambda: len(train_points()) > stopped_at, 240, browser)
    wait_for("the resumed run to finish", lambda: "finished" in text_of(browser, "run-status"), 300, browser)
    points = wait_for(
        f"all {STEPS} steps on the chart",
        lambda: (p := chart_points(browser)) and max(s for s, _, k in p if k == "train") == STEPS and p,
        30,
        browser,
    )
    assert {s for s, _, k in points if k == "train"} == set(range(1, STEPS + 1))
    assert {s for s, _, k in points if k == "eval"} == {STEPS // 2, STEPS}
    legend = {t.text for t in browser.find_elements("css selector", "#loss-chart .role-legend-label text")}
    assert legend == {"train", "eval"}, "both curves are drawn"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1)), "resumed where it stopped"
    assert "tokens/s" in text_of(browser, "run-status")
    wait_for("the before/after samples", lambda: "after" in text_of(browser, "samples"), 30, browser)
    assert (run_dir / "adapter_model.safetensors").is_file()
    screenshot(browser, tmp_path / "ui-train.png")

    _chat(browser, server, run, tmp_path)
    _merge(browser, server, run, tmp_path)
    assert requests_off_this_machine(browser) == []


def _chat(browser: Any, server: Any, run: str, tmp_path: Path) -> None:
    """Chat with the run beside its base model; the answers are lorafit's own for both models."""
    from lorafit.inference import generate
    from lorafit.models import load_model, load_trained
    from lorafit.models.load import decide_precision

    tab(browser, "Chat")
    choose(browser, "chat-run", run)
    browser.find_element("id", "chat-load").click()
    wait_for(
        "the models to load", lambda: "loaded the adapter" in text_of(browser, "chat-note"), 120, browser
    )
    type_into(browser, "chat-max-new", "32")  # the demo model rambles to the limit: keep it short
    type_into(browser, "chat-message", "Tell me the capital of New Zealand.")
    browser.find_element("id", "chat-send").click()

    cfg, tokenizer, adapter = load_trained(server.runs / run)
    base = load_model(cfg.model, tokenizer, decide_precision(cfg.model, cfg.training_config)).eval()
    messages = [{"role": "user", "content": "Tell me the capital of New Zealand."}]
    expected = {
        side: " ".join(generate(m, tokenizer, messages, max_new_tokens=32).split())
        for side, m in (("adapter", adapter), ("base", base))
    }

    def answer(side: str) -> str:
        bubbles = browser.find_elements("css selector", f"#chat-{side} [data-testid='bot']")
        return " ".join(bubbles[-1].text.split()) if bubbles else ""

    for side in ("adapter", "base"):
        wait_for(f"the {side} model's answer", lambda s=side: answer(s) == expected[s], 120, browser)
    assert expected["adapter"] != expected["base"], "the adapter changed the answer"
    screenshot(browser, tmp_path / "ui-chat.png")


def _merge(browser: Any, server: Any, run: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tab(browser, "Export")
    choose(browser, "export-run", run)
    browser.find_element("id", "export-merge").click()
    wait_for(
        "the merged model", lambda: "merged model saved" in text_of(browser, "export-result"), 120, browser
    )
    merged = server.runs / run / "merged"
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())
    type_into(browser, "export-folder", "gguf")
    browser.find_element("id", "export-gguf").click()
    wait_for("the GGUF file", lambda: "ollama create" in text_of(browser, "export-result"), 120, browser)
    assert (server.runs / run / "gguf" / "model-f16.gguf").stat().st_size > 0
    assert (server.runs / run / "gguf" / "Modelfile").is_file()
    screenshot(browser, tmp_path / "ui-export.png")


# Preference pairs for the dpo case: strings, and one conversational pair with a system turn.
PAIRS = [
    {"prompt": f"What is {i} plus one?", "chosen": f"It is {i + 1}.", "rejected": f"Maybe {i + 5}, or not."}
    for i in range(5)
] + [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
        "chosen": [{"role": "assistant", "content": "Hi."}],
        "rejected": [{"role": "assistant", "content": "I will not say anything."}],
    }
]


def click(driver: Any, elem_id: str) -> None:
    """Click the button once it is shown and enabled (a busy page renders it late)."""
    button = wait_for(
        f"#{elem_id} to be clickable",
        lambda: (b := driver.find_element("id", elem_id)).is_displayed() and b.is_enabled() and b,
        30,
        driver,
    )
    button.click()


def side_tokens(driver: Any, side: str, kind: str) -> list[str]:
    return [
        t.get_attribute("textContent")
        for t in driver.find_elements("css selector", f"#mask .lf-side-{side} .lf-{kind}")
    ]


def test_preference_pair_view_and_a_dpo_run(server, browser, tmp_path) -> None:
    """A preference file in the Data tab: its format, the pair side by side with the trained answer
    tokens highlighted (lorafit's training rows), then dpo picked in the Train tab and a 2-step
    run that finishes with method: dpo and TRL's reward metrics."""
    from lorafit.data.preference import to_preference, tokenize_preference
    from lorafit.data.read import Record
    from lorafit.models import load_tokenizer
    from lorafit.ui.form import base_config

    pairs = server.work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    open_page(browser, server.url)
    tab(browser, "Data")
    type_into(browser, "data-path", str(pairs))
    click(browser, "inspect")
    summary = wait_for(
        "the preference file's summary",
        lambda: "format preference" in (t := text_of(browser, "data-summary")) and t,
        120,
        browser,
    )
    assert "(method dpo)" in summary and "6 records -> 6 pairs" in summary
    assert "pick dpo, orpo or simpo as the Method" in summary, "the page still says sft"

    sides = wait_for(
        "the pair side by side",
        lambda: len(s := browser.find_elements("css selector", "#mask .lf-side")) == 2 and s,
        30,
    )
    chosen, rejected = (side.rect for side in sides)
    assert abs(chosen["y"] - rejected["y"]) < 2 and chosen["x"] + chosen["width"] <= rejected["x"] + 1
    assert browser.find_elements("css selector", "#mask .lf-prompt .lf-context")
    assert not browser.find_elements("css selector", "#mask .lf-prompt .lf-trained"), "the prompt is greyed"
    cfg = base_config("lorafit-demo")
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    record = to_preference(Record(PAIRS[0], "x"), "dpo")
    rows, _ = tokenize_preference(tokenizer, record, max_length=10_000)
    for side in ("chosen", "rejected"):
        trained = side_tokens(browser, side, "trained")
        assert len(trained) == sum(label != -100 for label in rows[f"{side}_labels"])
        assert "".join(trained).startswith(PAIRS[0][side])
        assert PAIRS[0]["prompt"] not in "".join(side_tokens(browser, side, "context"))
    colours = {
        kind: browser.find_element("css selector", f"#mask .lf-side .lf-{kind}").value_of_css_property(
            "background-color"
        )
        for kind in ("trained", "context")
    }
    assert colours["trained"] not in ("rgba(0, 0, 0, 0)", "transparent", colours["context"]), colours
    screenshot(browser, tmp_path / "ui-pairs.png")

    tab(browser, "Train")
    choose(browser, "method", "dpo")
    # dpo starts from the preference recipe, as lorafit train --method dpo: wait for its settings
    # to land before changing any, and for dpo's own keys to show
    wait_for(
        "the preference recipe's learning rate",
        lambda: float(field(browser, "field-training_config-learning_rate").get_attribute("value")) == 5e-6,
        30,
        browser,
    )
    for key in ("beta", "loss_type"):
        wait_for(
            f"dpo's {key}", lambda k=key: field(browser, f"field-training_config-{k}").is_displayed(), 30
        )
    hidden = browser.find_elements("id", "field-training_config-simpo_gamma")  # simpo's: not shown
    assert not any(e.is_displayed() for e in hidden)
    choose(browser, "field-model-torch_dtype", "float32")
    type_into(browser, "field-training_config-max_steps", "2")
    type_into(browser, "field-training_config-per_device_train_batch_size", "2")
    type_into(browser, "field-training_config-gradient_accumulation_steps", "1")
    type_into(browser, "extra", "--training_config.logging_steps 1 --data.eval_prompts 0")
    run = field(browser, "run-name").get_attribute("value")

    def shown_config() -> dict | None:
        text = browser.execute_script(
            "return Array.from(document.querySelectorAll('#run-yaml .cm-line'))"
            ".map(l => l.textContent).join('\\n')"
        )
        shown = yaml.safe_load(text) if text and not text.startswith("#") else None
        t = (shown or {}).get("training_config", {})
        done = shown and shown["method"] == "dpo" and t.get("max_steps") == 2 and t.get("logging_steps") == 1
        return shown if done and t.get("gradient_accumulation_steps") == 1 else None

    shown = wait_for("the YAML to show the dpo settings", shown_config, 30, browser)
    assert shown["training_config"]["beta"] == 0.1 and shown["model"]["torch_dtype"] == "float32"
    click(browser, "start")
    wait_for("the run to start", lambda: f"started {run}" in text_of(browser, "run-note"), 30, browser)
    pid = json.loads((server.runs / ".lorafit-ui" / run / "process.json").read_text())["pid"]

    def finished() -> bool:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # the process has ended
            if paused(pid):  # conftest's runs pause after step 2 until let go
                os.kill(pid, signal.SIGCONT)
        return "finished" in text_of(browser, "run-status")

    wait_for("the dpo run to finish", finished, 300, browser)
    run_dir = server.runs / run
    assert yaml.safe_load((run_dir / RUN_CONFIG_NAME).read_text())["method"] == "dpo"
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all("rewards/accuracies" in r and "rewards/margins" in r for r in rows if "loss" in r)
    last = [r for r in rows if "rewards/accuracies" in r][-1]
    status = wait_for(
        "the rewards in the run's status",
        lambda: "reward accuracy" in (t := text_of(browser, "run-status")) and t,
        30,
        browser,
    )
    assert f"reward accuracy {last['rewards/accuracies']:.2f}" in status
    wait_for(
        "the rewards chart",
        lambda: browser.find_elements("css selector", "#rewards-chart path[aria-roledescription='point']"),
        30,
        browser,
    )
    screenshot(browser, tmp_path / "ui-dpo.png")
    assert requests_off_this_machine(browser) == []


def test_the_page_was_served_with_the_network_closed(server) -> None:
    """The tests above ran with no route off this machine, when the kernel allowed it."""
    import socket

    if not server.offline:
        pytest.skip(
            "no network namespace here (needs Linux and CAP_SYS_ADMIN); the page ran with the "
            "network open, and only the request log showed it stayed local"
        )
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("1.1.1.1", 80))
