"""GGUF files (llama.cpp, Ollama, LM Studio) as base models: dequantized once, cached as safetensors.

A GGUF file holds a model's weights in ggml's quantized blocks (Q4_1, Q6_K, ...) together with its
config and its tokenizer (vocabulary, merges, special tokens, chat template). LoRA trains over plain
dense ``nn.Linear`` weights, so lorafit dequantizes the whole file into ``dtype`` through
transformers' own GGUF support (which knows each architecture's tensor names and layout, e.g.
llama.cpp's row permutation of Llama's q/k projections) and writes the result as an ordinary
transformers folder::

    $LORAFIT_CACHE/gguf/<file stem>-<dtype>-<key>/   # config.json, model.safetensors, tokenizer files

``<key>`` hashes the file's identity (resolved path, size, mtime, the first and last 4 MiB) with the
dtype and the transformers version, so a changed file or a transformers release with a different
conversion gets a new folder instead of a stale one. The folder is written under a temporary name
and renamed into place, so a crash, a full disk or two processes converting at once never leave a
half-written cache that a later run would trust. From then on the base loads from safetensors in
about 2 s instead of the conversion's 40-70 s (SmolLM2-135M on 2 shared CPU cores). Being a plain
folder, it loads with everything ``from_pretrained`` offers: 4-bit quantization for QLoRA, device maps.

transformers 5.24 has two GGUF paths. A few architectures (``lfm2``, ``qwen35``, ``qwen35moe``) can
keep their weights packed and run ggml kernels (the ``kernels`` package), which cannot train; every
other architecture (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, ...) goes through the legacy loader,
which dequantizes each tensor with ``gguf.quants.dequantize`` to float32 numpy and casts it to the
dtype asked for. ``GgufConfig(dequantize=True)`` makes both paths dense and silences the warning
that the legacy path prints although its weights are already dense ("... packed is fastest in
float32 ... the weights stay quantized regardless").

Before any of that, the file's header is checked (:mod:`lorafit.models.gguf_header`), so that a
bad file is one clear error in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorafit.errors import LorafitError
from lorafit.models.gguf_header import GgufHeader, gguf_base_name, is_gguf, read_gguf_header

__all__ = [
    "SOURCE_NAME",
    "GgufHeader",
    "cache_root",
    "ensure_gguf_cache",
    "gguf_base_name",
    "gguf_cache_dir",
    "is_gguf",
    "load_gguf",
    "read_gguf_header",
]

# lorafit's own layout of a cache folder; bump it when the folder's contents change meaning.
CACHE_FORMAT = 1
# Written last inside the temporary folder: a cache folder without it was not made by this module.
SOURCE_NAME = "lorafit_gguf.json"
_SAMPLE = 4 << 20  # bytes hashed at each end of the file for the cache key
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype_name(dtype: torch.dtype | str, path: str | os.PathLike | None = None) -> str:
    """``"bfloat16"`` for ``torch.bfloat16`` or ``"bfloat16"``; ``"auto"`` is float32."""
    if dtype == "auto":
        # a GGUF file stores blocks, not a float type to keep; float32 holds every
        # dequantized value exactly (it is what gguf's dequantize computes in)
        return "float32"
    for name, value in _DTYPES.items():
        if dtype in (name, value):
            return name
    raise LorafitError(
        f"cannot load the GGUF file {path} in {dtype}; model.torch_dtype takes {', '.join(_DTYPES)} or auto"
    )


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$LORAFIT_CACHE``, else ``~/.cache/lorafit``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LORAFIT_CACHE") or Path.home() / ".cache" / "lorafit")


def gguf_cache_dir(
    path: str | os.PathLike, *, dtype: torch.dtype | str, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Where the dense ``dtype`` copy of the GGUF file at ``path`` is (or will be) cached.

    The key covers what changes the converted weights: the file (resolved path, size, mtime in ns,
    a SHA-256 of its first and last 4 MiB, which hold the header and the end of the data), the dtype,
    the transformers version (its conversion code) and this module's folder layout.
    """
    import transformers

    p = Path(path).expanduser().resolve()
    st = p.stat()
    sample = hashlib.sha256()
    with open(p, "rb") as f:
        sample.update(f.read(_SAMPLE))
        if st.st_size > 2 * _SAMPLE:
            f.seek(-_SAMPLE, os.SEEK_END)
        sample.update(f.read(_SAMPLE))
    identity = {
        "format": CACHE_FORMAT,
        "path": str(p),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sample_sha256": sample.hexdigest(),
        "dtype": _dtype_name(dtype, p),
        "transformers": transformers.__version__,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem)[:80] or "model"
    return cache_root(cache_dir) / "gguf" / f"{stem}-{identity['dtype']}-{key}"


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_NAME).is_file()


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike | None = None,
    echo: Callable[[str], Any] | None = None,
) -> tuple[torch.nn.Module, Any]:
    """The GGUF file's model, dense in ``dtype``, and its tokenizer (with the file's chat template).

    The first call converts the file (transformers' GGUF loader, every weight dequantized) and caches
    the result as safetensors (see the module docstring); it returns the converted objects as they
    are. Later calls load the cache folder. ``echo``, if given, is told when a conversion starts and
    where its result went. Raises :class:`LorafitError` for a missing, non-GGUF, truncated or corrupt
    file and for an architecture transformers cannot load; then nothing is written.
    """
    header = read_gguf_header(path)
    folder = gguf_cache_dir(header.path, dtype=dtype, cache_dir=cache_dir)
    if _is_complete(folder):
        return _load_folder(folder, header.path, dtype, attn_implementation)
    _check_room(header, folder, dtype)
    model, tokenizer = _convert(header, dtype, attn_implementation, echo)
    _publish(model, tokenizer, header, folder, dtype, echo)
    return model, tokenizer


