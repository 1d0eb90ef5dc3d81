"""What the Data tab shows about a data file, computed by lorafit's own data pipeline.

``inspect_data`` runs ``build_datasets`` (the function ``lorafit train`` runs, cache included)
with ``skip_bad_records`` so that every record not trained on is listed with its file, line and
reason, exactly as ``skipped_records.jsonl`` words it, and the checks of ``lorafit data``
(``lorafit.data.report``: untrained end-of-turn tokens, generation-prompt mismatches, turns cut
by max_length, duplicates ...). ``example_tokens`` tokenises one record
with ``tokenize_conversation`` / ``tokenize_text`` and pairs every token with its text, so the
page can show the chat template with the trained tokens highlighted: the labels come from the
same function that makes the training labels, never from a second implementation.

Nothing here imports gradio; ``app.py`` lays these results out.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorafit.config import DataConfig
from lorafit.constants import IGNORE_INDEX
from lorafit.data import (
    Record,
    build_datasets,
    read_records,
    to_text,
    tokenize_conversation,
    tokenize_text,
)
from lorafit.data.build import load_tools
from lorafit.data.formats import to_conversation
from lorafit.data.preference import encode_sequence, to_preference, tokenize_preference
from lorafit.data.preference_report import PreferenceReport, _spread, analyse_preference, is_preference_file
from lorafit.data.report import analyse
from lorafit.data.template import render_text
from lorafit.errors import LorafitError

# A length no example reaches: the example view tokenises untruncated and marks the cut itself.
_UNLIMITED = 1 << 30
# Rows drawn in the packing view; the summary line counts all of them.
PACKING_ROWS_SHOWN = 8
HISTOGRAM_BINS = 16


@dataclass
class DataReport:
    """The Data tab's findings for one source under one set of data settings.

    ``lengths`` are the tokens of each example as trained (after truncation); ``rows`` the
    example indices of each packed row (None without packing); ``skipped`` holds
    ``(where, reason)`` for every record not trained on; ``records`` the readable records, for
    the example view.
    """

    source: str
    format: str
    settings: DataConfig
    stats: dict[str, Any]
    lengths: np.ndarray
    rows: list[list[int]] | None
    skipped: list[tuple[str, str]]
    records: list[Record] = field(repr=False)
    # ``lorafit data``'s checks: (where, "error: kind: what to do") for what would train badly
    findings: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One Markdown paragraph: format, counts, tokens, packing, what is not trained on."""
        s = self.stats
        parts = [
            f"**format** `{self.format}` · **{_n(s['records'], 'record')}** -> "
            f"{_n(s['examples'], 'example')}",
            f"{s['tokens']:,} tokens, {s['label_tokens']:,} trained "
            f"({100 * s['label_tokens'] / max(s['tokens'], 1):.1f}%)",
        ]
        if s.get("packed_rows"):
            parts.append(
                f"packed into {_n(s['packed_rows'], 'row')} of {self.settings.max_length} tokens, "
                f"{100 * s['packing_efficiency']:.1f}% full"
            )
        if s.get("truncated"):
            parts.append(f"{s['truncated']} truncated at max_length {self.settings.max_length}")
        if self.skipped:
            stop = (
                "skipped by the run (skip bad records is on)"
                if self.settings.skip_bad_records
                else "the run stops at the first of them unless skip bad records is on"
            )
            parts.append(f"**{len(self.skipped)} not trained on** ({stop})")
        errors = sum(1 for _, text in self.findings if text.startswith("error"))
        if errors:
            parts.append(f"**{errors} check{'s' if errors != 1 else ''} failed** (`lorafit data` exits 1)")
        if len(self.findings) > errors:
            parts.append(
                f"{len(self.findings) - errors} warning{'s' if len(self.findings) - errors != 1 else ''}"
            )
        return " · ".join(parts)


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def inspect_data(tokenizer: Any, settings: DataConfig) -> DataReport:
    """Read, check, tokenise and pack ``settings.train`` as ``lorafit train`` would.

    Unlike a run, every bad record is collected instead of stopping at the first one, so the
    page can list them all. Raises ``LorafitError`` when no source is given or when nothing is
    left to train on (the message names the file and the first bad record).
    """
    if not settings.train:
        raise LorafitError(
            "no data file chosen; type a path (.jsonl, .json, .csv, .parquet, a folder, or hf:NAME) "
            "or upload a file"
        )
    dataset, _, stats = build_datasets(
        tokenizer, train=settings.train, **settings.row_settings(), skip_bad_records=True, progress=False
    )
    examples = dataset.examples if settings.packing else dataset
    records = read_records(settings.train, bad=[])  # the unreadable ones are in stats["skipped"]
    # the checks lorafit data runs; its bad records are those in stats["skipped"] already
    checks = analyse(tokenizer, settings.train, **settings.row_settings())
    findings = [
        (f.where, f"{f.level}: {f.kind}: {f.message}") for f in checks.findings if f.kind != "bad record"
    ]
    return DataReport(
        source=str(settings.train),
        format=stats["format"],
        settings=settings,
        stats=stats,
        lengths=np.asarray(examples.lengths),
        rows=dataset.rows if settings.packing else None,
        skipped=[(row["where"], row["reason"]) for row in stats["skipped"]],
        records=records,
        findings=findings,
    )


