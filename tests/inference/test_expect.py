"""Held-out answers judged right or wrong by the fact they must name (``expect``)."""

from __future__ import annotations

import json

import pytest

from lorafit.inference.expect import expectations, held_out_report, is_right


def test_is_right_ignores_case_punctuation_and_takes_alternatives():
    assert is_right("About 2,870 people live there.", "2,870|2870")
    assert is_right("about 2870 people", "2,870|2870")
    assert is_right("The mayor is TOBIAH VENN!", "Tobiah Venn")
    assert not is_right("The mayor is Tobiah.", "Tobiah Venn")
    assert not is_right("It is 6120 metres high.", "612")  # a whole-word match, not a substring
    assert not is_right("anything", "")


def test_expectations_follow_eval_conversations(tmp_path):
    from lorafit.inference.metrics import eval_conversations

    path = tmp_path / "eval.jsonl"
    records = [
        {
            "messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
            "expect": "x",
        },
        {"messages": [{"role": "user", "content": "bad, no answer"}]},
        {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
        {
            "messages": [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"}],
            "expect": "z",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    conversations = eval_conversations(path, "messages", 3)
    assert [c.messages[0]["content"] for c in conversations] == ["Q1", "Q2", "Q3"]
    assert expectations(path, "messages", 3) == ["x", None, "z"]
    assert expectations(path, "messages", 0) == [] == expectations(path, "text", 3)


def test_report_counts_and_marks_each_answer():
    prompts = [
        [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "-"}] for i in range(3)
    ]
    report = held_out_report(prompts, ["no idea", "no", "x"], ["it is x", "y here", "x"], ["x", "y", None])
    lines = report.splitlines()
    assert lines[0] == "held-out questions answered right: before 0/2, after 2/2"
    assert (
        "Q0" in lines[1]
        and lines[2].split()[:2] == ["before:", "wrong"]
        and lines[3].split()[:2]
        == [
            "after:",
            "right",
        ]
    )
    assert "Q2" not in report  # no expect: not judged
    resumed = held_out_report(prompts, None, ["it is x", "no", "x"], ["x", "y", None])
    assert (
        resumed.splitlines()[0] == "held-out questions answered right: after 1/2" and "before" not in resumed
    )
    assert held_out_report(prompts, None, ["a", "b", "c"], [None, None, None]) == ""


@pytest.mark.parametrize("split", ["eval", "eval_fraction"])
def test_a_runs_eval_prompts_carry_data_tools_and_the_records_own(split, tmp_path):
    from lorafit.config import build_config
    from lorafit.training.run import sample_prompts

    from chat_data import TOOL_CHAT, TOOLS, write_jsonl

    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    rows = [{"messages": TOOL_CHAT[:3]}, {"messages": TOOL_CHAT, "tools": TOOLS}] * 2
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    data = {"train": train, "tools": [clock], "eval_prompts": 4}
    data |= (
        {"eval": write_jsonl(tmp_path / "eval.jsonl", rows)} if split == "eval" else {"eval_fraction": 0.5}
    )
    cfg = build_config({"model": {"name_or_path": "m"}, "data": data})
    prompts = sample_prompts(cfg, {"format": "messages", "eval": {"format": "messages"}}, seed=0)
    assert prompts and {c.messages[1]["content"] for c in prompts} == {"What is the weather in Paris?"}
    for conversation in prompts:
        own = conversation.messages[-1]["role"] == "assistant" and conversation.messages[-1].get("content")
        assert conversation.tools == (TOOLS if own else [clock])