def ensure_gguf_cache(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    cache_dir: str | os.PathLike | None = None,
    echo: Callable[[str], Any] | None = None,
) -> Path:
    """The cache folder of the GGUF file's dense ``dtype`` copy, converting the file if it has none.

    The folder is an ordinary transformers model folder (``config.json``, ``model.safetensors``,
    tokenizer files), for ``AutoModelForCausalLM.from_pretrained`` with any of its options.
    """
    header = read_gguf_header(path)
    folder = gguf_cache_dir(header.path, dtype=dtype, cache_dir=cache_dir)
    if not _is_complete(folder):
        _check_room(header, folder, dtype)
        model, tokenizer = _convert(header, dtype, "sdpa", echo)
        _publish(model, tokenizer, header, folder, dtype, echo)
    return folder


def _supported_architectures() -> list[str]:
    """The GGUF architectures transformers loads, for the error message (best effort)."""
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # a transformers release that moved them: the message just lists none
        return []
    return sorted((set(GGUF_SUPPORTED_ARCHITECTURES) | set(GGUF_ARCHS)) - {"general", "tokenizer"})


def _convert(
    header: GgufHeader, dtype: torch.dtype | str, attn_implementation: str, echo: Callable[[str], Any] | None
) -> tuple[torch.nn.Module, Any]:
    """The file as a dense transformers model and tokenizer, in memory (nothing written)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dtype_name = _dtype_name(dtype)
    if echo is not None:
        echo(
            f"Converting {header.path} ({header.architecture}, {header.tensor_count} tensors) to a dense "
            f"{dtype_name} model; this happens once, later runs load the cached copy."
        )
    folder, name = str(header.path.parent), header.path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=_DTYPES[dtype_name],
            attn_implementation=attn_implementation,
            # dense nn.Linear weights for LoRA; without it a few architectures stay packed (untrainable)
            quantization_config=GgufConfig(dequantize=True),
            output_loading_info=True,
        )
    except (ValueError, KeyError, NotImplementedError, OSError, RuntimeError, TypeError) as e:
        text = " ".join(str(e).split())
        if "not supported" in text and header.architecture in text:
            known = _supported_architectures()
            listing = f": {', '.join(known)}" if known else ""
            raise LorafitError(
                f"{header.path} holds a '{header.architecture}' model, which transformers "
                f"{transformers.__version__} cannot load from GGUF. It loads these GGUF architectures"
                f"{listing}. Use the model's safetensors folder or hub id instead, if it has one"
            ) from None
        raise LorafitError(
            f"could not convert the GGUF file {header.path} ({header.architecture}) with transformers "
            f"{transformers.__version__}: {text}"
        ) from None
    # A weight the file lacks would be left at its random init and trained over without a word.
    missing = info.get("missing_keys") or []
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        raise LorafitError(
            f"{header.path}: transformers {transformers.__version__} found no weights in the file for "
            f"{len(missing)} parameters of its {type(model).__name__} ({shown}); the file does not match "
            "what transformers expects of a GGUF "
            f"'{header.architecture}' model, so its weights would be partly random"
        )
    return model, tokenizer


def _check_room(header: GgufHeader, folder: Path, dtype: torch.dtype | str) -> None:
    """Refuse before converting (which takes a while) if the cache's disk cannot hold the copy."""
    itemsize = torch.empty((), dtype=_DTYPES[_dtype_name(dtype)]).element_size()
    needed = header.n_elements * itemsize + (64 << 20)  # weights plus room for tokenizer and config
    probe = folder.parent
    while not probe.exists() and probe != probe.parent:  # the folder the cache would be made in
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise LorafitError(
            f"{folder.parent}: only {free / 2**20:.0f} MiB free on its disk, and the dense "
            f"{_dtype_name(dtype)} copy of {header.path} needs about {needed / 2**20:.0f} MiB. Free some "
            "space or point $LORAFIT_CACHE at a larger disk"
        )


def _publish(
    model: torch.nn.Module,
    tokenizer: Any,
    header: GgufHeader,
    folder: Path,
    dtype: torch.dtype | str,
    echo: Callable[[str], Any] | None,
) -> None:
    """Write the converted model into ``folder`` atomically: a temporary folder, then one rename."""
    import transformers

    root = folder.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}.", suffix=".tmp"))
    except OSError as e:
        raise LorafitError(
            f"could not create the cache folder for {header.path} in {root}: {e}; set $LORAFIT_CACHE "
            "to a writable folder"
        ) from None
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {
            "gguf_file": str(header.path),
            "size": header.path.stat().st_size,
            "mtime_ns": header.path.stat().st_mtime_ns,
            "architecture": header.architecture,
            "name": header.name,
            "dtype": _dtype_name(dtype),
            "transformers": transformers.__version__,
            "format": CACHE_FORMAT,
        }
        (tmp / SOURCE_NAME).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(folder):  # not a concurrent conversion that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process published the same copy first
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise LorafitError(
                f"could not write the converted copy of {header.path} to {folder}: {e}; nothing was kept"
            ) from None
        raise
    if echo is not None:
        echo(f"Cached the dense copy of {header.path.name} in {folder}")


def _load_folder(
    folder: Path, source: Path, dtype: torch.dtype | str, attn_implementation: str
) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=_DTYPES[_dtype_name(dtype)], attn_implementation=attn_implementation
        )
    except (OSError, ValueError, KeyError) as e:
        why = " ".join(str(e).split())
        raise LorafitError(
            f"the cached dense copy of {source} in {folder} could not be loaded ({why}); "
            "delete that folder and run again to convert the GGUF file anew"
        ) from None
    return model, tokenizer
