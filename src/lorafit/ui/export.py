"""The Export tab: a run's adapter merged into its base model, written inside the run folder.

Two forms, each the steps of its command: a plain transformers model folder (``save_merged``,
as ``lorafit merge``), or one GGUF file for llama.cpp, Ollama and LM Studio (``merge_into_base``
then ``export_gguf``) with an Ollama ``Modelfile`` beside it (``write_modelfile``), as
``lorafit export``. The page writes to ``RUN/NAME`` only, with NAME a plain folder
name that must be new, so an export never lands outside the run folder or over an earlier one.
"""

from __future__ import annotations

from pathlib import Path

from lorafit.ui.runs import check_name, require_adapter

GGUF_DTYPES = ("f16", "bf16", "q8_0")


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
    from lorafit.export import save_merged
    from lorafit.models import load_trained

    out = export_folder(require_adapter(run_dir), name)  # checked before the model loads
    notes: list[str] = []
    _, tokenizer, model = load_trained(run_dir, sixteen_bit=True, echo=notes.append)
    save_merged(model, tokenizer, out, quantized=False)
    return out, _listing(out), "; ".join(notes)


def gguf_run(run_dir: Path, name: str, dtype: str = "f16") -> tuple[Path, list[tuple[str, int]], str]:
    """Merge the run's adapter and write ``run_dir/name/model-DTYPE.gguf`` and its Modelfile, as
    ``lorafit export`` does (a QLoRA run onto the base's original 16-bit weights).

    Returns the folder, its files, and the notes of lorafit and of the exporter (which weights
    went in, what llama.cpp may read differently).
    """
    import warnings

    from lorafit.errors import LorafitError
    from lorafit.export import export_gguf, merge_into_base, write_modelfile
    from lorafit.models import load_trained

    if dtype not in GGUF_DTYPES:
        raise LorafitError(f"GGUF type {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    out = export_folder(require_adapter(run_dir), name)
    notes: list[str] = []
    _, tokenizer, model = load_trained(run_dir, sixteen_bit=True, echo=notes.append)
    merge_into_base(model, quantized=False)
    out.mkdir(parents=True, exist_ok=True)
    filename = f"model-{dtype}.gguf"
    with warnings.catch_warnings(record=True) as caught:  # shown on the page, not lost in a log
        warnings.simplefilter("always", UserWarning)
        export_gguf(model, tokenizer, out / filename, dtype=dtype)
        write_modelfile(out, filename, tokenizer)
    # the exporter's own notes, as lorafit export prints them; other libraries' chatter is dropped
    notes += [str(w.message) for w in caught if str(w.message).startswith(("GGUF export", "Modelfile"))]
    return out, _listing(out), "; ".join(notes)
