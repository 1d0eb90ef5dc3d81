"""Checkpoints: complete or absent, rotated safely, checked before a resume.

``checkpoint-N`` is written inside a hidden sibling (``.partial-checkpoint-N/``), synced to disk,
then renamed into place, so a kill during a save leaves the previous checkpoint whole; rotation
counts complete checkpoints only and never deletes the newest one. A checkpoint from elsewhere
is checked before resuming: it must be complete, and its PyTorch files must load the way
transformers' Trainer loads them (``torch.load(weights_only=True)``), so a pickle that would run
code is refused with an explanation instead of failing deep inside.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lorafit.adapters.files import CONFIG_NAME, WEIGHTS_NAME
from lorafit.errors import LorafitError

TRAINER_STATE_NAME = "trainer_state.json"


LORAFIT_STATE_NAME = "lorafit_state.json"  # in each checkpoint: tokens seen, training data fingerprint


PARTIAL = ".partial-"  # run_dir/.partial-checkpoint-N/checkpoint-N: a checkpoint being written


REPLACED = ".replaced-"  # an older checkpoint of the same step, moved aside while the new one goes in


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named ``checkpoint-N``, else None."""
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
    return int(match.group(1)) if match else None


def missing_from_checkpoint(path: Path) -> list[str]:
    """The files a resume reads that ``path`` lacks (a trainer state that does not parse counts)."""
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
    try:
        json.loads((path / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        missing.append(TRAINER_STATE_NAME)
    return missing


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders of ``run_dir``, oldest (lowest N) first."""
    if not run_dir.is_dir():
        return []
    found = [
        (step, path)
        for path in run_dir.iterdir()
        if path.is_dir() and (step := checkpoint_step(path)) is not None and not missing_from_checkpoint(path)
    ]
    return [path for _, path in sorted(found)]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def resume_hint(run_dir: Path) -> str:
    """One sentence naming the last good checkpoint and the command that resumes from it."""
    last = last_checkpoint(run_dir)
    if last is None:
        return "No checkpoint was saved before this, so the run cannot be resumed."
    return f"The last good checkpoint is {last} (continue from it with: lorafit train --resume {run_dir})."


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Clear what a kill during a save left: ``.partial-*`` folders, and ``.replaced-*`` ones
    (renamed back when the checkpoint they stood in for is missing)."""
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if path.name.startswith(REPLACED):
            original = run_dir / path.name[len(REPLACED) :]
            if not original.exists() and not missing_from_checkpoint(path):
                os.replace(path, original)
                continue
        if path.name.startswith((PARTIAL, REPLACED)):
            shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    if os.name != "posix" and path.is_dir():
        return  # folders cannot be opened for fsync there
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move the fully written folder ``staged`` to ``final`` in one rename, after syncing it to disk.

    A folder already at ``final`` (a run re-saving the same step) is moved aside first and
    deleted after, so at every moment one complete copy exists.
    """
    for path in staged.iterdir():
        if path.is_file():
            _fsync(path)
    _fsync(staged)
    aside = final.with_name(REPLACED + final.name)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(staged, final)
    _fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def rotate_checkpoints(run_dir: Path, limit: int | None, keep: Iterable[str | None] = ()) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``limit`` (``save_total_limit``); returns them.

    The newest complete checkpoint and those in ``keep`` (the best one) are never deleted;
    incomplete folders are neither counted nor touched, so they can never push out the only
    good checkpoint.
    """
    if not limit or limit <= 0:
        return []
    done = complete_checkpoints(run_dir)
    protected = {done[-1].resolve()} if done else set()
    protected |= {Path(k).resolve() for k in keep if k}
    deleted = []
    for path in done:
        if len(done) - len(deleted) <= max(limit, len(protected)):
            break
        if path.resolve() not in protected:
            shutil.rmtree(path)
            deleted.append(path)
    return deleted


def check_checkpoint(path: Path) -> None:
    """Refuse a checkpoint that is incomplete or holds a file that could run code when loaded.

    Its PyTorch files (optimizer, scheduler, scaler and RNG states: every ``*.pt`` / ``*.pth``)
    are loaded the way transformers' Trainer loads them on resume, ``torch.load(weights_only=True)``
    with transformers' numpy allowlist, so whatever the Trainer would refuse is refused here,
    before the model is loaded, with a message. ``training_args.bin`` is never loaded, here or by
    the Trainer's resume, and lorafit's checkpoints do not write it.
    """
    from transformers.trainer_pt_utils import safe_globals

    if not path.is_dir():
        raise LorafitError(f"checkpoint {path}: no such folder")
    missing = missing_from_checkpoint(path)
    if missing:
        raise LorafitError(
            f"checkpoint {path} is incomplete (no readable {', '.join(missing)}); it was cut short by a "
            "crash or copied in part. Resume from an earlier checkpoint-N of the run instead."
        )
    for file in sorted(path.iterdir()):
        if file.suffix not in (".pt", ".pth"):
            continue
        try:
            with safe_globals():
                torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"calls {found.group(1)}" if found else "holds objects that are not plain data"
            raise LorafitError(
                f"{file} is refused: it {what}, so loading it could run code. A checkpoint's optimizer, "
                "scheduler and RNG files hold only tensors and plain values, and lorafit (like "
                "transformers) loads them with torch.load(weights_only=True). Do not resume from a "
                "checkpoint whose origin you do not know; start the run afresh instead."
            ) from None
        except Exception as e:  # truncated or not a torch file at all: the Trainer would fail on it too
            raise LorafitError(
                f"{file} is not a readable PyTorch file ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "resume from another checkpoint-N of the run."
            ) from None


def check_same_data(checkpoint: Path, fingerprint: str, echo: Any = print) -> None:
    """Warn when the training rows differ from those the checkpoint was trained on."""
    own = checkpoint / LORAFIT_STATE_NAME
    if not own.is_file():
        return
    saved = json.loads(own.read_text(encoding="utf-8")).get("train_data")
    if saved and saved != fingerprint:
        echo(
            f"warning: the training data differ from those {checkpoint} was trained on (an edited file, "
            "or other data settings); the resumed run continues, but not on the batches the interrupted "
            "run would have seen."
        )
