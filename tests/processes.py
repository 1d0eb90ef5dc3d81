"""Real ``lorafit train`` processes for the reliability tests of every method (tests/training/
test_run.py, test_distributed.py, test_preference_engine.py): a run started in a process of its
own that pauses itself at a step, torchrun launches over gloo, the demo model poisoned with an
inf embedding, and a run's metrics rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import lorafit

SRC = Path(lorafit.__file__).resolve().parents[1]  # the lorafit the tests import, for the children
TESTS = Path(__file__).resolve().parent  # tests/, for the helpers a child imports (tiny.py)
# Two processes against one, same global batch: losses agree to this, absolute, per logged step
# (measured: SFT in test_distributed.py within 9.5e-7, DPO in test_preference_engine.py within 4.2e-7).
LOSS_TOLERANCE = 1e-5
POISON = "<|placeholder3|>"  # the demo tokenizer's token whose embedding poisoned_demo_model sets to inf


def child_env(cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a child process: this lorafit and tests/ first on its path, one thread
    (processes on shared cores: threads would only fight), the tokenisation cache ``cache``."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "LORAFIT_CACHE": str(cache),
        **extra,
    }


def start(args: list[str], work: Path, log: str, pause_at: int | None = None) -> subprocess.Popen:
    """``lorafit train`` in a process of its own (in ``work``, stdout and stderr to ``work/log.out``
    and ``.err``); with ``pause_at``, the run stops itself after that step
    (``LORAFIT_PAUSE_AT_STEP``) until the test sends SIGCONT: a signal sent then certainly reaches
    a run mid-way, however fast the machine."""
    env = child_env(
        work / "cache", **({"LORAFIT_PAUSE_AT_STEP": str(pause_at)} if pause_at is not None else {})
    )
    with open(work / f"{log}.out", "w") as out, open(work / f"{log}.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "lorafit", "train", *args], env=env, stdout=out, stderr=err, cwd=work
        )


def wait_paused(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the run has stopped itself (``pause_at``): its state in /proc is T."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it paused"
        assert time.monotonic() < deadline, "the run did not pause"
        time.sleep(0.01)


def kill_when_paused(args: list[str], work: Path, run: Path, pause_at: int, last_step: int) -> None:
    """Start ``lorafit train ARGS`` paused after step ``pause_at``, check that step's checkpoint,
    SIGKILL it, and check it left neither the final adapter nor the last step's checkpoint."""
    proc = start(args, work, run.name, pause_at=pause_at)
    wait_paused(proc)
    assert (run / f"checkpoint-{pause_at}").is_dir()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "adapter_model.safetensors").exists()
    assert not (run / f"checkpoint-{last_step}").exists()


def torchrun(args: list[str], cwd: Path, cache: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc ARGS`` (gloo on CPU); asserts it succeeded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(
        [*cmd, *args], cwd=cwd, env=child_env(cache), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def rows(run: Path, key: str = "loss") -> list[dict]:
    """The rows of the run's ``metrics.jsonl`` that hold ``key``."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def poisoned_demo_model(folder: Path) -> Path:
    """The demo model (fp32) with the embedding of ``POISON`` set to inf, saved with its tokenizer
    as a model folder (returned): a step that trains on a record holding ``POISON`` has a NaN loss."""
    from lorafit.demo import build_demo_model, load_demo_tokenizer

    tokenizer = load_demo_tokenizer()
    model = build_demo_model(torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(POISON)] = float("inf")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def assert_stopped_before_a_non_finite_update(err: str, run: Path) -> int:
    """What a run stopped by a non-finite step said (``err``) and left in ``run``: the step named,
    how to go on, the last good checkpoint finite, nothing of the bad step. Returns the step."""
    from safetensors.torch import load_file

    step = int(err.split("error: step ")[1].split(":")[0])
    assert "the loss and gradients are not finite (NaN or inf)" in err and "--skip-nonfinite" in err
    assert "Traceback" not in err
    if step > 1:
        assert f"The last good checkpoint is {run / f'checkpoint-{step - 1}'}" in err
        saved = load_file(run / f"checkpoint-{step - 1}" / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in saved.values())
    else:
        assert "No checkpoint was saved before this" in err
    assert not (run / f"checkpoint-{step}").exists() and not (run / "adapter_model.safetensors").exists()
    return step
