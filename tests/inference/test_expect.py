"""Held-out answers judged right or wrong by the fact they must name (``expect``)."""

from __future__ import annotations

import json

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
