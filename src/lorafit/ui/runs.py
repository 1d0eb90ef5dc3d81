"""Runs started from the page: each one ``python -m lorafit train CONFIG.yaml`` in its own process.

A run is a separate process in its own session, so a closed tab, a crashed page or a stopped
page server neither kills nor corrupts it; Stop sends SIGINT, which ``lorafit train`` turns into
a stop after the current step with a checkpoint saved (as Ctrl-C does), and Resume runs
``lorafit train --resume RUN``.

Where things go. Run folders are ``RUNS/NAME`` with NAME a plain folder name, so nothing typed
into the page can point a run outside the runs folder. The run folder must be new (lorafit
refuses to write into a folder that holds files), so the page keeps what it needs to launch and
follow a run, the YAML it ran, the process's output and its process id, beside it in
``RUNS/.lorafit-ui/NAME/``; a restarted page finds its runs there and can still stop them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.adapters.files import WEIGHTS_NAME
from lorafit.config import RunConfig
from lorafit.constants import RUN_CONFIG_NAME
from lorafit.errors import LorafitError
from lorafit.training.checkpoints import last_checkpoint
from lorafit.training.rundir import LOSS_PLOT_NAME, METRICS_NAME, SAMPLES_NAME, new_run_dir

STATE_DIR = ".lorafit-ui"
CONFIG_NAME = "config.yaml"
LOG_NAME = "train.log"
PROCESS_NAME = "process.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# lorafit's progress bar: "train:  40%|####      | 4/10 [...]"
_PROGRESS = re.compile(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
_LOG_TAIL_BYTES = 64 * 1024
# How lorafit train ends when a signal stops it: exit code 128 + the signal's number (lorafit's
# clean stop, or Python's KeyboardInterrupt), or killed by it before Python could handle it.
STOP_CODES = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}


def check_name(name: str, what: str = "run folder", where: str = "the runs folder") -> str:
    """A plain folder name: letters, digits, ``.``, ``_``, ``-``; no path, nothing hidden."""
    name = (name or "").strip()
    if not _NAME.fullmatch(name):
        raise LorafitError(
            f"{what} {name!r}: expected a plain folder name (letters, digits, '.', '_', '-'; not "
            f"starting with '.'), created inside {where}"
        )
    return name


def has_adapter(run_dir: Path) -> bool:
    """Whether the run finished: lorafit saves the adapter at the top of the folder at the end."""
    return (run_dir / WEIGHTS_NAME).is_file()


def require_adapter(run_dir: Path) -> Path:
    """``run_dir`` if it holds a trained adapter, else an error saying how to get one."""
    if not has_adapter(run_dir):
        raise LorafitError(
            f"{run_dir} holds no adapter yet ({WEIGHTS_NAME}): choose a run that finished, "
            "or resume a stopped run to finish it"
        )
    return run_dir


def chosen(name: str | None, what: str = "a finished run") -> str:
    """The run picked in a list, or an error saying to pick one."""
    if not name:
        raise LorafitError(f"no run chosen; pick {what} in the list")
    return name


@dataclass
class RunView:
    """What the page shows of one run: its state, progress, metrics and files."""

    name: str
    state: str  # starting | running | stopping | finished | stopped | failed | not running
    message: str
    step: int | None = None
    total: int | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    samples: str | None = None
    loss_png: Path | None = None
    log_tail: str = ""

    @property
    def tokens_per_s(self) -> float | None:
        rows = [r for r in self.metrics if "tokens_per_s" in r]
        return rows[-1]["tokens_per_s"] if rows else None

    def _rewards(self) -> list[str]:
        """A preference run's last reward accuracy and margin (TRL's ``rewards/*`` metrics), train
        then eval; nothing for a run that logs none."""
        parts = []
        for prefix in ("", "eval "):
            key = prefix.replace(" ", "_") + "rewards/"
            rows = [r for r in self.metrics if f"{key}accuracies" in r]
            if rows:
                last = rows[-1]
                parts.append(f"{prefix}reward accuracy {last[f'{key}accuracies']:.2f}")
                if f"{key}margins" in last:
                    parts.append(f"{prefix}margin {last[f'{key}margins']:.4f}")
        return parts

    def headline(self) -> str:
        """``**NAME**: running · step 7 of 20 · loss 5.8300 · eval loss 5.9100 · 2,103 tokens/s``;
        a preference run adds ``reward accuracy 0.75 · margin 0.0123`` (and the eval ones)."""
        parts = [f"**{self.name}**: {self.state}"]
        if self.step is not None and self.total:
            parts.append(f"step {self.step} of {self.total}")
        losses = [r for r in self.metrics if "loss" in r]
        evals = [r for r in self.metrics if "eval_loss" in r]
        if losses:
            parts.append(f"loss {losses[-1]['loss']:.4f}")
        if evals:
            parts.append(f"eval loss {evals[-1]['eval_loss']:.4f}")
        parts += self._rewards()
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        return " · ".join(parts) + (f"\n\n{self.message}" if self.message else "")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a last line still being written is left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def log_tail(path: Path, lines: int = 25) -> str:
    """The last lines of a run's output, each progress-bar line as it was last drawn."""
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
        text = f.read().decode("utf-8", errors="replace")
    shown = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])


def progress(text: str) -> tuple[int, int] | None:
    """``(step, total)`` from the last progress bar drawn in ``text``."""
    found = _PROGRESS.findall(text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


class Runs:
    """The runs in one folder: start, stop, resume, list and read them.

    One run at a time: runs share the machine's cores and memory, and a second would slow both.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.state_root = self.root / STATE_DIR
        self._procs: dict[str, subprocess.Popen] = {}
        self._stopping: set[str] = set()
        self._lock = threading.Lock()

    # -- where ---------------------------------------------------------------------------

    def run_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def state_dir(self, name: str) -> Path:
        return self.state_root / check_name(name)

    def new_name(self) -> str:
        """A fresh ``YYYYmmdd-HHMMSS`` name, as ``lorafit train`` picks one."""
        return new_run_dir(self.root).name

    def check_new(self, name: str) -> Path:
        """The folder for a new run: inside the runs folder, new or empty, and not known here."""
        path = self.run_dir(name)
        if (path.exists() and any(path.iterdir())) or self.state_dir(name).exists():
            raise LorafitError(f"run folder {path} is already used; choose a new name (or resume that run)")
        return path

    # -- processes -----------------------------------------------------------------------

    def _launch(self, name: str, command: list[str], note: str) -> None:
        state = self.state_dir(name)
        state.mkdir(parents=True, exist_ok=True)
        with open(state / LOG_NAME, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {note}: {' '.join(command)}\n".encode())
            log.flush()
            # Its own session: Ctrl-C in the page server's terminal, or the server dying, does
            # not reach the run; only Stop does. Unbuffered, so the page sees output at once.
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        self._procs[name] = proc
        self._stopping.discard(name)
        record = {"pid": proc.pid, "command": command, "started": time.time(), "returncode": None}
        (state / PROCESS_NAME).write_text(json.dumps(record), encoding="utf-8")

    def start(self, name: str, cfg: RunConfig) -> Path:
        """Write ``cfg`` as the run's YAML and start ``python -m lorafit train`` on it."""
        with self._lock:
            self._refuse_second_run()
            run_dir = self.check_new(name)
            if Path(str(cfg.training_config.get("output_dir"))).resolve() != run_dir:
                raise LorafitError(
                    f"training_config.output_dir is {cfg.training_config.get('output_dir')!r}; "
                    f"expected the run folder {run_dir}"
                )
            state = self.state_dir(name)
            state.mkdir(parents=True)
            config_path = state / CONFIG_NAME
            config_path.write_text(cfg.to_yaml(), encoding="utf-8")
            self._launch(name, [sys.executable, "-m", "lorafit", "train", str(config_path)], "start")
        return run_dir

    def resume(self, name: str) -> Path:
        """Continue a stopped run from its last complete checkpoint (``lorafit train --resume``)."""
        with self._lock:
            self._refuse_second_run()
            run_dir = self.run_dir(name)
            if not run_dir.is_dir() or last_checkpoint(run_dir) is None:
                raise LorafitError(
                    f"{run_dir} holds no complete checkpoint-N/ to resume from; a run stopped before "
                    "its first checkpoint has nothing to continue: start a new one"
                )
            if not (run_dir / RUN_CONFIG_NAME).is_file():
                raise LorafitError(f"{run_dir}: not a lorafit run folder (no {RUN_CONFIG_NAME})")
            command = [sys.executable, "-m", "lorafit", "train", "--resume", str(run_dir)]
            self._launch(name, command, "resume")
        return run_dir

    def stop(self, name: str) -> str:
        """Send SIGINT, as Ctrl-C does: the run stops after its current step with a checkpoint."""
        pid = self._live_pid(name)
        if pid is None:
            raise LorafitError(f"run {name} is not running; nothing to stop")
        os.kill(pid, signal.SIGINT)
        self._stopping.add(name)
        return f"asked {name} to stop: it finishes the current step and saves a checkpoint"

    def _refuse_second_run(self) -> None:
        active = self.active()
        if active is not None:
            raise LorafitError(
                f"run {active} is still running; stop it first (one run at a time: runs share this "
                "machine's cores and memory)"
            )

    def _record(self, name: str) -> dict[str, Any] | None:
        path = self.state_dir(name) / PROCESS_NAME
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def _live_pid(self, name: str) -> int | None:
        """The run's process id while it runs, also for runs a previous page server started."""
        proc = self._procs.get(name)
        if proc is not None:
            if proc.poll() is None:
                return proc.pid
            self._finish(name, proc.returncode)
            return None
        record = self._record(name)
        if not record or record.get("returncode") is not None:
            return None
        return record["pid"] if _is_our_process(record["pid"], record["command"]) else None

    def _finish(self, name: str, returncode: int) -> None:
        self._procs.pop(name, None)
        self._stopping.discard(name)
        record = self._record(name) or {}
        record["returncode"] = returncode
        (self.state_dir(name) / PROCESS_NAME).write_text(json.dumps(record), encoding="utf-8")

    def active(self) -> str | None:
        """The name of the run that is running now, if any."""
        names = set(self._procs) | {p.name for p in self._state_dirs()}
        return next((n for n in sorted(names) if self._live_pid(n) is not None), None)

    # -- reading -------------------------------------------------------------------------

    def _state_dirs(self) -> list[Path]:
        """The page's launch folders, one per run it started (anything else there is ignored)."""
        if not self.state_root.is_dir():
            return []
        return [p for p in self.state_root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]

    def list_runs(self) -> list[str]:
        """Run names, newest first: lorafit run folders and runs this page started."""
        found: dict[str, float] = {}
        if self.root.is_dir():
            for p in self.root.iterdir():
                if (
                    p.is_dir()
                    and _NAME.fullmatch(p.name)
                    and ((p / RUN_CONFIG_NAME).is_file() or (p / METRICS_NAME).is_file())
                ):
                    found[p.name] = p.stat().st_mtime
        for p in self._state_dirs():
            found[p.name] = max(found.get(p.name, 0.0), p.stat().st_mtime)
        return sorted(found, key=lambda n: (-found[n], n))

    def finished(self) -> list[str]:
        """The runs that hold a trained adapter, newest first."""
        return [name for name in self.list_runs() if has_adapter(self.run_dir(name))]

    def view(self, name: str) -> RunView:
        """The run's state, progress from its output, and the files it has written so far."""
        run_dir = self.run_dir(name)
        running = self._live_pid(name) is not None  # first: it records the exit code of an ended run
        tail = log_tail(self.state_dir(name) / LOG_NAME)
        current = tail.rsplit("\n=== ", 1)[-1]  # the output of the latest start or resume
        metrics = read_metrics(run_dir / METRICS_NAME)
        state, message = self._state(name, run_dir, running, progress(current) is not None, tail)
        step, total = progress(tail) or (metrics[-1]["step"] if metrics else None, None)
        samples = run_dir / SAMPLES_NAME
        loss_png = run_dir / LOSS_PLOT_NAME
        return RunView(
            name=name,
            state=state,
            message=message,
            step=step,
            total=total,
            metrics=metrics,
            samples=samples.read_text(encoding="utf-8") if samples.is_file() else None,
            loss_png=loss_png if loss_png.is_file() else None,
            log_tail=tail,
        )

    def _state(self, name: str, run_dir: Path, running: bool, training: bool, tail: str) -> tuple[str, str]:
        if running:
            if name in self._stopping:
                return "stopping", "finishing the current step and saving a checkpoint"
            return ("running", "") if training else ("starting", "loading the data and the model")
        code = (self._record(name) or {}).get("returncode")
        last = last_checkpoint(run_dir) if run_dir.is_dir() else None
        if code == 0 or (code is None and has_adapter(run_dir)):
            return "finished", f"the adapter is in {run_dir}"
        if code in STOP_CODES or (code is None and last is not None):
            where = f"last checkpoint {last.name}; Resume continues from it" if last else "no checkpoint"
            return "stopped", where
        if code is not None:
            errors = [line for line in tail.splitlines() if "error:" in line]
            return "failed", errors[-1] if errors else f"lorafit train exited with code {code}"
        return "not running", "no adapter or checkpoint yet"


def _is_our_process(pid: int, command: list[str]) -> bool:
    """Whether ``pid`` is alive and is the run we started (not a later process given its id)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():  # not Linux: the pid check is all there is
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        args = (proc / "cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:  # it ended just now
        return False
    if state in ("Z", "X"):  # ended, not yet reaped by its parent
        return False
    # The command line reads empty for a moment while a fresh process is being exec'd.
    return not args or args == [c.encode() for c in command]
