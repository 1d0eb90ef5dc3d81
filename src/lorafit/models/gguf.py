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

Before any of that, the file's header is walked here (magic, version, metadata, tensor table) to
turn a missing file, a file that is not GGUF, and a truncated or corrupt one into one clear error
each, in milliseconds: ``gguf.GGUFReader`` takes ~6 s on SmolLM2's 49k-token vocabulary and fails
on a truncated file with a numpy reshape error.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafit.errors import LorafitError

GGUF_MAGIC = b"GGUF"
SUFFIX = ".gguf"
# lorafit's own layout of a cache folder; bump it when the folder's contents change meaning.
CACHE_FORMAT = 1
# Written last inside the temporary folder: a cache folder without it was not made by this module.
SOURCE_NAME = "lorafit_gguf.json"
_SAMPLE = 4 << 20  # bytes hashed at each end of the file for the cache key
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_VERSIONS = (2, 3)  # v1 (Aug 2023) used 32-bit counts and is long gone from llama.cpp
_MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF metadata value types -> struct format (8 = string and 9 = array are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file's header says, checked against the file's size."""

    path: Path  # resolved
    version: int
    architecture: str  # general.architecture, e.g. "llama"
    name: str | None  # general.name
    tensor_count: int
    n_elements: int  # weights in all tensors, for the dense size
    data_end: int  # where the last tensor's data ends: the file's expected size


class _Truncated(Exception):
    """The header claims bytes past the end of the file."""


class _Walker:
    """Reads GGUF's little- (or big-) endian header fields from a memory map, bounds-checked."""

    def __init__(self, buf: mmap.mmap, endian: str) -> None:
        self.buf, self.endian, self.pos = buf, endian, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise _Truncated
        self.pos += n

    def string(self) -> bytes:
        n = self.take("Q")
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start : start + n])

    def value(self, kind: int, keep: bool) -> Any:
        """One metadata value; strings and arrays are only skipped unless ``keep``."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            if keep:
                return self.string().decode("utf-8", errors="replace")
            self.skip(self.take("Q"))
            return None
        if kind == _ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _SCALARS:  # fixed size: one jump over the whole array
                self.skip(count * struct.calcsize(_SCALARS[item]))
            elif item in (_STRING, _ARRAY):
                for _ in range(count):  # e.g. the 49k tokens and merges of a vocabulary
                    self.value(item, keep=False)
            else:
                raise ValueError(f"an array of value type {item}, which is not a GGUF type")
            return None
        raise ValueError(f"value type {kind}, which is not a GGUF type (0-12)")


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``model.name_or_path`` names a GGUF file rather than a folder or a hub id.

    True for a name ending in ``.gguf`` (whether or not it exists, so that a missing or broken file
    gets :func:`read_gguf_header`'s error rather than "no such model on the hub") and for an
    existing file of any name that starts with GGUF's magic bytes (Ollama stores its models as
    ``sha256-<hex>`` blobs).
    """
    p = Path(path).expanduser()
    if p.name.lower().endswith(SUFFIX):
        return True
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_base_name(path: str | os.PathLike) -> str:
    """The name an adapter records as ``base_model_name_or_path`` for a GGUF base: its absolute path.

    Absolute, so that ``lorafit chat/eval/merge`` find the file from any working directory;
    :func:`is_gguf` recognises it there and :func:`load_gguf` loads the same dense base again (from
    the cache, while the file is unchanged).
    """
    return str(Path(path).expanduser().resolve())


