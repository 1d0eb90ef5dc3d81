"""A LoRA adapter alone as a GGUF LoRA file, for ``llama-cli -m base.gguf --lora adapter.gguf``
(and Ollama's ``ADAPTER``).

For each adapted weight ``W0`` (out, in) the file holds ``<tensor>.weight.lora_a`` = ``A`` (r, in)
and ``<tensor>.weight.lora_b`` = ``B`` (out, r), under the base tensor's GGUF name
(``blk.3.attn_q``, Phi-3's fused ``blk.3.attn_qkv`` and ``blk.3.ffn_up``), and llama.cpp computes
``W0 x + (alpha / r) * B A x`` with ``alpha`` = ``adapter.lora.alpha`` and ``r`` = the rows of that
``A``. PEFT's scale is ``s = alpha_m / r_m``, or ``alpha_m / sqrt(r_m)`` with ``use_rslora``, with
a module's own ``alpha_m`` and ``r_m`` under ``alpha_pattern`` / ``rank_pattern``. The file's
alpha is ``lora_alpha``; wherever ``s`` differs from ``lora_alpha / r_m`` (rsLoRA, alpha_pattern),
``B`` is multiplied by ``s / (lora_alpha / r_m)`` in fp32 before the cast, so that llama.cpp
applies exactly ``s B A``. For Llama's query and key projections the rows of ``B`` are regrouped
as the base weight's are in the model GGUF (:mod:`lorafit.export.gguf_arch`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType, GGUFValueType

from lorafit.adapters import LoraConfig, read_adapter_config
from lorafit.adapters.files import PREFIX, read_adapter_weights
from lorafit.errors import LorafitError
from lorafit.export import gguf_arch
from lorafit.export.gguf import PlannedTensor, check_target, write_atomically
from lorafit.export.gguf_arch import KV

LORA_DTYPES = {"f16": GGMLQuantizationType.F16, "f32": GGMLQuantizationType.F32}


def _pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A, B)}``; anything else in the adapter is refused (a LoRA GGUF holds only pairs)."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, value in tensors.items():
        key = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        for side in ("A", "B"):
            if key.endswith(f".lora_{side}.weight"):
                halves.setdefault(key[: -len(f".lora_{side}.weight")], {})[side] = value
                break
        else:
            others.append(key)
    if others:
        raise LorafitError(
            f"the adapter also holds {', '.join(sorted(others)[:4])}{' ...' if len(others) > 4 else ''} "
            "(modules_to_save or trained biases); a GGUF LoRA file holds only lora_A/lora_B pairs. "
            "Export the merged model instead (lorafit.export.export_gguf)."
        )
    lonely = sorted(m for m, pair in halves.items() if len(pair) != 2)
    if lonely:
        raise LorafitError(f"the adapter has only one of lora_A / lora_B for {', '.join(lonely[:4])}")
    return {module: (pair["A"], pair["B"]) for module, pair in sorted(halves.items())}


def lora_scale(config: LoraConfig, module: str, rank: int) -> float:
    """PEFT's scale of ``module``'s update ``B A``: ``alpha / r``, or ``alpha / sqrt(r)`` (rsLoRA)."""
    alpha = config.alpha_for(module)
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)


def export_lora_gguf(
    base_config: Any,
    adapter: str | os.PathLike | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    lora_config: LoraConfig | Mapping[str, Any] | None = None,
    dtype: str = "f16",
    overwrite: bool = False,
) -> Path:
    """Write a LoRA adapter as a GGUF LoRA file at ``path`` for llama.cpp's ``--lora``.

    Args:
        base_config: the base model's transformers config (Llama, Mistral or Phi-3).
        adapter: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as
            lorafit saves them), or its tensors (PEFT keys ``[base_model.model.]<module>.lora_A.weight``
            (r, in) and ``...lora_B.weight`` (out, r)) together with ``lora_config``.
        lora_config: the adapter's LoraConfig (or PEFT-style dict); only with tensors, since a folder
            carries its own.
        dtype: ``"f16"`` or ``"f32"``.
        overwrite: replace an existing file at ``path``.

    Returns ``path``. Raises LorafitError, before anything is written, for an unsupported base,
    an adapter with more than LoRA pairs, a module llama.cpp's layout has no tensor for, an
    existing file, or too little free space.
    """
    path = Path(path)
    if dtype not in LORA_DTYPES:
        raise LorafitError(f"dtype {dtype!r} is not one a GGUF LoRA file takes; choose f16 or f32")
    arch = gguf_arch.architecture(base_config)
    config, tensors = _adapter(adapter, lora_config)
    check_target(path, overwrite)
    planned = _planned_pairs(arch, base_config, config, tensors, LORA_DTYPES[dtype])
    if not planned:
        raise LorafitError("the adapter holds no lora_A / lora_B tensors")
    source = getattr(base_config, "_name_or_path", None) or "model"
    kv: dict[str, KV] = {
        "general.type": ("adapter", GGUFValueType.STRING),
        "general.name": (f"{Path(str(source)).name} LoRA", GGUFValueType.STRING),
        "adapter.type": ("lora", GGUFValueType.STRING),
        "adapter.lora.alpha": (float(config.lora_alpha), GGUFValueType.FLOAT32),
    }
    return write_atomically(path, arch, kv, planned)


def _adapter(
    adapter: str | os.PathLike | Mapping[str, torch.Tensor],
    lora_config: LoraConfig | Mapping[str, Any] | None,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The adapter's config and tensors, from its folder or as given; DoRA refused."""
    if isinstance(adapter, Mapping):
        if lora_config is None:
            raise LorafitError("adapter tensors need their lora_config (r, lora_alpha, use_rslora, ...)")
        config = (
            lora_config if isinstance(lora_config, LoraConfig) else LoraConfig.from_dict(dict(lora_config))
        )
        tensors = dict(adapter)
    else:
        if lora_config is not None:
            raise LorafitError(
                f"{adapter} carries its own adapter_config.json; pass lora_config only with tensors"
            )
        config, tensors = read_adapter_config(adapter), read_adapter_weights(adapter)
    if getattr(config, "use_dora", False) or any("lora_magnitude_vector" in key for key in tensors):
        raise LorafitError(
            "this is a DoRA adapter: llama.cpp's LoRA files hold B A only, not DoRA's magnitude "
            "rescaling. Export the merged model instead (lorafit.export.export_gguf)."
        )
    return config, tensors


