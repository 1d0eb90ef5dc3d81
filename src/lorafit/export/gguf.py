"""A merged model as one GGUF file for llama.cpp, Ollama and LM Studio, written in-process with
the ``gguf`` package (llama.cpp's own Python writer); no download, no compiler.

The file holds the weights (2-D matrices in the chosen type, norms and other 1-D tensors in f32),
the model's settings under llama.cpp's key names (:mod:`lorafit.export.gguf_arch`) and the
tokenizer with its chat template (:mod:`lorafit.export.gguf_tokenizer`). ``q8_0`` stores each run
of 32 weights of a row as 8-bit integers ``q`` and one f16 scale ``d = max|w| / 127``, ``w ~ d q``.

Everything that can fail is checked before the first byte is written: the architecture, every
tensor's name, finiteness and range, the tokenizer, the free space. The file is written under a
temporary name in its folder and renamed when complete, so no half-written file ever has the
final name.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType, quants

from lorafit.adapters import lora_layers
from lorafit.disk import MiB, atomic_write, require_free_space
from lorafit.errors import LorafitError
from lorafit.export import gguf_arch
from lorafit.export.gguf_arch import KV
from lorafit.export.gguf_tokenizer import named_phi3, tokenizer_metadata, wants_phi3_rule
from lorafit.lora.variants import parameter_name

DTYPES = {
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
F16_MAX = 65504.0


@dataclass
class PlannedTensor:
    """One tensor of the file: its GGUF name and type, its shape (rows first, as numpy and torch
    order it; GGUF lists dimensions the other way round), and where its values come from."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    values: Callable[[], torch.Tensor | np.ndarray]

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size

    def encoded(self) -> np.ndarray:
        """The values in the file's type: f32/f16 arrays, or the raw bytes of bf16 and q8_0 rows."""
        values = self.values()
        x = (
            values.detach().to("cpu", torch.float32)
            if isinstance(values, torch.Tensor)
            else torch.from_numpy(values)
        )
        if self.qtype == GGMLQuantizationType.F32:
            return x.numpy()
        if self.qtype == GGMLQuantizationType.F16:
            return x.to(torch.float16).numpy()
        return quants.quantize(x.numpy(), self.qtype)