def read_gguf_header(path: str | os.PathLike) -> GgufHeader:
    """Walk the file's header and tensor table; raise :class:`LorafitError` if it cannot be a model.

    One clear error each for: a missing file, a folder, a file that is not GGUF, an unsupported GGUF
    version, a header that runs past the end of the file or holds values no GGUF writer makes, and
    a file shorter than its tensor table says (an interrupted download or copy).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise LorafitError(
            f"GGUF file {path} does not exist (resolved to {p.resolve()}); model.name_or_path takes a "
            "GGUF file, a model folder or a Hugging Face hub id"
        )
    if not p.is_file():
        raise LorafitError(f"{path} is a folder, not a GGUF file; name the .gguf file inside it")
    p = p.resolve()
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if size < 4 and head and GGUF_MAGIC.startswith(head):
            raise _truncated(path, size, "its magic bytes")
        if head[:4] != GGUF_MAGIC:
            raise LorafitError(
                f"{path} is not a GGUF file: it starts with {head[:4]!r}, and a GGUF file starts with the "
                f"4 bytes {GGUF_MAGIC!r}. model.name_or_path takes a GGUF file (as llama.cpp, Ollama and "
                "LM Studio store them), a model folder or a Hugging Face hub id"
            )
        if size < 8:
            raise _truncated(path, size, "its version number")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(path, p, size, buf)


def _truncated(path: str | os.PathLike, size: int, what: str) -> LorafitError:
    return LorafitError(
        f"{path} is truncated or corrupt: its header runs past the end of the file ({size:,} bytes) while "
        f"reading {what}. Download or copy the file again; a complete GGUF file has its whole header "
        "and tensor table before the tensor data"
    )


def _walk(path: str | os.PathLike, resolved: Path, size: int, buf: mmap.mmap) -> GgufHeader:
    (version,) = struct.unpack_from("<I", buf, 4)
    endian = "<"
    if version not in _VERSIONS and struct.unpack_from(">I", buf, 4)[0] in _VERSIONS:
        endian = ">"  # llama.cpp writes big-endian GGUF for s390x; same layout, other byte order
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in _VERSIONS:
        raise LorafitError(
            f"{path} is GGUF version {version}; lorafit reads GGUF versions 2 and 3 (what llama.cpp has "
            "written since August 2023). Convert the model again with a current llama.cpp"
        )
    w = _Walker(buf, endian)
    w.pos = 8
    what = "the tensor and metadata counts"
    meta: dict[str, Any] = {}
    try:
        tensor_count, kv_count = w.take("Q"), w.take("Q")
        for i in range(kv_count):
            what = f"metadata entry {i + 1} of {kv_count}"
            key = w.string().decode("utf-8", errors="replace")
            what = f"metadata entry {i + 1} of {kv_count} ({key!r})"
            meta[key] = w.value(w.take("I"), keep=key in ("general.architecture", "general.name"))
        tensors: list[tuple[str, int, int, int]] = []  # name, ggml type, n_elements, offset
        for i in range(tensor_count):
            what = f"the description of tensor {i + 1} of {tensor_count}"
            name = w.string().decode("utf-8", errors="replace")
            n_dims = w.take("I")
            if n_dims > _MAX_DIMS:
                raise ValueError(f"tensor {name!r} with {n_dims} dimensions (GGUF allows up to {_MAX_DIMS})")
            n = 1
            for _ in range(n_dims):
                n *= w.take("Q")
            tensors.append((name, w.take("I"), n, w.take("Q")))
    except _Truncated:
        raise _truncated(path, size, what) from None
    except ValueError as e:
        raise LorafitError(
            f"{path} is corrupt: {what} holds {e}. Download or copy the file again, or convert the model "
            "again with a current llama.cpp"
        ) from None

    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise LorafitError(
            f"{path} has no general.architecture in its metadata, which every GGUF model file has "
            "(llama, qwen2, phi3, ...); it may be a LoRA adapter or vocabulary-only GGUF, not a model"
        )
    alignment = meta.get("general.alignment") or 32
    data_start = -(-w.pos // alignment) * alignment  # tensor data begins at the next aligned byte
    data_end = data_start
    for name, ggml_type, n, offset in tensors:
        nbytes = _tensor_bytes(path, name, ggml_type, n)
        data_end = max(data_end, data_start + offset + nbytes)
    if size < data_end:
        raise LorafitError(
            f"{path} is truncated: it is {size:,} bytes, but its tensor table says the tensor data runs to "
            f"{data_end:,} bytes ({data_end - size:,} bytes missing, as after an interrupted download or "
            "copy). Download or copy the file again"
        )
    return GgufHeader(
        path=resolved,
        version=version,
        architecture=arch,
        name=meta.get("general.name"),
        tensor_count=len(tensors),
        n_elements=sum(t[2] for t in tensors),
        data_end=data_end,
    )


def _tensor_bytes(path: str | os.PathLike, name: str, ggml_type: int, n: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        import gguf

        raise LorafitError(
            f"{path}: tensor {name!r} is stored as ggml type {ggml_type}, which the installed gguf package "
            f"({getattr(gguf, '__version__', 'unknown version')}) does not know; upgrade it with "
            "pip install -U gguf, or convert the model again to a common type (Q8_0, Q4_K_M, F16)"
        ) from None
    return n // block * type_size


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
