"""Generation metrics: exact match and contains after normalisation, ROUGE-L from rouge-score."""

from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer

from lorafit.inference.metrics import eval_conversations, normalise, score_answer, score_answers


def test_normalise_drops_case_punctuation_and_spacing() -> None:
    assert normalise("  The Zephyrine  Falls, in Oskaland! ") == "the zephyrine falls in oskaland"


@pytest.mark.parametrize(
    ("answer", "reference", "exact", "contains"),
    [
        ("Paris.", "paris", 1.0, 1.0),
        ("The capital is Paris, of course.", "Paris", 0.0, 1.0),
        ("Parisian food is good.", "Paris", 0.0, 0.0),  # a word, not a substring of a word
        ("I do not know.", "Paris", 0.0, 0.0),
    ],
)
def test_exact_match_and_contains(answer, reference, exact, contains) -> None:
    scores = score_answer(answer, reference)
    assert (scores["exact_match"], scores["contains"]) == (exact, contains)


def test_rouge_l_is_rouge_scores_f1_and_the_summary_is_the_mean() -> None:
    answers = ["the cat sat on the mat", "a dog ran", "nothing alike"]
    references = ["the cat is on the mat", "a dog ran", "completely different words"]
    summary, rows = score_answers(answers, references)
    reference = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for row, a, r in zip(rows, answers, references, strict=True):
        assert row["rouge_l"] == pytest.approx(reference.score(r, a)["rougeL"].fmeasure)
    assert rows[1]["rouge_l"] == 1.0 and rows[2]["rouge_l"] == 0.0
    assert summary["rouge_l"] == pytest.approx(sum(r["rouge_l"] for r in rows) / 3)
    assert summary["exact_match"] == pytest.approx(1 / 3)


def test_eval_conversations_end_at_the_last_assistant_turn(tmp_path) -> None:
    path = tmp_path / "eval.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{bad json\n", encoding="utf-8")
    conversations = eval_conversations(path, "messages")
    assert [c.messages[-1]["content"] for c in conversations] == ["a0", "a1", "a2"]
    assert len(eval_conversations(path, "messages", limit=2)) == 2
    assert eval_conversations(path, "text") == []
