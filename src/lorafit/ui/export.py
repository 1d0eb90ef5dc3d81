"""The Export tab: a run's adapter merged into its base model, written inside the run folder.

Two forms, both lorafit's own functions: a plain transformers model folder
(``lorafit.export.save_merged``, what ``lorafit merge`` writes), or one GGUF file for llama.cpp,
Ollama and LM Studio (``merge_into_base`` then ``export_gguf``) with an Ollama ``Modelfile``
beside it (``write_modelfile``). The page writes to ``RUN/NAME`` only, with NAME a plain folder
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


def merge_run(run_dir: Path, name: str) -> tuple[Path, list[tuple[str, int]]]:
    """Merge the run's adapter into its base and save it in ``run_dir / name``.

    Returns the folder and its files with their sizes in bytes. A 4-bit (QLoRA) base is
    dequantized first, so the merged model is 16-bit.
    """
    from lorafit.export import save_merged
    from lorafit.models import load_trained

    out = export_folder(require_adapter(run_dir), name)  # checked before the model loads
    cfg, tokenizer, model = load_trained(run_dir)
    save_merged(model, tokenizer, out, quantized=bool(cfg.model.quantization))
    return out, _listing(out)


def gguf_run(run_dir: Path, name: str, dtype: str = "f16") -> tuple[Path, list[tuple[str, int]], str]:
    """Merge the run's adapter and write ``run_dir/name/model-DTYPE.gguf`` and its Modelfile.

    Returns the folder, its files, and a note on which base weights went in: for a QLoRA run
    they are the 4-bit base dequantized (the weights the adapter was trained against).
    """
    import warnings

    from lorafit.errors import LorafitError
    from lorafit.export import export_gguf, merge_into_base, write_modelfile
    from lorafit.models import load_trained

    if dtype not in GGUF_DTYPES:
        raise LorafitError(f"GGUF type {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    out = export_folder(require_adapter(run_dir), name)
    cfg, tokenizer, model = load_trained(run_dir)
    quantized = bool(cfg.model.quantization)
    merge_into_base(model, quantized=quantized)
    out.mkdir(parents=True)
    filename = f"model-{dtype}.gguf"
    with warnings.catch_warnings(record=True) as caught:  # shown on the page, not lost in a log
        warnings.simplefilter("always")
        export_gguf(model, tokenizer, out / filename, dtype=dtype)
        write_modelfile(out, filename, tokenizer)
    notes = [str(w.message) for w in caught]
    if quantized:
        notes.insert(0, "base weights: the 4-bit NF4 base dequantized, as the adapter was trained on it")
    return out, _listing(out), "; ".join(notes)
