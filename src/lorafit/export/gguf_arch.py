"""Where a transformers model's tensors and settings go in a GGUF file, as llama.cpp reads them.

Two layouts are supported: llama.cpp's ``llama`` (transformers' Llama, and Mistral and SmolLM2,
which share its layout) and ``phi3`` (Phi-3's fused ``qkv_proj`` and ``gate_up_proj``).

Llama's query and key rows are regrouped, because llama.cpp rotates adjacent pairs of each head's
dimensions where transformers rotates dimension ``i`` with ``i + d/2`` (``rotate_half``). With ``H``
heads of size ``d``, GGUF row ``h*d + 2i + j`` holds transformers row ``h*d + j*d/2 + i``
(``j`` in {0, 1}, ``i < d/2``). A LoRA update ``B A`` of such a weight is regrouped by permuting
the rows of ``B`` alone. Phi-3's rotation is transformers' own in llama.cpp (NEOX style): no
regrouping.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGUFValueType

from lorafit.errors import LorafitError

# transformers model class and model_type -> llama.cpp architecture; llama.cpp converts Mistral as
# "llama", whose layout it shares.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Phi3ForCausalLM": "phi3",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "phi3": "phi3"}

_TOP_LEVEL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "llama": {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    },
    "phi3": {
        "input_layernorm": "attn_norm",
        "self_attn.qkv_proj": "attn_qkv",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        # llama.cpp's Phi-3 ffn_up is the fused (gate; up) projection, split at run time
        "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    },
}
_LAYER_MODULE = re.compile(r"model\.layers\.(\d+)\.(.+)")

KV = tuple[Any, GGUFValueType]
"""A metadata value as GGUFWriter.add_key_value takes it: (value, type). The elements of an array
get their type from the Python values (str: string, int: int32, float: float32), as in every gguf
release since 0.10."""


def architecture(config: Any, model_class: str | None = None) -> str:
    """llama.cpp's architecture for a model of class ``model_class`` (or, without one, of
    ``config.model_type``), or a LorafitError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_class is None and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    if model_class in ARCHITECTURES:
        return ARCHITECTURES[model_class]
    found = model_class or f"a model of model_type {model_type!r}"
    raise LorafitError(
        f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {found}. Nothing was written."
    )


def head_counts(config: Any) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gguf_name(arch: str, config: Any, module: str) -> tuple[str, int | None]:
    """``(GGUF tensor name without .weight/.bias, heads to regroup its rows by or None)`` for a
    module path such as ``model.layers.3.self_attn.q_proj``; a LorafitError for any other module."""
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module], None
    match = _LAYER_MODULE.fullmatch(module)
    if match and match.group(2) in _LAYER[arch]:
        part = _LAYER[arch][match.group(2)]
        heads, kv_heads = head_counts(config)
        regroup = {"attn_q": heads, "attn_k": kv_heads}.get(part) if arch == "llama" else None
        return f"blk.{match.group(1)}.{part}", regroup
    known = [*_TOP_LEVEL, *(f"model.layers.N.{m}" for m in _LAYER[arch])]
    raise LorafitError(f"{module} has no place in llama.cpp's {arch} layout, which holds {', '.join(known)}")