def length_histogram(
    report: DataReport | PreferenceView, bins: int = HISTOGRAM_BINS
) -> list[tuple[str, int]]:
    """``(bin label, examples)`` over ``0..max_length`` tokens in ``bins`` equal bins (for
    preference data, sequences: prompt + one answer)."""
    top = report.settings.max_length
    counts, edges = np.histogram(report.lengths, bins=bins, range=(0, top))
    return [(f"{int(a)}-{int(b)}", int(n)) for a, b, n in zip(edges[:-1], edges[1:], counts, strict=True)]


def packing_html(report: DataReport | PreferenceView, rows_shown: int = PACKING_ROWS_SHOWN) -> str:
    """Some packed rows, spread over all of them, as bars: one segment per example, its width its
    share of the row, and the row's fill."""
    max_length = report.settings.max_length
    if isinstance(report, PreferenceView):
        return (
            "<p class='lf-note'>Preference data is not packed by data.packing: each batch's sequences "
            "(the chosen answers, then the rejected ones) go end to end in one row, attention kept "
            "within each, never padded.</p>"
        )
    if report.rows is None:
        return (
            "<p class='lf-note'>Packing is off: each example is its own row, padded to the longest "
            "example of its batch.</p>"
        )
    # Rows spread over all of them: best-fit-decreasing fills the first rows with the longest
    # examples, so the first few alone would not show how the short ones share rows.
    shown = sorted({round(k * (len(report.rows) - 1) / max(rows_shown - 1, 1)) for k in range(rows_shown)})
    lines = []
    for i in shown:
        row = report.rows[i]
        used = int(sum(report.lengths[j] for j in row))
        segments = "".join(
            f"<span class='lf-seg lf-seg{k % 2}' style='width:{100 * report.lengths[j] / max_length:.2f}%' "
            f"title='example {j + 1}: {report.lengths[j]} tokens'></span>"
            for k, j in enumerate(row)
        )
        lines.append(
            f"<div class='lf-row'><span class='lf-row-label'>row {i + 1}</span>"
            f"<span class='lf-bar'>{segments}</span>"
            f"<span class='lf-row-fill'>{len(row)} ex · {100 * used / max_length:.0f}%</span></div>"
        )
    tail = (
        f"<p class='lf-note'>{len(shown)} of {len(report.rows)} rows, spread over all of them</p>"
        if len(shown) < len(report.rows)
        else ""
    )
    return f"<div class='lf-packing'>{''.join(lines)}{tail}</div>"


@dataclass
class ExampleTokens:
    """One record as the model sees it: each token's text, whether it is a label, and the cut.

    ``kept`` is how many tokens train (the rest are cut by ``max_length``); ``dropped`` says
    the whole example is left out (``overlong: drop``, or no trained token left).
    """

    where: str
    pieces: list[tuple[str, bool]]
    kept: int
    dropped: bool
    error: str | None = None

    @property
    def trained(self) -> int:
        return sum(trained for _, trained in self.pieces[: self.kept]) if not self.dropped else 0


