"""What a data file will train, before training: the report ``lorafit data`` prints.

``analyse`` runs the pipeline ``lorafit train`` runs (read -> formats -> template -> lengths),
on every record, collecting what a run would stop at instead of stopping, and checks what makes
a trained model misbehave. Errors (the command exits non-zero):

- a bad record (a run stops at the first unless ``skip_bad_records``), the template rejecting a
  conversation (roles in an order it refuses), or not rendering its tools;
- an assistant turn whose end-of-turn token, the token generation stops at, is not trained
  (the model would not learn to stop);
- a generation-prompt mismatch: the prompt chat, the UI and an exported model give the model
  before a turn is not the prefix training saw before it;
- an assistant turn cut by ``max_length`` (its end-of-turn token is lost with it).

Warnings: exact duplicate records, records in which nothing is trained, reasoning traces the
template does not render.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorafit.constants import IGNORE_INDEX
from lorafit.data.build import load_tools
from lorafit.data.formats import _convert_items, check_format_name
from lorafit.data.pack import pack
from lorafit.data.read import BadRecord, Record, _read_items
from lorafit.data.template import (
    PromptMismatch,
    TemplateCannotRender,
    TurnLabels,
    _encode_conversations,
    _encode_texts,
    check_length_settings,
    check_turn_settings,
    stop_ids_for,
)
from lorafit.errors import LorafitError

_CHUNK = 256


@dataclass
class Finding:
    """One thing to fix (``level="error"``) or to look at (``"warning"``), where it is, and why."""

    level: str
    kind: str
    where: str
    message: str


@dataclass
class Example:
    """One record as tokenised: its tokens and labels before truncation, and its trained turns."""

    where: str
    ids: list[int]
    labels: list[int]
    turns: list[TurnLabels]


@dataclass
class DataReport:
    """Counts over the whole file, the findings, and the examples (untruncated) for display."""

    source: str
    format: str
    max_length: int
    overlong: str
    records: int
    examples: list[Example]
    findings: list[Finding]
    stop_tokens: list[str]
    packed_rows: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]


def analyse(
    tokenizer: Any,
    source: str | Path,
    *,
    format: str = "auto",  # named after the config key
    max_length: int = 2048,
    assistant_only_loss: bool = True,
    overlong: str = "truncate",
    packing: bool = True,
    reasoning: str = "train",
    train_on: str = "all",
    tools: str | Path | list[dict] | None = None,
) -> DataReport:
    """Tokenise every record of ``source`` as ``build_datasets`` would (the same settings: see
    ``DataConfig.row_settings``) and check it; nothing stops at the first problem."""
    check_length_settings(max_length, overlong)
    check_format_name(format)
    check_turn_settings(reasoning, train_on)
    items = _read_items(source)
    fmt, converted, bad = _convert_items(items, format, True, load_tools(tools))
    findings = [Finding("error", "bad record", b.where, b.reason) for b in bad]
    findings += _duplicates([item for item in items if isinstance(item, Record)])
    stop_ids = stop_ids_for(tokenizer) if fmt != "text" else set()
    if fmt != "text" and assistant_only_loss and not stop_ids:
        findings.append(
            Finding(
                "error",
                "no stop token",
                "tokenizer",
                "the tokenizer has no eos token and its chat template ends an assistant turn with no "
                "special token, so nothing tells generation to stop; set tokenizer.chat_template to a "
                "template that ends turns with an end-of-turn token the tokenizer knows.",
            )
        )
    settings = {"assistant_only_loss": assistant_only_loss, "reasoning": reasoning, "train_on": train_on}
    examples: list[Example] = []
    for begin in range(0, len(converted), _CHUNK):
        chunk = converted[begin : begin + _CHUNK]
        for (record, _), result in zip(chunk, _encode_each(tokenizer, fmt, chunk, settings), strict=True):
            if isinstance(result, Finding):
                findings.append(result)
            else:
                examples.append(Example(record.where, *result))
    for example in examples:
        findings += _check_example(tokenizer, example, stop_ids, max_length, overlong, assistant_only_loss)
    order = {item.where: i for i, item in enumerate(items)}
    findings.sort(key=lambda f: (f.level != "error", order.get(f.where, -1)))
    report = DataReport(
        str(source),
        fmt,
        max_length,
        overlong,
        records=len(items),
        examples=examples,
        findings=findings,
        stop_tokens=[tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_ids)],
    )
    report.stats = _stats(report)
    if packing:
        kept = [min(len(e.ids), max_length) for e in examples if _kept(e, max_length, overlong)]
        report.packed_rows = len(pack(kept, max_length)) if kept else 0
    return report


_REFUSED = {
    PromptMismatch: "generation-prompt mismatch",
    TemplateCannotRender: "tools not rendered",
    LorafitError: "template rejects",
}
# the findings that keep a record out of training (as a bad record does)
_NOT_READ = ("bad record", *_REFUSED.values())


def _encode_each(tokenizer: Any, fmt: str, chunk: Sequence[tuple[Record, Any]], settings: dict) -> list:
    """``(ids, labels, turns)`` or a ``Finding`` per record: the chunk as one batch, then (when
    one fails) one record at a time."""
    if fmt == "text":
        return [(ids, labels, []) for ids, labels in _encode_texts(tokenizer, [t for _, t in chunk])]

    def encode(pairs: Sequence[tuple[Record, Any]]) -> list:
        return _encode_conversations(
            tokenizer,
            [c for _, c in pairs],
            [r.where for r, _ in pairs],
            settings["assistant_only_loss"],
            reasoning=settings["reasoning"],
            train_on=settings["train_on"],
            details=True,
        )

    try:
        return encode(chunk)
    except LorafitError:
        pass
    out: list = []
    for pair in chunk:
        try:
            out += encode([pair])
        except LorafitError as e:
            kind = next(name for cls, name in _REFUSED.items() if isinstance(e, cls))
            out.append(Finding("error", kind, pair[0].where, BadRecord.from_error(pair[0].where, e).reason))
    return out


def _duplicates(records: Sequence[Record]) -> list[Finding]:
    first: dict[str, str] = {}
    findings = []
    for record in records:
        key = hashlib.sha256(json.dumps(record.data, sort_keys=True, default=str).encode()).hexdigest()
        if key in first:
            findings.append(
                Finding(
                    "warning",
                    "duplicate",
                    record.where,
                    f"the same record as {first[key]}; it is trained twice (remove one to weigh it once).",
                )
            )
        else:
            first[key] = record.where
    return findings


def _kept(example: Example, max_length: int, overlong: str) -> bool:
    if len(example.ids) > max_length and overlong == "drop":
        return False
    return any(label != IGNORE_INDEX for label in example.labels[:max_length])


def _check_example(
    tokenizer: Any,
    example: Example,
    stop_ids: set[int],
    max_length: int,
    overlong: str,
    assistant_only_loss: bool,
) -> list[Finding]:
    where, findings = example.where, []
    if not any(label != IGNORE_INDEX for label in example.labels):
        findings.append(
            Finding(
                "warning",
                "nothing trained",
                where,
                "no assistant turn is trained (train: false, weight: 0 or data.train_on: last on every "
                "turn); the record is left out.",
            )
        )
        return findings
    stops = ", ".join(tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_ids)) or "none"
    for turn in example.turns:
        if not turn.stopped and stop_ids:
            last = tokenizer.convert_ids_to_tokens(example.ids[turn.end - 1])
            findings.append(
                Finding(
                    "error",
                    "end of turn not trained",
                    where,
                    f"assistant turn {turn.index} ends with {last!r}, not with a token generation stops at "
                    f"({stops}): a model trained on it does not learn to stop. Use a chat template that "
                    "ends assistant turns with the end-of-turn token (tokenizer.chat_template).",
                )
            )
        if turn.trace and not turn.trace_rendered:
            findings.append(
                Finding(
                    "warning",
                    "reasoning not rendered",
                    where,
                    f"the chat template does not render assistant turn {turn.index}'s reasoning trace (it "
                    "drops the reasoning of earlier turns, or all of it), so it is not trained; to train "
                    "every trace, split the conversation into one record per assistant turn.",
                )
            )
    if len(example.ids) > max_length:
        if overlong == "drop":
            findings.append(
                Finding(
                    "warning",
                    "dropped",
                    where,
                    f"{len(example.ids)} tokens, longer than max_length {max_length}: left out "
                    "(data.overlong: drop).",
                )
            )
        else:
            cut = [t.index for t in example.turns if t.end > max_length]
            lost = sum(1 for label in example.labels[max_length:] if label != IGNORE_INDEX)
            if cut or (lost and not assistant_only_loss):
                findings.append(
                    Finding(
                        "error",
                        "turn cut by max_length",
                        where,
                        f"{len(example.ids)} tokens: max_length {max_length} cuts assistant turn "
                        f"{cut[0] if cut else '(the text)'} before its end-of-turn token ({lost} trained "
                        "tokens lost"
                        + (
                            "; nothing trained is left: the record is left out"
                            if not _kept(example, max_length, overlong)
                            else ""
                        )
                        + "). Raise data.max_length, shorten the record, or set data.overlong: drop.",
                    )
                )
    return findings


def _stats(report: DataReport) -> dict[str, Any]:
    max_length, overlong = report.max_length, report.overlong
    kept = [e for e in report.examples if _kept(e, max_length, overlong)]
    trained = sum(sum(1 for label in e.labels[:max_length] if label != IGNORE_INDEX) for e in kept)
    all_trained = sum(sum(1 for label in e.labels if label != IGNORE_INDEX) for e in report.examples)
    return {
        "examples": len(kept),
        "tokens": sum(min(len(e.ids), max_length) for e in kept),
        "trained_tokens": trained,
        "truncated": sum(1 for e in kept if len(e.ids) > max_length),
        "dropped": len(report.examples) - len(kept),
        "not_read": sum(1 for f in report.findings if f.kind in _NOT_READ),
        "trained_lost": all_trained - trained,
        "trained_all": all_trained,
    }


# ---------------------------------------------------------------------------------------------
# printing


def histogram(lengths: Sequence[int], max_length: int, width: int = 40, bins: int = 10) -> list[str]:
    """A terminal bar chart of ``lengths`` in ``bins`` equal bins up to ``max_length`` (or up to the
    longest, when shorter), plus one bin for the lengths over ``max_length`` (cut or dropped)."""
    if not lengths:
        return []
    edges = np.linspace(0, min(max_length, max(lengths)), bins + 1)
    over = sum(1 for n in lengths if n > max_length)
    counts = list(np.histogram([n for n in lengths if n <= max_length], bins=edges)[0])
    rows = [
        (f"{int(a):>6}-{int(b):<6}", int(c)) for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)
    ]
    if over:
        rows.append((f"> {max_length:<11}", over))
    top = max(c for _, c in rows) or 1
    return [f"  {label} {'█' * max(1 if c else 0, round(width * c / top)):<{width}} {c}" for label, c in rows]


def render_example(tokenizer: Any, example: Example, max_length: int, colour: bool, limit: int = 2000) -> str:
    """The example's text with the trained tokens marked: green on a terminal, ``[[...]]`` when
    piped; ``✂`` where ``max_length`` cuts it. At most ``limit`` characters of untrained text
    in a row are shown (the middle elided)."""
    on, off = ("\x1b[1;32m", "\x1b[0m") if colour else ("[[", "]]")
    pieces, run, trained = [], [], None

    def flush() -> None:
        if not run:
            return
        text = tokenizer.decode(run)
        if not trained and len(text) > limit:
            text = f"{text[: limit // 2]} … {text[-limit // 2 :]}"
        pieces.append(f"{on}{text}{off}" if trained else (f"\x1b[2m{text}\x1b[0m" if colour else text))

    for position, (token, label) in enumerate(zip(example.ids, example.labels, strict=True)):
        if position == max_length:
            flush()
            run, trained = [], None
            pieces.append(" ✂ max_length ✂ ")
        is_trained = label != IGNORE_INDEX
        if is_trained != trained:
            flush()
            run, trained = [], is_trained
        run.append(token)
    flush()
    return "".join(pieces)


def _first_clause(message: str, longest: int = 160) -> str:
    if len(message) <= longest:
        return message
    cut = min((i for i in (message.find("; "), message.find(". ")) if i > 0), default=longest)
    return message[: min(cut, longest)] + " ..."


def print_report(
    report: DataReport,
    tokenizer: Any,
    *,
    show: int = 2,
    colour: bool = False,
    echo: Callable[[str], Any] = print,
    max_findings: int = 10,
) -> None:
    """Print the report: counts, lengths, what is lost, the first ``show`` examples with their
    trained tokens marked, then the errors and warnings (at most ``max_findings`` of each kind)."""
    s = report.stats
    echo(f"data: {report.source}")
    echo(f"format: {report.format}   records: {report.records:,}   examples: {s['examples']:,}")
    share = 100 * s["trained_tokens"] / max(s["tokens"], 1)
    echo(f"tokens: {s['tokens']:,}   trained tokens: {s['trained_tokens']:,} ({share:.1f}%)")
    if report.stop_tokens:
        echo(f"generation stops at: {', '.join(report.stop_tokens)}")
    if report.packed_rows is not None and s["examples"]:
        fill = 100 * s["tokens"] / max(report.packed_rows * report.max_length, 1)
        echo(f"packed: {report.packed_rows:,} rows of {report.max_length} tokens, {fill:.1f}% full")
    lost = 100 * s["trained_lost"] / max(s["trained_all"], 1)
    echo(
        f"truncated: {s['truncated']:,}   dropped: {s['dropped']:,}   not readable or refused: "
        f"{s['not_read']:,}   trained tokens lost to max_length {report.max_length}: "
        f"{s['trained_lost']:,} ({lost:.1f}%)"
    )
    lines = histogram([len(e.ids) for e in report.examples], report.max_length)
    if lines:
        echo("\ntokens per record:")
        for line in lines:
            echo(line)
    for example in report.examples[:show]:
        marks = "green" if colour else "[[ ]]"
        echo(f"\n--- {example.where} (trained tokens in {marks}) ---")
        echo(render_example(tokenizer, example, report.max_length, colour))
    for level, findings in (("error", report.errors), ("warning", report.warnings)):
        by_kind: dict[str, list[Finding]] = {}
        for finding in findings:
            by_kind.setdefault(finding.kind, []).append(finding)
        for kind, group in by_kind.items():
            echo(f"\n{level}: {kind} ({len(group)} record{'s' if len(group) != 1 else ''})")
            for i, finding in enumerate(group[:max_findings]):
                # the first in full, the others to their first clause: the advice is the same
                text = finding.message if i == 0 else _first_clause(finding.message)
                echo(f"  {finding.where}: {text}")
            if len(group) > max_findings:
                echo(f"  ... and {len(group) - max_findings} more")
    verdict = (
        f"\n{len(report.errors)} error(s), {len(report.warnings)} warning(s)"
        if report.findings
        else "\nno problems found"
    )
    echo(verdict)
