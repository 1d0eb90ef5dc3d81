"""What a preference file will train, before training: ``lorafit data`` on TRL's preference
formats (pairs for dpo, orpo and simpo; KTO's unpaired records).

``analyse_preference`` runs the tokenisation ``lorafit train --method M`` runs
(:func:`lorafit.data.preference.to_preference` and :func:`~lorafit.data.preference.tokenize_preference`)
on every record, collecting every bad record (file, line, field) instead of stopping at the
first, and counts what ``max_length`` does to each side: a sequence (prompt + one answer)
longer than it is truncated as TRL truncates (``truncation_mode``) or its pair dropped
(``overlong: drop``, or a prompt that alone fills ``max_length`` under ``keep_start``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.constants import IGNORE_INDEX
from lorafit.data.preference import (
    check_truncation_mode,
    encode_sequence,
    preference_format,
    to_preference,
    tokenize_preference,
)
from lorafit.data.read import BadRecord, Record, _read_items
from lorafit.data.report import Example, Finding, histogram, render_example
from lorafit.errors import LorafitError


@dataclass
class PreferenceExample:
    """One record as tokenised, untruncated: each answer's sequence (prompt + answer) with its
    labels, the prompt's length, and whether training keeps it (and truncates it)."""

    where: str
    sequences: dict[str, Example]  # "chosen" and "rejected", or KTO's "completion"
    prompt_length: int
    status: str  # "ok", "truncated" or "too_long" (dropped), as tokenize_preference says
    label: bool | None = None  # KTO: desirable or not


@dataclass
class PreferenceReport:
    """Counts over the whole file, the bad records, and the examples for display."""

    source: str
    format: str | None
    method: str
    max_length: int
    truncation_mode: str
    overlong: str
    records: int
    examples: list[PreferenceExample]
    findings: list[Finding]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]


def file_preference_format(source: str | Path) -> str | None:
    """The preference format of the first readable record of ``source`` (None: not preference data)."""
    for item in _read_items(source):
        if isinstance(item, Record):
            return preference_format(item.data)
    return None


def is_preference_file(source: str | Path) -> bool:
    """Whether the first readable record of ``source`` has a preference format's fields."""
    return file_preference_format(source) is not None


def analyse_preference(
    tokenizer: Any,
    source: str | Path,
    *,
    method: str | None = None,
    max_length: int = 1024,
    truncation_mode: str = "keep_start",
    overlong: str = "truncate",
) -> PreferenceReport:
    """Tokenise every record of ``source`` as a ``method`` run would (``None``: ``kto`` for
    unpaired records, else ``dpo``; dpo, orpo and simpo tokenise alike) and count the result."""
    check_truncation_mode(truncation_mode)
    items = _read_items(source)
    if method is None:
        first = next((i for i in items if isinstance(i, Record)), None)
        unpaired = first is not None and preference_format(first.data) == "unpaired_preference"
        method = "kto" if unpaired else "dpo"
    findings: list[Finding] = []
    examples: list[PreferenceExample] = []
    fmt = None
    for item in items:
        if isinstance(item, BadRecord):
            findings.append(Finding("error", "bad record", item.where, item.reason))
            continue
        try:
            record = to_preference(item, method)
            _, status = tokenize_preference(
                tokenizer,
                record,
                max_length=max_length,
                truncation_mode=truncation_mode,
                overlong=overlong,
                where=item.where,
            )
            answers = {"chosen": record.chosen, "rejected": record.rejected}
            if record.rejected is None:
                answers = {"completion": record.chosen}
            sequences, prompt_length = {}, 0
            for name, answer in answers.items():
                ids, labels, prompt_length = encode_sequence(
                    tokenizer, record.prompt, answer, record.text, item.where
                )
                sequences[name] = Example(item.where, ids, labels, [])
        except LorafitError as e:
            findings.append(
                Finding("error", "bad record", item.where, str(e).removeprefix(f"{item.where}: "))
            )
            continue
        fmt = fmt or preference_format(item.data)
        examples.append(PreferenceExample(item.where, sequences, prompt_length, status, record.label))
    report = PreferenceReport(
        str(source), fmt, method, max_length, truncation_mode, overlong, len(items), examples, findings
    )
    report.stats = _stats(report)
    return report


def _kept_labels(example: Example, max_length: int, mode: str) -> int:
    """Answer tokens left after truncating the sequence to ``max_length`` in ``mode``."""
    labels = example.labels[:max_length] if mode == "keep_start" else example.labels[-max_length:]
    return sum(1 for label in labels if label != IGNORE_INDEX)