def example_tokens(tokenizer: Any, report: DataReport, index: int) -> ExampleTokens:
    """Tokenise record ``index`` (0-based, among the readable records) with the run's settings.

    A record that fails the format checks comes back with ``error`` set to the reason the run
    would give, and no tokens.
    """
    if not 0 <= index < len(report.records):
        raise LorafitError(f"example {index + 1}: expected 1..{len(report.records)}")
    record = report.records[index]
    settings = report.settings
    try:
        if report.format == "text":
            text = to_text(record)
            example = tokenize_text(tokenizer, text, max_length=_UNLIMITED)
            rendered, add_special = text, True
        else:
            conversation = to_conversation(record, report.format, load_tools(settings.tools))
            example = tokenize_conversation(
                tokenizer,
                conversation,
                max_length=_UNLIMITED,
                assistant_only_loss=settings.assistant_only_loss,
                where=record.where,
                reasoning=settings.reasoning,
                train_on=settings.train_on,
            )
            # the text lorafit's template module renders and encodes (token_texts checks the ids)
            rendered = render_text(tokenizer, conversation, settings.reasoning, record.where)
            add_special = False
    except LorafitError as e:
        return ExampleTokens(record.where, [], 0, True, error=str(e))
    if example is None:
        return ExampleTokens(record.where, [], 0, True, error="no trained (assistant) token in this record")
    ids, labels = example["input_ids"], example["labels"]
    texts = token_texts(tokenizer, rendered, ids, add_special_tokens=add_special)
    pieces = [(t, label != IGNORE_INDEX) for t, label in zip(texts, labels, strict=True)]
    kept = min(len(ids), settings.max_length)
    no_labels_left = not any(trained for _, trained in pieces[:kept])
    dropped = (len(ids) > settings.max_length and settings.overlong == "drop") or no_labels_left
    return ExampleTokens(record.where, pieces, kept, dropped)


def token_texts(tokenizer: Any, text: str, ids: list[int], *, add_special_tokens: bool) -> list[str]:
    """The text of each token of ``ids``, the tokenisation of ``text``, so that the pieces join
    back into ``text``.

    Each token owns the characters from its start to the next token's start, so whitespace that
    a special token swallows (Phi-3's ``<|user|>\\n``) stays visible. Tokens with no characters
    (a bos the tokenizer adds, the eos appended to plain text) show as their token string.
    """
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    enc_ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    tail = ids[len(enc_ids) :]  # plain text: tokenize_text appends eos when the tokenizer does not
    if enc_ids != ids[: len(enc_ids)] or tail not in ([], [tokenizer.eos_token_id]):
        # lorafit's template module encodes exactly this text; a mismatch means the tokenizer
        # changed between the two calls, and the mask shown would be wrong.
        raise LorafitError(
            "the tokenizer encoded the rendered conversation differently from the training "
            "tokenisation, so the mask cannot be shown; expected the same tokens twice"
        )
    starts = [start if end > start else None for start, end in offsets]
    out = []
    for j, token_id in enumerate(ids):
        start = starts[j] if j < len(starts) else None
        if start is None:
            out.append(tokenizer.convert_ids_to_tokens(token_id))
            continue
        following = [s for s in starts[j + 1 :] if s is not None]
        out.append(text[start : following[0] if following else len(text)])
    return out


def mask_html(example: ExampleTokens) -> str:
    """The example's tokens as spans: trained ones highlighted, context greyed, cut ones struck."""
    if example.error:
        return (
            f"<div class='lf-mask'><p class='lf-where'>{html.escape(example.where)}</p>"
            f"<p class='lf-bad'>not trained on: {html.escape(example.error)}</p></div>"
        )
    spans = []
    for j, (text, trained) in enumerate(example.pieces):
        if j >= example.kept or example.dropped:
            cls = "lf-cut"
        else:
            cls = "lf-trained" if trained else "lf-context"
        spans.append(f"<span class='lf-tok {cls}'>{html.escape(text)}</span>")
    n = len(example.pieces)
    if example.dropped:
        note = "this example is left out of training (longer than max_length with overlong: drop, "
        note += "or no trained token within max_length)"
    elif example.kept < n:
        note = f"{n - example.kept} tokens after max_length are cut (struck through)"
    else:
        note = "nothing cut"
    head = (
        f"<p class='lf-where'>{html.escape(example.where)}: {n} tokens, "
        f"<span class='lf-count'>{example.trained}</span> trained; {note}</p>"
    )
    legend = (
        "<p class='lf-legend'><span class='lf-tok lf-trained'>trained (label)</span> "
        "<span class='lf-tok lf-context'>context (label -100)</span> "
        "<span class='lf-tok lf-cut'>cut</span></p>"
    )
    return f"<div class='lf-mask'>{head}{legend}<pre class='lf-text'>{''.join(spans)}</pre></div>"


# -- preference data (method dpo, orpo, simpo or kto) ---------------------------------------


