"""Loading a 16-bit safetensors checkpoint straight into a 4-bit NF4 model, one tensor at a time.

``from_pretrained(quantization_config=...)`` maps each checkpoint file whole and leaves the mapping
alive after quantizing it: every 16-bit page it read stays in the process's resident memory
(Phi-3-mini: the 7.6 GB bf16 file beside its 2.3 GB 4-bit copy). This loader builds the model's
skeleton with no weights (``accelerate.init_empty_weights``: parameters on the meta device, buffers
such as RoPE's frequencies real), swaps its linear layers for bitsandbytes ``Linear4bit`` exactly
as transformers' quantizer does, then reads the checkpoint tensor by tensor with plain positioned
reads (no mmap) into a fresh tensor. A decoder linear weight is quantized at once and its 16-bit
copy freed, so at most one 16-bit tensor (the largest: the embedding or the head) is held beside
the 4-bit model; the file's pages stay in the page cache, which is the kernel's, not the process's.

The 4-bit weights are bnb's ``Params4bit`` built from the same 16-bit tensor with the same
settings as transformers' ``Bnb4bitQuantize`` builds them, so they are the same bits
(``tests/models/test_quant_load.py``). What stays 16-bit is what transformers leaves 16-bit: the
embedding, the output head (once, when tied) and the norms (which :func:`prepare_kbit_model` then
widens to fp32).

The safetensors layout read here: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}``, then the data,
offsets counted from the end of the header, little-endian.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorafit.errors import LorafitError

_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def checkpoint_files(folder: str | Path) -> list[Path] | None:
    """The safetensors files of a transformers folder in index order, or None if it has none."""
    folder = Path(folder).expanduser()
    if (folder / _INDEX).is_file():
        try:
            weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise LorafitError(f"{folder / _INDEX}: not a safetensors index ({e})") from None
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    if (folder / _SINGLE).is_file():
        return [folder / _SINGLE]
    return None


def local_folder(name: str | Path, revision: str | None = None) -> Path | None:
    """``name`` as a local folder: itself, or a hub repository's snapshot with its config and
    safetensors files (downloaded into the hub cache if they are not there, as ``from_pretrained``
    would); None where neither works (``from_pretrained`` then says why)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name).count("/") > 1 or str(name).startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(name),
                revision=revision,
                allow_patterns=["*.json", "*.safetensors"],
            )
        )
    except (OSError, ValueError):  # offline, gated, missing, not a repo id: from_pretrained says it
        return None


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """``({tensor name: its entry}, offset of the data)`` of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise LorafitError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise LorafitError(f"{path}: the safetensors header is not JSON ({e})") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if entry.get("dtype") not in _DTYPES:
            raise LorafitError(
                f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, which lorafit cannot read"
            )
    return header, 8 + n


def read_tensor(f: Any, path: Path, name: str, entry: dict[str, Any], data_start: int) -> torch.Tensor:
    """One tensor of an open safetensors file (``f`` unbuffered), read into new memory."""
    begin, end = entry["data_offsets"]
    tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
    view = tensor.reshape(-1).view(torch.uint8)
    if view.numel() != end - begin:
        raise LorafitError(
            f"{path}: tensor {name} spans {end - begin} bytes, but its shape {entry['shape']} "
            f"of {entry['dtype']} needs {view.numel()}"
        )
    buffer = memoryview(view.numpy())
    f.seek(data_start + begin)
    done = 0
    while done < len(buffer):
        got = f.readinto(buffer[done:])
        if not got:
            raise LorafitError(f"{path}: the file ends inside tensor {name}")
        done += got
    return tensor


def new_linear4bit(module: nn.Linear, settings: dict[str, Any], compute: torch.dtype) -> nn.Module:
    """An empty (meta) ``Linear4bit`` for ``module``, with the settings transformers' quantizer gives it."""
    from lorafit.models.quant import require_bitsandbytes

    bnb = require_bitsandbytes()
    storage = settings.get("bnb_4bit_quant_storage", "uint8")
    with torch.device("meta"):
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            module.bias is not None,
            compute,
            compress_statistics=bool(settings.get("bnb_4bit_use_double_quant", False)),
            quant_type=settings.get("bnb_4bit_quant_type", "nf4"),
            quant_storage=getattr(torch, storage),
        )
    q.requires_grad_(False)
    return q


