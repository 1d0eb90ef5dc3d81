"""lorafit.data.report and ``lorafit data``: counts, what is lost, and the checks that fail loudly."""

from __future__ import annotations

import copy

import pytest

from lorafit.cli import main
from lorafit.data.report import analyse, histogram, render_example

from chat_data import TOOL_CHAT, TOOLS, labelled_runs, with_template, write_jsonl
from real_models import requires_smollm2

GOOD = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
]
LONG = [
    {"role": "user", "content": "Summarize: cats sleep a lot and dogs like to play outside in the sun."},
    {"role": "assistant", "content": "Cats sleep and dogs play outside in the sun. " * 6},
]


def kinds(report) -> list[tuple[str, str, str]]:
    return [(f.level, f.kind, f.where.rsplit(" ", 1)[-1]) for f in report.findings]


def test_report_counts_truncation_duplicates_and_untrained_records(tmp_path, chatml_tokenizer):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"messages": GOOD},
            {"messages": GOOD},  # line 2: a duplicate of line 1
            {"messages": [GOOD[0], {**GOOD[1], "train": False}]},  # line 3: nothing trained
            {"messages": LONG},  # line 4: its answer is cut
            {"messages": [{"role": "user", "content": "hi"}]},  # line 5: a bad record
        ],
    )
    report = analyse(chatml_tokenizer, path, max_length=64)
    assert sorted(kinds(report)) == sorted(
        [
            ("error", "bad record", "5"),
            ("error", "turn cut by max_length", "4"),
            ("warning", "duplicate", "2"),
            ("warning", "nothing trained", "3"),
        ]
    )
    assert [f.level for f in report.findings][:2] == ["error", "error"]  # errors first
    s = report.stats
    assert (report.records, s["examples"], s["truncated"], s["dropped"], s["not_read"]) == (5, 3, 1, 1, 1)
    assert 0 < s["trained_lost"] < s["trained_all"] and s["tokens"] <= 3 * 64
    cut = report.findings[[f.kind for f in report.findings].index("turn cut by max_length")]
    assert (
        f"{s['trained_lost']} trained tokens lost" in cut.message and "Raise data.max_length" in cut.message
    )


def test_a_template_that_ends_turns_without_a_stop_token_fails(tmp_path, chatml_tokenizer):
    # turns end with a newline: nothing the model learns tells generation to stop
    chatml_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    report = analyse(chatml_tokenizer, write_jsonl(tmp_path / "t.jsonl", [{"messages": GOOD}]))
    assert kinds(report) == [("error", "end of turn not trained", "1")]
    assert "does not learn to stop" in report.findings[0].message
    assert (
        chatml_tokenizer.decode(
            [t for t, lab in zip(report.examples[0].ids, report.examples[0].labels, strict=True) if lab >= 0]
        )
        == " Two plus two is four."  # the piece holding the prompt's last space counts, as "▁Two" does
    )


def test_prompt_mismatch_and_unrendered_tools_are_errors_per_record(tmp_path, make_tokenizer):
    tokenizer = with_template(make_tokenizer("chatml"), "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja")
    rows = [
        {"messages": GOOD, "tools": TOOLS},  # Hermes's tool template renders nothing without tools
        {"messages": TOOL_CHAT, "tools": TOOLS},
        {"messages": TOOL_CHAT[:3], "tools": TOOLS},
    ]
    report = analyse(tokenizer, write_jsonl(tmp_path / "t.jsonl", rows))
    assert kinds(report) == [("error", "generation-prompt mismatch", "2")]
    assert report.stats["examples"] == 2
    phi = with_template(make_tokenizer("phi3"), "microsoft-Phi-3.5-mini-instruct.jinja")
    report = analyse(phi, write_jsonl(tmp_path / "p.jsonl", rows))
    assert kinds(report) == [("error", "tools not rendered", str(line)) for line in (1, 2, 3)]