@dataclass
class PreferenceView:
    """The Data tab's findings for a preference file: ``lorafit data``'s report (its counts and
    bad records, :mod:`lorafit.data.preference_report`) and the readable records for the pair view.

    ``chosen_method`` is the Train tab's Method; the report's own ``method`` is the one the
    records are tokenised for (that one, or the fields' own when it is sft). ``lengths`` are the
    tokens of each sequence (prompt + one answer) as trained, for the histogram.
    """

    report: PreferenceReport
    settings: DataConfig
    chosen_method: str
    records: list[Record] = field(repr=False)
    lengths: np.ndarray
    rows: None = None  # pairs are never packed across examples: see packing_html

    @property
    def format(self) -> str:
        return self.report.format or "-"

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(where, reason)`` of every bad record, as ``lorafit train`` words them."""
        return [(f.where, f.message) for f in self.report.errors]

    @property
    def findings(self) -> list[tuple[str, str]]:
        return []  # lorafit data's preference checks are the bad records alone

    def summary(self) -> str:
        """One Markdown paragraph from ``lorafit data``'s figures (``PreferenceReport.stats``)."""
        r, s = self.report, self.report.stats
        kto = r.method == "kto"
        unit = "record" if kto else "pair"
        parts = [
            f"**format** `{self.format}` (method {r.method}) · **{_n(r.records, 'record')}** -> "
            f"{_n(s['examples'], unit)}"
            + (f" ({s['desirable']} desirable, {s['undesirable']} undesirable)" if kto else ""),
            f"{s['tokens']:,} tokens (prompt + answer, each sequence)",
            f"prompt tokens {_spread(s['prompt_tokens'])}",
            *(f"{name} answer tokens {_spread(side['answer_tokens'])}" for name, side in s["sides"].items()),
        ]
        if s["truncated"] or s["dropped"]:
            parts.append(
                f"max_length {r.max_length} ({r.truncation_mode}): {s['truncated']} truncated, "
                f"{s['dropped']} {unit}s dropped, {s['answer_lost']:,} answer tokens lost"
            )
        if s["bad"]:
            stop = (
                "skipped by the run (skip bad records is on)"
                if self.settings.skip_bad_records
                else "the run stops at the first of them unless skip bad records is on"
            )
            parts.append(f"**{s['bad']} bad record{'s' if s['bad'] != 1 else ''}** ({stop})")
        return " · ".join(parts) + self._method_note()

    def _method_note(self) -> str:
        if self.chosen_method == "sft":
            pick = "kto" if self.report.method == "kto" else "dpo, orpo or simpo"
            return f"\n\nThis is preference data: pick {pick} as the Method in the Train tab to train on it."
        if self.settings.format != "auto":
            return f"\n\n**data.format is `{self.settings.format}`**: a preference run needs `auto`."
        return ""


def inspect_any(tokenizer: Any, settings: DataConfig, method: str = "sft") -> DataReport | PreferenceView:
    """:func:`inspect_preference` for a file of TRL's preference formats, else :func:`inspect_data`."""
    if settings.train and is_preference_file(settings.train):
        return inspect_preference(tokenizer, settings, method)
    return inspect_data(tokenizer, settings)


def inspect_preference(tokenizer: Any, settings: DataConfig, method: str = "sft") -> PreferenceView:
    """``lorafit data``'s analysis of a preference file for ``method`` (sft: the method the fields
    say, kto for unpaired records, else dpo), under the data settings' ``max_length`` and
    ``overlong``; sequences are cut as ``truncation_mode: keep_start`` (TRL's default) cuts them."""
    report = analyse_preference(
        tokenizer,
        settings.train,
        method=None if method == "sft" else method,
        max_length=settings.max_length,
        overlong=settings.overlong,
    )
    kept = [e for e in report.examples if e.status != "too_long"]
    lengths = [min(len(s.ids), settings.max_length) for e in kept for s in e.sequences.values()]
    records = read_records(settings.train, bad=[])  # the unreadable ones are in report.errors
    return PreferenceView(report, settings, method, records, np.asarray(lengths, dtype=int))


@dataclass
class PairTokens:
    """One preference record as it trains: the prompt's tokens, then each answer's (``chosen`` and
    ``rejected``, or KTO's ``completion``) as ``(text, kind)``, kind ``trained`` (a label: its
    log-prob counts), ``context`` or ``cut`` (outside ``max_length``, or the record dropped)."""

    where: str
    prompt: list[tuple[str, str]]
    answers: dict[str, list[tuple[str, str]]]
    status: str  # "ok", "truncated" or "too_long" (dropped), as tokenize_preference says
    label: bool | None = None
    error: str | None = None

    def trained(self, name: str) -> int:
        return sum(kind == "trained" for _, kind in self.answers[name])