def _matrix_type(dtype: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
    qtype = DTYPES[dtype][0]
    block = GGML_QUANT_SIZES[qtype][0]
    # q8_0 works on runs of 32 along a row; a row of another length stays f16, as in llama.cpp
    return qtype if shape[-1] % block == 0 else GGMLQuantizationType.F16


def merged_weights(model: torch.nn.Module) -> tuple[dict[str, Callable[[], torch.Tensor]], set[str]]:
    """The merged weight of every LoRA layer of ``model``, computed when asked for, and the
    state-dict keys of the adapter's own tensors (each layer's ``adapter_params``: ``lora_A``,
    ``lora_B``, DoRA's magnitude), which the merged weights replace.

    Each function returns ``W0 + s B A`` (DoRA: ``c (W0 + s B A)``) in fp32, in the stored layout,
    one layer at a time: a file's type then rounds each weight once, and a full fp32 copy of the
    model never exists. A layer merged already holds its merged weight, which is returned as it is.
    """
    weights: dict[str, Callable[[], torch.Tensor]] = {}
    adapter_keys: set[str] = set()
    for name, layer in lora_layers(model):
        if getattr(layer, "base_layer", None) is not None:
            raise LorafitError(
                f"{name} is a LoRA layer over a 4-bit weight; dequantize the model to 16 bits before "
                "exporting (lorafit.models.quant.dequantize_model does). Nothing was written."
            )
        adapter_keys |= {f"{name}.{parameter_name(key)}" for key in layer.adapter_params()}

        @torch.no_grad()
        def value(layer: Any = layer) -> torch.Tensor:
            w = layer._base_weight()
            if layer.merged:
                return w.float()
            kept = getattr(layer, "dora_merged_norm", None)
            merged = layer._merged_weight(w.float())
            if hasattr(layer, "dora_merged_norm"):
                layer.dora_merged_norm = kept  # DoRA keeps the norms of a merge for unmerge: none was done
            return merged

        weights[f"{name}.{layer._base_weight_key()}"] = value
    return weights, adapter_keys


def plan_tensors(
    model: torch.nn.Module, arch: str, dtype: str, *, merge: bool = False
) -> list[PlannedTensor]:
    """Every tensor of ``model`` under its GGUF name and type, checked: no 4-bit weight, nothing
    outside the layout, every value finite (and within f16's range for f16). LoRA layers are
    refused unless ``merge``, which writes each as its merged weight (:func:`merged_weights`)."""
    config = model.config
    state = model.state_dict()
    merged, adapter_keys = merged_weights(model) if merge else ({}, set())
    leftover = [k for k in state if ".lora_" in k and k not in adapter_keys]
    if leftover:
        raise LorafitError(
            f"the model still holds LoRA layers ({leftover[0]}, ...); pass merge=True to fold them in "
            "while writing (fp32, rounded once to the file's type), or merge them first with "
            "lorafit.merge_lora(model, unload=True). Nothing was written."
        )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    planned = []
    for key, tensor in state.items():
        if key in adapter_keys:
            continue
        # llama.cpp reads a missing output.weight as tied to token_embd; a tied head with an update
        # of its own is written, and llama.cpp takes it for the output while token_embd stays W0
        if tied and key == "lm_head.weight" and key not in merged:
            continue
        # bitsandbytes keeps its 4-bit weights as integers with their scales under "weight.absmax" ...
        if not tensor.is_floating_point() or ".weight." in key:
            raise LorafitError(
                f"{key} is part of a quantized weight ({tensor.dtype}); dequantize the model to 16 bits "
                "before exporting (lorafit.export.merge_into_base does). Nothing was written."
            )
        module, _, suffix = key.rpartition(".")
        if suffix not in ("weight", "bias"):
            raise LorafitError(f"{key} is neither a weight nor a bias; GGUF export has no place for it")
        name, heads = gguf_arch.gguf_name(arch, config, module)
        source = merged.get(key, lambda t=tensor: t)
        _check_values(key, source(), dtype)  # a merged weight is computed here and again when written
        shape = tuple(tensor.shape)
        qtype = _matrix_type(dtype, shape) if tensor.dim() == 2 else GGMLQuantizationType.F32

        def values(source: Callable[[], torch.Tensor] = source, h: int | None = heads) -> torch.Tensor:
            t = source()
            return gguf_arch.regroup_rows(t, h) if h else t

        planned.append(PlannedTensor(f"{name}.{suffix}", qtype, shape, values))
    return planned


def _check_values(key: str, tensor: torch.Tensor, dtype: str) -> None:
    t = tensor.detach()
    if not torch.isfinite(t).all():
        raise LorafitError(f"{key} holds NaN or inf values; nothing was written")
    if dtype == "f16" and t.dim() == 2:
        peak = float(t.abs().max())
        if peak > F16_MAX:
            raise LorafitError(
                f"{key} holds a value of magnitude {peak:.4g}, beyond f16's range ({F16_MAX:g}); "
                "export with dtype='bf16' (or 'q8_0'). Nothing was written."
            )


def _typed(key: str, value: Any, like: KV | None) -> KV:
    """A caller's metadata value as a GGUF value: the type of the key it replaces, or one read
    from the Python value for a new key."""
    if like is not None:
        _, vtype = like
        expected = {
            GGUFValueType.STRING: (str,),
            GGUFValueType.BOOL: (bool,),
            GGUFValueType.FLOAT32: (int, float),
            GGUFValueType.ARRAY: (list, tuple),
        }.get(vtype, (int,))
        if not isinstance(value, expected) or (isinstance(value, bool) and vtype != GGUFValueType.BOOL):
            raise LorafitError(
                f"metadata[{key!r}] replaces a {vtype.name.lower()} value; "
                f"got {type(value).__name__} {value!r}"
            )
        return (list(value) if vtype == GGUFValueType.ARRAY else value), vtype
    if isinstance(value, bool):
        return value, GGUFValueType.BOOL
    if isinstance(value, int):
        return value, GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32
    if isinstance(value, float):
        return value, GGUFValueType.FLOAT32
    if isinstance(value, str):
        return value, GGUFValueType.STRING
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value), GGUFValueType.ARRAY
    raise LorafitError(
        f"metadata[{key!r}] is a {type(value).__name__}; GGUF metadata takes str, int, float, bool "
        "or a list of str"
    )


def _model_name(model: torch.nn.Module, tokenizer: Any, arch: str, metadata: Mapping[str, Any]) -> str:
    """``general.name``: the caller's, or the model's folder or hub name. llama.cpp strips the
    whitespace after Phi-3's role tokens only in models whose name says Phi-3, so a Phi-3 whose
    tokenizer does that and whose name does not say so is named ``<name> (Phi-3)``."""
    if "general.name" in metadata:
        return str(metadata["general.name"])
    source = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None) or "model"
    name = Path(str(source).rstrip("/")).name or "model"
    if arch == "phi3" and not named_phi3(name) and wants_phi3_rule(tokenizer):
        name += " (Phi-3)"
    return name


def build_metadata(
    model: torch.nn.Module, tokenizer: Any, arch: str, dtype: str, metadata: Mapping[str, Any]
) -> tuple[dict[str, KV], dict[str, np.ndarray], list[str]]:
    """All key-value metadata of the file (general, model, tokenizer, then the caller's
    ``metadata`` over them), the rope tensors that come with the model's settings, and notes on
    what llama.cpp will do differently from transformers."""
    if "general.architecture" in metadata:
        raise LorafitError("metadata cannot set general.architecture: it follows from the model's layout")
    name = _model_name(model, tokenizer, arch, metadata)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    hparams = gguf_arch.hyperparameters(arch, model.config, n_vocab)
    kv: dict[str, KV] = {
        "general.type": ("model", GGUFValueType.STRING),
        "general.name": (name, GGUFValueType.STRING),
        "general.file_type": (int(DTYPES[dtype][1]), GGUFValueType.UINT32),
        "general.quantization_version": (2, GGUFValueType.UINT32),  # ggml's GGML_QNT_VERSION
        **hparams.kv,
    }
    tokenizer_kv, notes = tokenizer_metadata(
        tokenizer, n_vocab, model_name=name, pre=metadata.get("tokenizer.ggml.pre")
    )
    kv.update(tokenizer_kv)
    for key, value in metadata.items():
        kv[key] = _typed(key, value, kv.get(key))
    return kv, hparams.tensors, notes