def test_rendering_marks_trained_tokens_and_the_cut(tmp_path, chatml_tokenizer):
    report = analyse(chatml_tokenizer, write_jsonl(tmp_path / "t.jsonl", [{"messages": GOOD}]))
    example = report.examples[0]
    cut = next(i for i, label in enumerate(example.labels) if label >= 0) + 2  # inside the answer
    text = render_example(chatml_tokenizer, example, cut, colour=False)
    assert text.startswith("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n[[")
    assert "]] ✂ max_length ✂ [[" in text and text.endswith("<|im_end|>]]\n")
    coloured = render_example(chatml_tokenizer, report.examples[0], 4096, colour=True)
    assert "\x1b[1;32mTwo plus two is four.<|im_end|>\x1b[0m" in coloured


def test_histogram_has_a_bin_for_lengths_over_max_length():
    lines = histogram([1, 5, 9, 30, 31], 10, width=4, bins=2)
    assert [line.split()[-1] for line in lines] == ["1", "2", "2"]  # [0, 5), [5, 10], over 10
    assert lines[-1].lstrip().startswith("> 10")


@pytest.mark.parametrize(("rows", "code"), [([{"messages": GOOD}] * 2, 0), ([{"messages": TOOL_CHAT}], 1)])
def test_cli_data_prints_the_report_and_exits_non_zero_on_errors(tmp_path, capsys, rows, code):
    # the demo model's Phi-3 template renders no tool calls: refused, exit 1
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert main(["data", path, "--max-length", "256", "--data.train_on", "last"]) == code
    out = capsys.readouterr().out
    assert "format: messages" in out
    if code == 0:
        assert "tokens per record:" in out and "[[Two plus two is four.<|end|>]]" in out
        assert "warning: duplicate (1 record)" in out
    else:
        assert "error: tools not rendered (1 record)" in out and "Ways out" in out


@requires_smollm2
def test_smollm2s_own_template_drops_tools_and_a_chatml_tool_template_trains_them(smollm2_session, tmp_path):
    # the real SmolLM2-135M-Instruct tokenizer: its template renders a calling turn as an empty
    # answer; Qwen2.5's, written in the same ChatML tokens, renders tools, calls and results
    tokenizer = copy.deepcopy(smollm2_session.tokenizer)
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": TOOL_CHAT, "tools": TOOLS}, {"messages": GOOD}])
    report = analyse(tokenizer, path)
    assert kinds(report) == [("error", "tools not rendered", "1")]
    with_template(tokenizer, "Qwen-Qwen2.5-7B-Instruct.jinja")
    report = analyse(tokenizer, path)
    assert report.findings == [] and report.stop_tokens == ["<|im_end|>"]
    tools_example = report.examples[0]
    assert [
        tokenizer.decode(run)
        for run in labelled_runs(dict(input_ids=tools_example.ids, labels=tools_example.labels))
    ] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18 C and sunny in Paris.<|im_end|>",
    ]


def test_the_tool_calling_example_trains_every_call_and_its_scorer_reads_calls(chatml_tokenizer):
    # examples/smollm2/tools, with the template its README uses, on a ChatML tokenizer
    import importlib.util
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "examples" / "smollm2" / "tools"
    tokenizer = with_template(chatml_tokenizer, "Qwen-Qwen2.5-7B-Instruct.jinja")
    tools = folder / "tools.json"
    for name, records in (("train.jsonl", 30), ("eval.jsonl", 12)):
        report = analyse(tokenizer, folder / name, max_length=4096, tools=tools)
        assert report.findings == [] and report.records == records == report.stats["examples"], name
    spec = importlib.util.spec_from_file_location("score_calls", folder / "score_calls.py")
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    names = {t["function"]["name"] for t in json.loads(tools.read_text())}
    for line in (folder / "eval.jsonl").read_text().splitlines():
        call = json.loads(line)["messages"][-1]
        want = score.expected_calls(call)
        assert len(want) == 1 and want[0]["name"] in names
        written = f"<tool_call>\n{json.dumps(want[0], indent=1)}\n</tool_call>"  # spacing does not matter
        assert score.parse_calls(written) == want
    assert score.parse_calls("It is 18 C.") is None
    assert score.parse_calls('<tool_call>{"name": "get_tide_times", "arguments": {}</tool_call>') is None