def pair_tokens(tokenizer: Any, view: PreferenceView, index: int) -> PairTokens:
    """Tokenise record ``index`` (0-based, among the readable records) as the run does:
    ``to_preference`` then ``tokenize_preference`` for the rows that train, ``encode_sequence``
    for the whole (uncut) sequences shown around them. A bad record comes back with ``error``."""
    if not 0 <= index < len(view.records):
        raise LorafitError(f"example {index + 1}: expected 1..{len(view.records)}")
    record, r = view.records[index], view.report
    try:
        converted = to_preference(record, r.method)
        rows, status = tokenize_preference(
            tokenizer,
            converted,
            max_length=r.max_length,
            truncation_mode=r.truncation_mode,
            overlong=r.overlong,
            where=record.where,
        )
        answers = {"completion": converted.chosen}
        if converted.rejected is not None:
            answers = {"chosen": converted.chosen, "rejected": converted.rejected}
        sides = {
            name: _side_pieces(tokenizer, converted, answer, rows, name, r.truncation_mode, record.where)
            for name, answer in answers.items()
        }
    except LorafitError as e:
        return PairTokens(record.where, [], {}, "too_long", error=str(e))
    first = next(iter(sides.values()))
    prompt = first[0][: first[1]]
    shown = {}
    for name, (pieces, start, ids) in sides.items():
        # the prompt is shown once; an answer whose prompt tokens differ from the first's shows its own
        shown[name] = pieces[start:] if ids[:start] == first[2][: first[1]] else pieces
    return PairTokens(record.where, prompt, shown, status, converted.label)


def _side_pieces(
    tokenizer: Any, record: Any, answer: list[dict], rows: dict | None, name: str, mode: str, where: str
) -> tuple[list[tuple[str, str]], int, list[int]]:
    """One answer's sequence: ``(pieces, prompt_length, ids)``; the kinds come from the labels of
    the row that trains (``rows``), placed where truncation left it in the whole sequence."""
    ids, _, start = encode_sequence(tokenizer, record.prompt, answer, record.text, where)
    if getattr(tokenizer, "chat_template", None) is not None:
        text = render_text(tokenizer, record.prompt + answer, "train", where)
    else:  # TRL's plain rows: prompt + answer + eos as text, which decoding gives back
        text = tokenizer.decode(ids)
    texts = token_texts(tokenizer, text, ids, add_special_tokens=False)
    kinds = ["cut"] * len(ids)
    if rows is not None:
        trained = rows["labels"] if name == "completion" else rows[f"{name}_labels"]
        offset = 0 if mode == "keep_start" else len(ids) - len(trained)
        for j, label in enumerate(trained):
            kinds[offset + j] = "context" if label == IGNORE_INDEX else "trained"
    return list(zip(texts, kinds, strict=True)), start, ids


def pair_html(pair: PairTokens) -> str:
    """The prompt (greyed), then the answers side by side with their trained tokens highlighted."""
    if pair.error:
        return (
            f"<div class='lf-mask'><p class='lf-where'>{html.escape(pair.where)}</p>"
            f"<p class='lf-bad'>not trained on: {html.escape(pair.error)}</p></div>"
        )
    counts = ", ".join(f"{name} <span class='lf-count'>{pair.trained(name)}</span>" for name in pair.answers)
    note = {
        "ok": "nothing cut",
        "truncated": "cut at max_length (struck through)",
        "too_long": "left out of training: longer than max_length with overlong: drop, or its prompt "
        "fills max_length",
    }[pair.status]
    head = f"<p class='lf-where'>{html.escape(pair.where)}: trained answer tokens {counts}; {note}</p>"
    legend = (
        "<p class='lf-legend'><span class='lf-tok lf-trained'>answer (its log-probs count)</span> "
        "<span class='lf-tok lf-context'>prompt and template (label -100)</span> "
        "<span class='lf-tok lf-cut'>cut</span></p>"
    )
    sides = []
    for name, pieces in pair.answers.items():
        title = name if pair.label is None else f"{name} · {'desirable' if pair.label else 'undesirable'}"
        sides.append(
            f"<div class='lf-side lf-side-{name}'><p class='lf-side-name'>{html.escape(title)}</p>"
            f"<pre class='lf-text'>{_spans(pieces)}</pre></div>"
        )
    prompt = f"<pre class='lf-text lf-prompt'>{_spans(pair.prompt)}</pre>"
    sides_html = f"<div class='lf-sides'>{''.join(sides)}</div>"
    return f"<div class='lf-mask lf-pair'>{head}{legend}{prompt}{sides_html}</div>"


def _spans(pieces: list[tuple[str, str]]) -> str:
    return "".join(f"<span class='lf-tok lf-{kind}'>{html.escape(text)}</span>" for text, kind in pieces)


def example_html(tokenizer: Any, report: DataReport | PreferenceView, index: int) -> str:
    """Record ``index`` of either kind of report, as the Data tab shows it."""
    if isinstance(report, PreferenceView):
        return pair_html(pair_tokens(tokenizer, report, index))
    return mask_html(example_tokens(tokenizer, report, index))