def regroup_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rows of a query or key projection (or its LoRA ``B``, or a bias) in llama.cpp's
    order (see the module docstring): ``(H*d, ...) -> (H, 2, d/2, ...) -> (H, d/2, 2, ...)``."""
    d = weight.shape[0] // heads
    return weight.reshape(heads, 2, d // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


@dataclass
class Hyperparameters:
    """The ``{arch}.*`` metadata of a model, and the tensors llama.cpp keeps rope settings in."""

    kv: dict[str, KV]
    tensors: dict[str, np.ndarray]  # float32, written as they are


def _u32(value: int) -> KV:
    return int(value), GGUFValueType.UINT32


def _f32(value: float) -> KV:
    return float(value), GGUFValueType.FLOAT32


def _rope(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in params:  # a config from before transformers 5 standardised rope
        params = dict(getattr(config, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return dict(params)


def hyperparameters(arch: str, config: Any, n_vocab: int) -> Hyperparameters:
    """What llama.cpp reads about the model's shape: sizes, norms, rope, for ``arch``; ``n_vocab``
    is the embedding's row count (the tensor's, in case the config was not updated with it)."""
    heads, kv_heads = head_counts(config)
    rope = _rope(config)
    p = f"{arch}."
    kv: dict[str, KV] = {
        p + "context_length": _u32(config.max_position_embeddings),
        p + "embedding_length": _u32(config.hidden_size),
        p + "block_count": _u32(config.num_hidden_layers),
        p + "feed_forward_length": _u32(config.intermediate_size),
        p + "attention.head_count": _u32(heads),
        p + "attention.head_count_kv": _u32(kv_heads),
        p + "attention.layer_norm_rms_epsilon": _f32(config.rms_norm_eps),
        p + "rope.freq_base": _f32(rope["rope_theta"]),
        p + "vocab_size": _u32(n_vocab),
    }
    tensors: dict[str, np.ndarray] = {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if arch == "llama":
        kv[p + "rope.dimension_count"] = _u32(head_dim(config))
        kv[p + "attention.key_length"] = _u32(head_dim(config))
        kv[p + "attention.value_length"] = _u32(head_dim(config))
        if rope_type == "linear":
            kv[p + "rope.scaling.type"] = ("linear", GGUFValueType.STRING)
            kv[p + "rope.scaling.factor"] = _f32(rope["factor"])
        elif rope_type == "llama3":
            tensors["rope_freqs.weight"] = _llama3_freq_factors(config, rope)
        elif rope_type != "default":
            raise LorafitError(
                f"rope_type {rope_type!r} of this Llama-family model has no GGUF export here; "
                "lorafit exports default, linear and llama3 rope. Nothing was written."
            )
    else:
        rotary = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        dims = int(head_dim(config) * rotary)
        original = int(
            rope.get("original_max_position_embeddings")
            or getattr(config, "original_max_position_embeddings", None)
            or config.max_position_embeddings
        )
        kv[p + "rope.dimension_count"] = _u32(dims)
        kv[p + "rope.scaling.original_context_length"] = _u32(original)
        # llama.cpp tells Phi-4-style models (no window) from Phi-3 by a window of 0
        kv[p + "attention.sliding_window"] = _u32(getattr(config, "sliding_window", None) or 0)
        if rope_type == "longrope":
            kv[p + "rope.scaling.attn_factor"] = _f32(_longrope_attention_factor(config, rope, original))
            for kind in ("long", "short"):
                factors = np.asarray(rope[f"{kind}_factor"], dtype=np.float32)
                if factors.shape != (dims // 2,):
                    raise LorafitError(
                        f"rope_parameters.{kind}_factor has {factors.size} values; Phi-3 with "
                        f"{dims} rotary dimensions needs {dims // 2}. Nothing was written."
                    )
                tensors[f"rope_factors_{kind}.weight"] = factors
        elif rope_type != "default":
            raise LorafitError(
                f"rope_type {rope_type!r} of this Phi-3 model has no GGUF export; lorafit exports "
                "default and longrope (su). Nothing was written."
            )
    return Hyperparameters(kv, tensors)


def _longrope_attention_factor(config: Any, rope: dict[str, Any], original: int) -> float:
    """The cos/sin scale transformers applies with LongRoPE: given, or ``sqrt(1 + ln s / ln L0)``
    for the context stretch ``s = L / L0`` (1 when the context is not stretched)."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    stretch = rope.get("factor") or config.max_position_embeddings / original
    return math.sqrt(1 + math.log(stretch) / math.log(original)) if stretch > 1 else 1.0


def _llama3_freq_factors(config: Any, rope: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's rope as llama.cpp stores it: the divisor of each rotary frequency,
    ``f_i = inv_freq_default_i / inv_freq_llama3_i``, computed by transformers' own rope code."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dims = head_dim(config)
    default = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default / scaled.double()).float().numpy()
