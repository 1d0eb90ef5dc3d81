"""A GGUF file's header, walked without gguf-py: magic, version, metadata, tensor table.

Checked against the file's size, so that a missing file, a file that is not GGUF, and a truncated
or corrupt one get one clear error each, in milliseconds: ``gguf.GGUFReader`` takes ~6 s on
SmolLM2's 49k-token vocabulary and fails on a truncated file with a numpy reshape error.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError

GGUF_MAGIC = b"GGUF"
SUFFIX = ".gguf"
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
