"""The run folder: which one, made ready, checked for room, and the files written at its top.

A run never writes over another: without ``output_dir`` it gets a new ``runs/<timestamp>``; an
``output_dir`` that holds files is refused unless ``--resume`` or ``overwrite_output_dir`` says
what to do with it. The folder is checked before any model loads (it can be created and
written, its disk has room for two checkpoints), and a write that fails later (disk full) names
the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from lorafit.adapters.files import CONFIG_NAME, WEIGHTS_NAME
from lorafit.config import RunConfig
from lorafit.constants import RUN_CONFIG_NAME
from lorafit.disk import MiB, existing_ancestor, require_free_space, write_text_atomic
from lorafit.errors import LorafitError
from lorafit.training import checkpoints

METRICS_NAME = "metrics.jsonl"
SAMPLES_NAME = "samples.md"
LOSS_PLOT_NAME = "loss.png"
SKIPPED_NAME = "skipped_records.jsonl"
# What a run writes at the top of its folder: removed when overwrite_output_dir reuses one.
RUN_FILES = (METRICS_NAME, LOSS_PLOT_NAME, SAMPLES_NAME, SKIPPED_NAME, CONFIG_NAME, WEIGHTS_NAME)
RUN_FILES += ("tensorboard", "mlruns", "wandb")  # the trackers' local stores (training.tracking)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def new_run_dir(root: Path = Path("runs")) -> Path:
    """``runs/YYYYmmdd-HHMMSS`` (with ``-2``, ``-3`` ... if taken): never an old run's folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def resolve_run_dir(cfg: RunConfig, resume: str | bool | None) -> tuple[Path, str | None]:
    """The folder this run writes to and the checkpoint it resumes from (or None).

    An existing, non-empty ``output_dir`` is refused unless ``--resume`` or
    ``overwrite_output_dir`` says what to do with it. A run folder resumes from its newest
    complete checkpoint; a ``checkpoint-N`` folder named directly must be complete.
    """
    tc = cfg.training_config
    out = tc.get("output_dir")
    if isinstance(resume, str):
        path = Path(resume)
        if not path.is_dir():
            raise LorafitError(f"--resume {resume}: no such run or checkpoint folder")
        if checkpoints.checkpoint_step(path) is not None or (path / checkpoints.TRAINER_STATE_NAME).exists():
            return path.parent, str(path)  # train() checks that it is complete and safe
        last = checkpoints.last_checkpoint(path)
        if last is None:
            raise LorafitError(f"--resume {resume}: the folder holds no complete checkpoint-N/ to resume")
        return path, str(last)
    if resume:
        if not out:
            raise LorafitError(
                "--resume needs the run folder: --resume runs/NAME, or set training_config.output_dir"
            )
        last = checkpoints.last_checkpoint(Path(out))
        if last is None:
            raise LorafitError(f"--resume: {out} holds no complete checkpoint-N/ to resume from")
        return Path(out), str(last)
    if not out:
        return new_run_dir(), None
    path = Path(out)
    if path.exists() and any(path.iterdir()) and not tc.get("overwrite_output_dir"):
        raise LorafitError(
            f"output folder {path} already holds files; lorafit never writes over a run. Use --resume to "
            "continue it, pick another training_config.output_dir, or set overwrite_output_dir: true"
        )
    return path, None


