"""Right or wrong: held-out answers judged by the fact they must name.

An eval record may carry ``expect``: a short string that a right answer contains, or several
separated by ``|`` (``"2,870|2870"``), compared after :func:`lorafit.inference.metrics.normalise`
(case, punctuation and spacing ignored). The real-model demo's held-out questions carry one each;
a user's eval data may too. Where records have it, the end of a run prints each held-out question
with its answers before and after training, marked right or wrong.
"""

from __future__ import annotations

from pathlib import Path

from lorafit.data.formats import Conversation
from lorafit.data.template import messages_and_tools
from lorafit.inference.metrics import eval_records, last_question, normalise

EXPECT_KEY = "expect"


def expectations(source: str | Path, fmt: str, limit: int | None = None) -> list[str | None]:
    """The ``expect`` of each conversation that :func:`lorafit.inference.metrics.eval_conversations`
    returns for the same arguments (same records, same order; None where a record has none)."""
    values = (record.data.get(EXPECT_KEY) for record, _ in eval_records(source, fmt, limit))
    return [str(value) if value not in (None, "") else None for value in values]


def is_right(answer: str, expect: str) -> bool:
    """Whether ``answer`` names one of the ``|``-separated alternatives of ``expect``."""
    got = f" {normalise(answer)} "
    return any(f" {alt} " in got for alt in (normalise(a) for a in expect.split("|")) if alt)


def held_out_report(
    prompts: list[Conversation] | list[list[dict]],
    before: list[str] | None,
    after: list[str],
    expects: list[str | None],
    *,
    width: int = 72,
) -> str:
    """The held-out questions that carry an ``expect``, each with its answers before and after
    training marked ``right``/``wrong``, under a count of right answers; "" when none carries one.
    ``before`` is None for a resumed run (its first answers were given by an earlier process)."""
    rows = [i for i, e in enumerate(expects) if e]
    if not rows:
        return ""

    def mark(answer: str, expect: str) -> str:
        short = " ".join(answer.split())
        short = short if len(short) <= width else short[: width - 3] + "..."
        return f"{'right' if is_right(answer, expect) else 'wrong'}  {short}"

    def count(answers: list[str]) -> str:
        return f"{sum(is_right(answers[i], expects[i] or '') for i in rows)}/{len(rows)}"

    counts = ([f"before {count(before)}"] if before is not None else []) + [f"after {count(after)}"]
    lines = ["held-out questions answered right: " + ", ".join(counts)]
    for i in rows:
        expect = expects[i] or ""
        lines.append(f"  Q: {last_question(messages_and_tools(prompts[i])[0])}  (expect: {expect})")
        if before is not None:
            lines.append(f"     before: {mark(before[i], expect)}")
        lines.append(f"     after:  {mark(after[i], expect)}")
    return "\n".join(lines)