def estimate_size(kv: Mapping[str, KV], tensors: list[PlannedTensor], alignment: int = 32) -> int:
    """Bytes the file will take, within a few bytes per value: header, metadata, tensor index, data."""
    size = 24
    for key, (value, _) in kv.items():
        size += 8 + len(key.encode()) + 4
        items = value if isinstance(value, list) else [value]
        size += 12 + sum(8 + len(v.encode()) if isinstance(v, str) else 8 for v in items)
    for t in tensors:
        size += 8 + len(t.name) + 4 + 8 * len(t.shape) + 12
        size += t.nbytes + alignment
    return size


def write_file(
    tmp: str,
    arch: str,
    kv: Mapping[str, KV],
    tensors: list[PlannedTensor],
    on_tensor: Callable[[int, int], None],
) -> None:
    writer = GGUFWriter(tmp, arch)
    try:
        for key, (value, vtype) in kv.items():
            writer.add_key_value(key, value, vtype)
        for t in tensors:
            # the logical shape and the ggml type; the bytes come one tensor at a time below, so
            # the converted model is never held in memory whole
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, t in enumerate(tensors, 1):
            writer.write_tensor_data(t.encoded())
            on_tensor(done, len(tensors))
    finally:
        writer.close()


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse a folder, or an existing file unless ``overwrite``."""
    if path.is_dir():
        raise LorafitError(f"{path} is a folder; give the GGUF file's path, e.g. {path / 'model.gguf'}")
    if path.exists() and not overwrite:
        raise LorafitError(f"{path} already exists; choose a new file name (or pass overwrite=True)")


def write_atomically(
    path: Path,
    arch: str,
    kv: Mapping[str, KV],
    tensors: list[PlannedTensor],
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Check the free space for the file, then write it under a temporary name and rename it."""
    require_free_space(
        path.parent,
        estimate_size(kv, tensors) + 16 * MiB,
        "this GGUF export",
        "Free some space or write the file to another disk.",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: write_file(tmp, arch, kv, tensors, progress or (lambda *_: None)))


def export_gguf(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    dtype: str = "f16",
    merge: bool = False,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    notes: Callable[[str], Any] | None = None,
) -> Path:
    """Write ``model`` (a plain transformers model, or with ``merge`` one that holds LoRA layers) and
    ``tokenizer`` to one GGUF file at ``path`` for llama.cpp / Ollama.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Phi3ForCausalLM`` with 16- or
            32-bit weights.
        tokenizer: its fast tokenizer; vocabulary, merges or scores, special tokens and chat
            template go into the file.
        dtype: ``"f16"``, ``"bf16"`` or ``"q8_0"`` for the 2-D weights (a row whose length is not a
            multiple of 32 stays f16 under q8_0); 1-D tensors are f32.
        merge: write each LoRA layer as its merged weight ``W0 + s B A``, computed in fp32 one
            layer at a time and rounded once, to the file's type; ``model`` is left as it was. Without
            it a model with LoRA layers is refused. (Merging into a bf16 model first and writing
            that rounds twice: bf16's 8 bits of precision, then the file's.)
        metadata: GGUF keys to add or replace, e.g. ``{"general.name": "my-phi3"}`` or
            ``{"tokenizer.ggml.pre": "llama-bpe"}`` for a byte-level pre-tokenizer lorafit cannot
            name itself.
        overwrite: replace an existing file at ``path`` (otherwise an error).
        progress: called after each tensor is written with the count written and the file's total.
        notes: called with each note on what llama.cpp will do differently from transformers
            (without it, each is a ``UserWarning``).

    Returns ``path``. Raises LorafitError, before anything is written, for an unsupported
    architecture, dtype, tokenizer or value, an existing file, or too little free space.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    if dtype not in DTYPES:
        raise LorafitError(
            f"dtype {dtype!r} is not one GGUF export writes; choose one of {', '.join(DTYPES)}"
        )
    arch = gguf_arch.architecture(model.config, type(model).__name__)
    check_target(path, overwrite)
    kv, rope_tensors, found = build_metadata(model, tokenizer, arch, dtype, metadata)
    tensors = plan_tensors(model, arch, dtype, merge=merge)
    tensors += [
        PlannedTensor(name, GGMLQuantizationType.F32, values.shape, lambda v=values: v)
        for name, values in rope_tensors.items()
    ]
    for note in found:
        if notes is None:
            warnings.warn(f"GGUF export: {note}", UserWarning, stacklevel=2)
        else:
            notes(f"GGUF export: {note}")
    return write_atomically(path, arch, kv, tensors, progress)
