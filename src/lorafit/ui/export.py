"""The Export tab: a run's adapter merged into its base model, written inside the run folder.

Two forms, through the flow the commands use (:func:`lorafit.export.flow.export_run`): a plain
transformers model folder, as ``lorafit merge``, or one GGUF file for llama.cpp, Ollama and LM
Studio with an Ollama ``Modelfile`` beside it, as ``lorafit export``. The page writes to
``RUN/NAME`` only, with NAME a plain folder name that must be new, so an export never lands outside
the run folder or over an earlier one.
"""

from __future__ import annotations

from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.export.flow import GGUF_DTYPES, export_run
from lorafit.ui.runs import check_name, require_adapter


def export_folder(run_dir: Path, name: str) -> Path:
    """``run_dir / name`` for an export: a plain, new folder name inside the run folder."""
    from lorafit.export import check_new_folder

    out = run_dir / check_name(name, "export folder", f"the run folder {run_dir}")
    check_new_folder(out)
    return out


def _listing(out: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file())


def merge_run(run_dir: Path, name: str) -> tuple[Path, list[tuple[str, int]], str]:
    """Merge the run's adapter into its base and save it in ``run_dir / name``, as ``lorafit
    merge`` does (a QLoRA run onto the base's original 16-bit weights).

    Returns the folder, its files with their sizes in bytes, and lorafit's notes on the weights.
    """
    out = export_folder(require_adapter(run_dir), name)  # checked before the model loads
    notes: list[str] = []
    export_run(run_dir, out, form="merged", echo=notes.append)
    return out, _listing(out), "; ".join(notes)


def gguf_run(run_dir: Path, name: str, dtype: str = "f16") -> tuple[Path, list[tuple[str, int]], str]:
    """Merge the run's adapter and write ``run_dir/name/model-DTYPE.gguf`` and its Modelfile, as
    ``lorafit export`` does (a QLoRA run onto the base's original 16-bit weights).

    Returns the folder, its files, and the notes of lorafit and of the exporter (which weights
    went in, what llama.cpp may read differently).
    """
    if dtype not in GGUF_DTYPES:  # before the folder name is judged, as the page always did
        raise LorafitError(f"GGUF type {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    out = export_folder(require_adapter(run_dir), name)
    notes: list[str] = []
    result = export_run(run_dir, out / f"model-{dtype}.gguf", form="gguf", dtype=dtype, echo=notes.append)
    return out, _listing(out), "; ".join(notes + result.notes)
