"""What keeps a run's work safe when something goes wrong.

- Checkpoints are complete or absent: ``checkpoint-N`` is written inside a hidden sibling
  (``.partial-checkpoint-N/``), synced to disk, then renamed into place, so a kill during a save
  leaves the previous checkpoint whole; rotation counts complete checkpoints only and never
  deletes the newest one.
- A checkpoint from elsewhere is checked before resuming: it must be complete, and its PyTorch
  files must load the way transformers' Trainer loads them (``torch.load(weights_only=True)``),
  so a pickle that would run code is refused with an explanation instead of failing deep inside.
- The output folder is checked before training: it can be created and written, and its disk has
  room for two checkpoints. A write that fails later (disk full) names the last good checkpoint.
- SIGINT / SIGTERM finish the current step, save a checkpoint and stop (``StopOnSignal``).
- A NaN or inf loss or gradient stops the run before the optimizer applies it, or skips that
  step when asked (``NonFiniteGuard``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lorafit.adapter import CONFIG_NAME, WEIGHTS_NAME
from lorafit.errors import LorafitError

TRAINER_STATE_NAME = "trainer_state.json"
LORAFIT_STATE_NAME = "lorafit_state.json"  # in each checkpoint: tokens seen, training data fingerprint
PARTIAL = ".partial-"  # run_dir/.partial-checkpoint-N/checkpoint-N: a checkpoint being written
REPLACED = ".replaced-"  # an older checkpoint of the same step, moved aside while the new one goes in
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
MiB = 1 << 20


# --------------------------------------------------------------------------------------------
# Checkpoints: which are complete, writing one atomically, rotation
# --------------------------------------------------------------------------------------------


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it over ``path``: readers and a kill see the
    old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


# --------------------------------------------------------------------------------------------
# Files from elsewhere
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The output folder and its disk
# --------------------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(run_dir: Path) -> None:
    """Fail now, not after loading a model, if ``run_dir`` cannot be created or written to.

    Writes and deletes a probe file; folders it had to create are removed again, so a run that
    stops here leaves nothing behind.
    """
    base = _existing_ancestor(run_dir)
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
    needed = 2 * checkpoint_size + 16 * MiB
    free = shutil.disk_usage(_existing_ancestor(run_dir)).free
    if free < needed:
        raise LorafitError(
            f"output folder {run_dir}: only {free / MiB:.1f} MiB free on its disk, and this run needs "
            f"about {needed / MiB:.1f} MiB (a checkpoint is about {checkpoint_size / MiB:.1f} MiB, and the "
            "last one is kept while the next is written). Free some space or choose another "
            "training_config.output_dir."
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
            f"writing{where} in {run_dir} failed: {e.strerror or e}. {resume_hint(run_dir)}"
        ) from e


# --------------------------------------------------------------------------------------------
# Callbacks: stop on a signal, guard against non-finite steps
# --------------------------------------------------------------------------------------------


class StopOnSignal(TrainerCallback):
    """On SIGINT or SIGTERM, finish the current optimizer step, save a checkpoint and stop.

    ``received`` holds the signal's number. The first signal puts the previous handlers back, so
    a second one acts as it would have (Ctrl-C raises KeyboardInterrupt, SIGTERM ends the
    process); the last saved checkpoint is whole either way.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, echo: Callable[[str], Any] = print) -> None:
        self.received: int | None = None
        self.echo = echo
        self._previous: dict[int, Any] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # Python delivers signals to the main thread only
            return
        self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        self._restore()
        self.echo(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
            "(send it again to stop at once)"
        )

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True


class NonFiniteGuard(TrainerCallback):
    """Before each optimizer step: are the loss and the gradients finite?

    If not, the run stops with a message naming the step and the last good checkpoint, before the
    optimizer turns NaN into weights; with ``skip`` the step's gradients are dropped instead (the
    optimizer leaves the weights as they are; the learning-rate schedule moves on) and it is
    counted in ``skipped``. Under fp16 loss scaling the gradients are the scaler's business (an
    overflow there is routine and skipped by it), so only the loss is checked.
    """

    def __init__(self, trainer: Any, run_dir: Path, skip: bool, echo: Callable[[str], Any] = print) -> None:
        self.trainer, self.run_dir, self.skip, self.echo = trainer, run_dir, skip, echo
        self.skipped: list[int] = []

    def _what_is_not_finite(self, model: torch.nn.Module) -> str | None:
        loss_ok = self.trainer.take_loss_finite()
        bad = [] if loss_ok else ["loss"]
        if getattr(self.trainer.accelerator, "scaler", None) is None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            # one flag per tensor, then one host sync for all of them
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                bad.append("gradients")
        return " and ".join(bad) or None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        what = self._what_is_not_finite(model)
        if what is None:
            return
        step = state.global_step + 1
        if self.skip:
            model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
            self.skipped.append(step)
            self.echo(f"step {step}: non-finite {what} (NaN or inf); skipped ({len(self.skipped)} so far)")
            return
        raise LorafitError(
            f"step {step}: the {what} {'are' if what != 'loss' else 'is'} not finite (NaN or inf); training "
            f"stopped before the update reached the weights. {resume_hint(self.run_dir)} "
            "Lower training_config.learning_rate or check the data of that step, or set "
            "training_config.skip_nonfinite: true (--skip-nonfinite) to skip such steps."
        )