def prepare_run_dir(run_dir: Path, *, fresh: bool, echo: Any = print) -> None:
    """Create the run folder and clear what a kill during a save left there. A fresh run in a
    used folder (``overwrite_output_dir``) first removes the old run's checkpoints and files, so
    they are never mistaken for its own (by ``--resume``, by rotation, in ``metrics.jsonl``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.remove_partial_checkpoints(run_dir)
    if not fresh:
        return
    old = [p for p in run_dir.iterdir() if p.name in RUN_FILES or checkpoints.checkpoint_step(p) is not None]
    for path in old:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if old:
        echo(f"overwrite_output_dir: removed the previous run's {', '.join(sorted(p.name for p in old))}")


def write_skipped_records(run_dir: Path, stats: dict[str, Any]) -> tuple[int, Path]:
    """``skipped_records.jsonl``: one line per record not trained on (split, where, reason)."""
    rows = [{"split": "train", **row} for row in stats["skipped"]]
    if stats.get("eval"):
        rows += [{"split": "eval", **row} for row in stats["eval"]["skipped"]]
    path = run_dir / SKIPPED_NAME
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return len(rows), path


def write_run_files(
    run_dir: Path,
    cfg: RunConfig,
    tokenizer: Any,
    stats: dict[str, Any],
    *,
    fresh: bool,
    notes: Sequence[str] = (),
    echo: Any = print,
) -> None:
    """The run folder with the resolved config (``notes``, what this machine changed, as comments
    at its top), the tokenizer and (``skip_bad_records``) the report of skipped records."""
    prepare_run_dir(run_dir, fresh=fresh, echo=echo)
    header = "".join(f"# on the machine that ran it: {note}\n" for note in notes)
    (run_dir / RUN_CONFIG_NAME).write_text(header + cfg.to_yaml(), encoding="utf-8")
    tokenizer.save_pretrained(run_dir)
    if cfg.data.skip_bad_records:
        n, path = write_skipped_records(run_dir, stats)
        echo(f"skipped {n} records; each with its reason is in {path}" if n else "no record skipped")


def write_samples(
    path: Path,
    conversations: list[Any],
    before: tuple[dict, list[dict]] | None,
    after: tuple[dict, list[dict]] | None,
    note: str = "",
    rejected: list[str | None] | None = None,
) -> None:
    """``samples.md``: each eval prompt with its reference and the answers before and after
    training, under a table of the generation metrics (``before``/``after``: the summary and the
    rows of :func:`lorafit.inference.metrics.generation_report`; None when not run). With
    ``rejected`` (a preference run) the reference is the chosen answer, shown with the rejected
    one (None: a KTO record, whose one answer is the desirable completion)."""
    from lorafit.data.template import messages_and_tools
    from lorafit.inference.metrics import METRICS, last_question, reference_text

    def answers(report: tuple[dict, list[dict]] | None, why: str) -> list[str]:
        return [row["answer"] for row in report[1]] if report else [f"({why})"] * len(conversations)

    lines = ["# Eval prompts: before and after training", ""]
    lines += ["| | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, report in (("before", before), ("after", after)):
        cells = [f"{report[0][m]:.3f}" for m in METRICS] if report else ["-"] * len(METRICS)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    pairs = zip(answers(before, "not run: resumed"), answers(after, note or "not run"), strict=True)
    for i, (conv, (b, a)) in enumerate(zip(conversations, pairs, strict=True), 1):
        messages, _ = messages_and_tools(conv)
        lines += [f"## {i}. {last_question(messages)}", ""]
        answer = reference_text(messages[-1])
        if rejected is None:
            lines += [f"**reference:** {answer}", ""]
        elif rejected[i - 1] is None:
            lines += [f"**desirable:** {answer}", ""]
        else:
            lines += [f"**chosen:** {answer}", "", f"**rejected:** {rejected[i - 1]}", ""]
        lines += [f"**before:** {b}", "", f"**after:** {a}", ""]
    write_text_atomic(path, "\n".join(lines))


def check_output_dir(run_dir: Path) -> None:
    """Fail now, not after loading a model, if ``run_dir`` cannot be created or written to.

    Writes and deletes a probe file; folders it had to create are removed again, so a run that
    stops here leaves nothing behind.
    """
    base = existing_ancestor(run_dir)
    if not base.is_dir():
        raise LorafitError(
            f"output folder {run_dir} cannot be created: {base} is a file, not a folder; "
            "choose another training_config.output_dir"
        )
    created = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".lorafit-write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"lorafit")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise LorafitError(
            f"output folder {run_dir} is not writable ({e.strerror or e}); "
            "choose another training_config.output_dir or fix its permissions"
        ) from None
    finally:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About the size of one checkpoint: each trainable parameter in its dtype plus AdamW's two
    fp32 moments, and a MiB for the scheduler, RNG and trainer state."""
    return sum(p.numel() * (p.element_size() + 8) for p in model.parameters() if p.requires_grad) + MiB


def check_free_space(run_dir: Path, checkpoint_size: int) -> None:
    """Fail if the disk that will hold ``run_dir`` lacks room for two checkpoints of
    ``checkpoint_size`` bytes (the last one is kept while the next is written) and 16 MiB more."""
    require_free_space(
        run_dir,
        2 * checkpoint_size + 16 * MiB,
        "this run",
        "Free some space or choose another training_config.output_dir.",
        why=f"a checkpoint is about {checkpoint_size / MiB:.1f} MiB, and the last one is kept while the "
        "next is written",
    )


@contextlib.contextmanager
def write_errors_reported(run_dir: Path) -> Iterator[None]:
    """Turn a failed write (disk full, file too large, read-only, no permission) into a
    ``LorafitError`` naming the file and the last good checkpoint."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        raise LorafitError(
            f"writing{where} in {run_dir} failed: {e.strerror or e}. {checkpoints.resume_hint(run_dir)}"
        ) from e