def _planned_pairs(
    arch: str, base_config: Any, config: LoraConfig, tensors: dict[str, torch.Tensor], qtype: Any
) -> list[PlannedTensor]:
    """Each module's ``lora_a`` and ``lora_b`` under llama.cpp's name, B scaled so that llama.cpp's
    ``alpha / r`` gives the adapter's own scale, and regrouped like its base's rows."""
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    planned: list[PlannedTensor] = []
    for module, (a, b) in _pairs(tensors).items():
        name, heads = gguf_arch.gguf_name(arch, base_config, module)
        if name == "output" and tied:
            raise LorafitError(
                f"the adapter adapts {module}, but this base ties it to the embedding, so its GGUF has "
                "no output.weight to apply it to; export the merged model instead"
            )
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
            raise LorafitError(
                f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not (r, in) and (out, r)"
            )
        fold = lora_scale(config, module, rank) / (config.lora_alpha / rank)
        b32 = b.detach().float()
        if fold != 1.0:
            b32 = b32 * fold
        if heads:
            b32 = gguf_arch.regroup_rows(b32, heads)
        planned.append(PlannedTensor(f"{name}.weight.lora_a", qtype, tuple(a.shape), lambda t=a: t))
        planned.append(PlannedTensor(f"{name}.weight.lora_b", qtype, tuple(b32.shape), lambda t=b32: t))
    return planned
