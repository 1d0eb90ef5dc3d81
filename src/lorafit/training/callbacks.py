"""What the Trainer calls back into: the run's files and progress bar, stop on a signal,
and the guard against non-finite steps.

- ``RunFilesCallback``: ``metrics.jsonl`` (one line per log and eval), ``loss.png``, a progress
  bar with loss, learning rate and tokens/s.
- ``StopOnSignal``: SIGINT / SIGTERM finish the current step, save a checkpoint and stop.
- ``NonFiniteGuard``: a NaN or inf loss or gradient stops the run before the optimizer applies
  it, or skips that step when asked.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from lorafit.disk import write_text_atomic
from lorafit.errors import LorafitError
from lorafit.training.checkpoints import resume_hint
from lorafit.training.rundir import LOSS_PLOT_NAME, METRICS_NAME


class RunFilesCallback(TrainerCallback):
    """``metrics.jsonl`` (one line per log and eval), ``loss.png``, and a progress bar with
    loss, learning rate and tokens/s. Writes on the main process only; token counts in
    ``metrics.jsonl`` are summed over all processes."""

    def __init__(self, run_dir: Path, trainer: Trainer) -> None:
        self.run_dir = run_dir
        self.trainer = trainer
        self.bar: tqdm | None = None
        self.history: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.tokens0 = 0
        self.last: dict[str, str] = {}  # the progress bar's postfix

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()
        self.tokens0 = self.trainer.tokens_seen()  # every rank runs this callback: a collective is safe
        if state.is_world_process_zero and state.global_step > 0:
            self.history = metrics_up_to(self.run_dir / METRICS_NAME, state.global_step)
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def tokens_per_s(self, tokens: int) -> float:
        """Throughput since training began, given the tokens seen by all processes so far."""
        return (tokens - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            # loss, lr and tokens/s as of the last log: reading them every step would wait for
            # the device every step
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(self.last, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if "loss" in logs:
            # Trainer logs on every rank with the same keys, so every rank joins this sum. Into the
            # logs themselves: the trackers (report_to), called after this callback, report them too.
            tokens = self.trainer.tokens_seen()
            logs["tokens_per_s"] = round(self.tokens_per_s(tokens), 1)
            logs["tokens_seen"] = tokens
        if not state.is_world_process_zero:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if "loss" in logs:
            self.last = {
                "loss": f"{logs['loss']:.4f}",
                "lr": f"{logs.get('learning_rate', 0):.2e}",
                "tok/s": f"{row['tokens_per_s']:.0f}",
            }
            if "rewards/accuracies" in logs:  # a preference method: how often chosen beats rejected
                self.last["acc"] = f"{logs['rewards/accuracies']:.2f}"
        if "eval_loss" in logs and "eval_rewards/accuracies" in logs:  # a preference loss: no perplexity
            self.write(
                f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}, reward accuracy "
                f"{logs['eval_rewards/accuracies']:.2f}, margin {logs.get('eval_rewards/margins', 0.0):.4f}"
            )
        elif "eval_loss" in logs:
            row["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            msg = (
                f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}, "
                f"perplexity {row['eval_perplexity']:.2f}"
            )
            self.write(msg)
        self.history.append(row)
        with open(self.run_dir / METRICS_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss(self.history, self.run_dir / LOSS_PLOT_NAME)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        if state.is_world_process_zero:
            plot_loss(self.history, self.run_dir / LOSS_PLOT_NAME)


def metrics_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` logged up to ``step``; the file is rewritten to hold just those.

    On resume from checkpoint-N the rows after N (logged by the interrupted run, and about to be
    logged again) and a last line cut short by a kill go, so the file reads as one run.
    """
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                rows.append(row)
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    """Train and eval loss against step; for a preference method a second panel beside it with
    the reward margin (``rewards/margins``) and the reward accuracy (``rewards/accuracies``, the
    share of pairs whose chosen answer out-rewards the rejected one), train and eval."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if not train and not evals:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in history if key in r]

    rewarded = any("rewards/margins" in r or "eval_rewards/margins" in r for r in history)
    fig, axes = plt.subplots(
        1, 2 if rewarded else 1, figsize=(12 if rewarded else 7, 4), dpi=100, squeeze=False
    )
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if rewarded:
        margins, accuracy = axes[0][1], axes[0][1].twinx()
        for prefix, style in (("", "-"), ("eval_", "o-")):
            name = "eval" if prefix else "train"
            if points := series(f"{prefix}rewards/margins"):
                margins.plot(*zip(*points, strict=True), style, color="tab:blue", label=f"{name} margin")
            if points := series(f"{prefix}rewards/accuracies"):
                accuracy.plot(*zip(*points, strict=True), style, color="tab:orange", label=f"{name} accuracy")
        margins.set_xlabel("step")
        margins.set_ylabel("reward margin (chosen - rejected)")
        accuracy.set_ylabel("reward accuracy")
        accuracy.set_ylim(-0.05, 1.05)
        margins.grid(alpha=0.3)
        lines = margins.get_legend_handles_labels()
        more = accuracy.get_legend_handles_labels()
        margins.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


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

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True


PAUSE_ENV = "LORAFIT_PAUSE_AT_STEP"


class PauseAtStep(TrainerCallback):
    """With ``LORAFIT_PAUSE_AT_STEP=N`` (or ``N,M,...``) in the environment, the run stops itself
    (SIGSTOP, as Ctrl-Z stops a job) when step N is done (logged, saved, evaluated) and step N + 1
    is about to start, and goes on at SIGCONT; once for each step listed that the run reaches.

    For tests that signal a run mid-way, or watch it while it runs: the run is then certainly
    still running, however fast or slow the machine (waiting for a file to appear instead races
    the run to its end). A run resumed after step N does not pause there.
    """

    def __init__(self, steps: set[int]) -> None:
        self.steps = set(steps)

    @classmethod
    def from_environment(cls) -> PauseAtStep | None:
        value = os.environ.get(PAUSE_ENV, "").strip()
        if not value:
            return None
        parts = [part.strip() for part in value.split(",")]
        if not all(part.isdigit() for part in parts):
            raise LorafitError(
                f"{PAUSE_ENV}={value!r}: expected step numbers (0 or more), separated by commas"
            )
        return cls({int(part) for part in parts})

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.steps.discard(state.global_step)
            os.kill(os.getpid(), signal.SIGSTOP)


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

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
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
