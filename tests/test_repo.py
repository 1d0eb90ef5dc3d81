"""The README's commands are the ones CI runs, and the example from the README works."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_ci_runs_the_readme_test_command() -> None:
    install_and_demo, tests = _readme_commands()[:2]
    assert "lorafit train" in install_and_demo and "torch==2.13.0" in install_and_demo
    ci_lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    assert tests in ci_lines


def test_loralib_quickstart_example_runs(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples/loralib_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--steps", "50", "--out", str(tmp_path)]) <= 1e-5
    assert (tmp_path / "lora.pt").stat().st_size < (tmp_path / "pretrained.pt").stat().st_size