def _stats(report: PreferenceReport) -> dict[str, Any]:
    kept = [e for e in report.examples if e.status != "too_long"]
    names = list(kept[0].sequences) if kept else list(report.examples[0].sequences) if report.examples else []
    answer_all = answer_kept = 0
    per_side: dict[str, dict[str, Any]] = {}
    for name in names:
        lengths = [len(e.sequences[name].ids) for e in report.examples]
        answers = [sum(1 for x in e.sequences[name].labels if x != IGNORE_INDEX) for e in report.examples]
        per_side[name] = {
            "answer_tokens": answers,
            "sequence_tokens": lengths,
            "truncated": sum(1 for e in kept if len(e.sequences[name].ids) > report.max_length),
        }
        answer_all += sum(sum(1 for x in e.sequences[name].labels if x != IGNORE_INDEX) for e in kept)
        answer_kept += sum(
            _kept_labels(e.sequences[name], report.max_length, report.truncation_mode) for e in kept
        )
    return {
        "examples": len(kept),
        "tokens": sum(min(len(s.ids), report.max_length) for e in kept for s in e.sequences.values()),
        "prompt_tokens": [e.prompt_length for e in report.examples],
        "sides": per_side,
        "truncated": sum(1 for e in kept if e.status == "truncated"),
        "dropped": len(report.examples) - len(kept),
        "bad": len(report.errors),
        "answer_lost": answer_all - answer_kept,
        "answer_all": answer_all,
        "desirable": sum(1 for e in kept if e.label is True),
        "undesirable": sum(1 for e in kept if e.label is False),
    }


def _spread(values: list[int]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"min {ordered[0]}, median {ordered[len(ordered) // 2]}, max {ordered[-1]}"


def print_preference_report(
    report: PreferenceReport,
    tokenizer: Any,
    *,
    show: int = 2,
    colour: bool = False,
    echo: Callable[[str], Any] = print,
    max_findings: int = 10,
) -> None:
    """Print the report: counts, lengths per side, what ``max_length`` costs, the first ``show``
    records with each answer's scored tokens marked (the prompt plain), then the bad records."""
    s = report.stats
    unit = "records" if report.method == "kto" else "pairs"
    echo(f"data: {report.source}")
    echo(
        f"format: {report.format or '-'} (method {report.method})   records: {report.records:,}   "
        f"{unit}: {s['examples']:,}"
        + (f" ({s['desirable']} desirable, {s['undesirable']} undesirable)" if report.method == "kto" else "")
    )
    echo(f"tokens: {s['tokens']:,} (prompt + answer, each answer's sequence)")
    echo(f"prompt tokens: {_spread(s['prompt_tokens'])}")
    for name, side in s["sides"].items():
        echo(f"{name} answer tokens: {_spread(side['answer_tokens'])}")
    cut = ", ".join(f"{name} {side['truncated']}" for name, side in s["sides"].items())
    lost = 100 * s["answer_lost"] / max(s["answer_all"], 1)
    echo(
        f"max_length {report.max_length} ({report.truncation_mode}): sequences truncated: {cut or '-'}   "
        f"{unit} dropped: {s['dropped']}"
        + (
            " (overlong: drop)"
            if report.overlong == "drop"
            else " (prompt fills max_length)"
            if s["dropped"]
            else ""
        )
        + f"   answer tokens lost: {s['answer_lost']:,} ({lost:.1f}%)   bad records: {s['bad']}"
    )
    lengths = [n for side in s["sides"].values() for n in side["sequence_tokens"]]
    if lengths:
        echo("\ntokens per sequence (prompt + answer):")
        for line in histogram(lengths, report.max_length):
            echo(line)
    limit = report.max_length if report.truncation_mode == "keep_start" else 10**9  # keep_end cuts the start
    marks = "green" if colour else "[[ ]]"
    for example in report.examples[:show]:
        for name, sequence in example.sequences.items():
            label = "" if example.label is None else f", {'desirable' if example.label else 'undesirable'}"
            echo(f"\n--- {example.where} {name}{label} (answer tokens in {marks}) ---")
            echo(render_example(tokenizer, sequence, limit, colour))
    if report.errors:
        echo(f"\nerror: bad record ({len(report.errors)} record{'s' if len(report.errors) != 1 else ''})")
        for finding in report.errors[:max_findings]:
            echo(f"  {finding.where}: {finding.message}")
        if len(report.errors) > max_findings:
            echo(f"  ... and {len(report.errors) - max_findings} more")
        echo(
            f"\n{len(report.errors)} error(s): lorafit train stops at the first; --skip-bad-records trains "
            "on the rest and lists them in skipped_records.jsonl"
        )
    else:
        echo("\nno problems found")