def load_4bit(
    folder: str | Path,
    settings: dict[str, Any],
    *,
    dtype: torch.dtype | str,
    attn_implementation: str | None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> nn.Module | None:
    """The causal LM in ``folder`` with its decoder's linear layers in 4 bits, loaded tensor by tensor.

    ``folder``: a local folder or a hub id (its config and safetensors files fetched into the hub
    cache as ``from_pretrained`` would, at ``revision``). ``dtype`` is the 16-bit dtype of the
    rest (``"auto"``: the checkpoint's own). None when this loader does not read the folder (no
    safetensors; stored quantized; checkpoint names that are not the model's parameters, as for a
    model transformers renames while loading): the caller then loads it through
    ``from_pretrained``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from lorafit.constants import torch_dtype
    from lorafit.models.quant import check_settings, require_bitsandbytes

    bnb = require_bitsandbytes()
    check_settings(settings)
    source, folder = str(folder), local_folder(folder, revision)
    files = checkpoint_files(folder) if folder is not None else None
    if not files:
        return None
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None):
        return None  # stored quantized: transformers deserializes it
    headers = {path: read_header(path) for path in files}
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    model.tie_weights()  # on the meta device too: a tied head is the embedding's name, not a weight to read
    params = dict(model.named_parameters())
    buffers = {name for name, _ in model.named_buffers()}
    names = {name for header, _ in headers.values() for name in header}
    head = model.get_output_embeddings()
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if name not in params}
    if not names <= set(params) | buffers | tied or set(params) - names - tied:
        return None
    # As transformers' quantizer: every plain linear layer but the output head and the skipped ones.
    skip = set(settings.get("llm_int8_skip_modules") or [])
    compute = torch_dtype(settings.get("bnb_4bit_compute_dtype", "float32"))
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not head and name.rsplit(".", 1)[-1] not in skip:
            model.set_submodule(name, new_linear4bit(module, settings, compute))
    for path, (header, data_start) in headers.items():
        with open(path, "rb", buffering=0) as f:
            for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
                if name in tied:
                    continue
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name)
                value = read_tensor(f, path, name, header[name], data_start)
                if isinstance(owner, bnb.nn.Linear4bit) and leaf == "weight":
                    # the same Params4bit transformers builds: quantized by .to() on the CPU
                    kept = owner.weight.__dict__
                    owner.weight = bnb.nn.Params4bit(value.to(dtype), requires_grad=False, **kept).to("cpu")
                elif leaf in owner._parameters:
                    old = owner._parameters[leaf]
                    wanted = old.dtype if old.is_floating_point() else value.dtype
                    owner._parameters[leaf] = nn.Parameter(value.to(wanted), requires_grad=old.requires_grad)
                else:
                    owner._buffers[leaf] = value.to(owner._buffers[leaf].dtype)
                del value
    model.tie_weights()  # the tied head onto the embedding just read
    left = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise LorafitError(f"{folder}: the checkpoint has no weights for {', '.join(left[:5])}")
    _return_freed_heap()
    model.is_quantized = True
    model.is_loaded_in_4bit = True
    model.config.name_or_path = source  # as from_pretrained: the name given
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def _return_freed_heap() -> None:
    """Hand the heap pages freed while loading back to the kernel (glibc's ``malloc_trim``).

    The 16-bit tensors and quantization temporaries under glibc's mmap threshold (32 MiB once
    :func:`lorafit.training.run.keep_freed_memory` fixed it) are freed into the heap between the
    4-bit weights kept, and lorafit never trims it: without this they stay resident (0.12 GB at
    Phi-3-mini's widths with 2 layers). Linux with glibc only; elsewhere nothing happens.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other libcs
        return
    trim(0)
