"""A run's adapter out of lorafit: the one flow behind ``lorafit merge``, ``lorafit export`` and the
page's Export tab.

Three forms:

- ``merged``: the adapter folded into its base, a transformers model folder (:func:`save_merged`).
- ``gguf``: the merged model as one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama
  ``Modelfile`` beside it. Each weight is merged in fp32 and rounded once, to the file's type
  (``export_gguf(..., merge=True)``).
- ``lora``: the adapter alone as a GGUF LoRA file, for llama.cpp's ``--lora`` over the base.

A QLoRA run's adapter goes onto the base's original 16-bit weights, not their NF4 rounding. Every
check that needs no model (the type, the target, a Modelfile in the way) runs before the model
loads, and nothing is ever written over. What loading has to say goes to ``echo`` as it happens;
the exporter's notes (what llama.cpp or Ollama will do differently) come back in the result.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError
from lorafit.export.gguf import check_target, export_gguf
from lorafit.export.gguf_lora import export_lora_gguf
from lorafit.export.merged import check_new_folder, save_merged
from lorafit.export.ollama import MODELFILE_NAME, write_modelfile

FORMS = ("merged", "gguf", "lora")
GGUF_DTYPES = ("f16", "bf16", "q8_0")  # a merged model's weights in the file
LORA_DTYPES = ("f16", "f32")  # a LoRA file's A and B


@dataclass
class Exported:
    """What :func:`export_run` wrote."""

    path: Path  # the model folder (merged) or the GGUF file (gguf, lora)
    files: list[Path]  # every file written
    notes: list[str] = field(default_factory=list)  # the exporter's notes, one sentence each


def export_run(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    form: str = "gguf",
    dtype: str | None = None,
    echo: Callable[[str], Any] = print,
    progress: Callable[[int, int], None] | None = None,
) -> Exported:
    """Write the adapter of the run (or PEFT adapter) folder ``adapter`` in ``form`` to ``out``.

    Args:
        adapter: a lorafit run folder or any PEFT adapter folder whose base lorafit can load.
        out: the new (or empty) model folder for ``merged``; the new GGUF file's path for ``gguf``
            (its ``Modelfile`` goes beside it) and ``lora``.
        form: ``"merged"``, ``"gguf"`` or ``"lora"`` (see the module docstring).
        dtype: the file's type: ``f16`` (default), ``bf16`` or ``q8_0`` for ``gguf``; ``f16``
            (default) or ``f32`` for ``lora``. A ``merged`` folder keeps the base's dtype.
        echo: told what loading the base has to say (a dtype changed, which weights the adapter
            goes onto) as it happens.
        progress: ``gguf`` only: called after each tensor is written with the count written and
            the file's total.

    Raises LorafitError, before the model loads, for an unknown form or type, an existing file or
    folder at ``out``, or an existing ``Modelfile`` beside a GGUF file.
    """
    adapter, out = Path(adapter), Path(out)
    if form == "merged":
        return _merged(adapter, out, echo)
    if form == "lora":
        return _lora(adapter, out, dtype or "f16")
    if form == "gguf":
        return _gguf(adapter, out, dtype or "f16", echo, progress)
    raise LorafitError(f"export form {form!r}: expected one of {', '.join(FORMS)}")


def _merged(adapter: Path, out: Path, echo: Callable[[str], Any]) -> Exported:
    from lorafit.models import load_trained

    check_new_folder(out)
    # a QLoRA run merges into the base's original 16-bit weights, not their NF4 rounding
    _, tokenizer, model = load_trained(adapter, sixteen_bit=True, echo=echo)
    save_merged(model, tokenizer, out, quantized=False)
    return Exported(out, sorted(p for p in out.iterdir() if p.is_file()))


def _lora(adapter: Path, out: Path, dtype: str) -> Exported:
    from lorafit.models.load import base_config

    if dtype not in LORA_DTYPES:
        raise LorafitError(f"GGUF LoRA type {dtype!r}: expected one of {', '.join(LORA_DTYPES)}")
    check_target(out, overwrite=False)
    export_lora_gguf(base_config(adapter), adapter, out, dtype=dtype)
    return Exported(out, [out])


def _gguf(
    adapter: Path,
    out: Path,
    dtype: str,
    echo: Callable[[str], Any],
    progress: Callable[[int, int], None] | None,
) -> Exported:
    from lorafit.models import load_trained

    if dtype not in GGUF_DTYPES:
        raise LorafitError(f"GGUF type {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    check_target(out, overwrite=False)
    modelfile = out.parent / MODELFILE_NAME
    if modelfile.exists():
        raise LorafitError(f"{modelfile} already exists; export into a new folder (--out NEW/model.gguf)")
    cfg, tokenizer, model = load_trained(adapter, sixteen_bit=True, echo=echo)
    notes: list[str] = []
    export_gguf(model, tokenizer, out, dtype=dtype, merge=True, progress=progress, notes=notes.append)
    write_modelfile(out.parent, out.name, tokenizer, tools=bool(cfg.data.tools), notes=notes.append)
    return Exported(out, [out, modelfile], notes)
