"""The Export tab: a run's adapter merged into its base model, written inside the run folder.

``lorafit.export.save_merged`` does the work (as ``lorafit merge`` does): every LoRA update is
folded into its base weight and the result saved as a plain transformers model folder. The page
writes it to ``RUN/NAME`` only, with NAME a plain folder name that must be new, so an export
never lands outside the run folder or over an earlier one.
"""

from __future__ import annotations

from pathlib import Path

from lorafit.ui.runs import check_name, require_adapter


def merged_folder(run_dir: Path, name: str) -> Path:
    """``run_dir / name`` for a merged model: a plain, new folder name inside the run folder."""
    from lorafit.export import check_new_folder

    out = run_dir / check_name(name, "merged model folder", f"the run folder {run_dir}")
    check_new_folder(out)
    return out


def merge_run(run_dir: Path, name: str) -> tuple[Path, list[tuple[str, int]]]:
    """Merge the run's adapter into its base and save it in ``run_dir / name``.

    Returns the folder and its files with their sizes in bytes. A 4-bit (QLoRA) base is
    dequantized first, so the merged model is 16-bit.
    """
    from lorafit.export import save_merged
    from lorafit.models import load_trained

    out = merged_folder(require_adapter(run_dir), name)  # checked before the model loads
    cfg, tokenizer, model = load_trained(run_dir)
    save_merged(model, tokenizer, out, quantized=bool(cfg.model.quantization))
    files = sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file())
    return out, files
