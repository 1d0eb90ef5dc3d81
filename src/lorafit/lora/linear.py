"""``Linear``: loralib's LoRA linear layer, which is also the layer ``apply_lora`` puts on Hugging
Face models (over a shared 16-bit weight or a 4-bit base), with a variant seam (plain LoRA, DoRA).

    h = W0 x + b + (alpha / r) * B A drop(x)        # A: (r, in), B: (out, r), B starts at zero
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.lora.layers import LoRALayer, _init_pair
from lorafit.lora.ops import lora_linear
from lorafit.lora.variants import LORA, variant_for


class Linear(nn.Linear, LoRALayer):
    """``nn.Linear`` plus a low-rank update: ``y = x W0^T + b + (alpha/r) * drop(x) A^T B^T``.

    ``lora_A``: (r, in_features), Kaiming-uniform; ``lora_B``: (out_features, r), zero.
    ``fan_in_fan_out=True`` is for layers that store the weight as (in, out) (GPT-2's Conv1D).

    The one constructor for both uses. As in loralib it makes its own weight; given ``base`` (an
    ``nn.Linear``, transformers' ``Conv1D`` with ``fan_in_fan_out``, or a 4-bit bitsandbytes
    ``Linear4bit``) it shares that layer's weight and bias instead, with no copy, which is how
    :func:`lorafit.apply_lora` builds its layers. The keywords after ``*`` are PEFT's:
    ``use_dora`` (the DoRA variant, :mod:`lorafit.lora.variants`), ``init_lora_weights`` (see
    ``_init_pair``) and ``lora_dtype`` (default: the weight's dtype for a layer of its own, fp32
    over a shared 16-bit or 4-bit base, so the small trainable matrices keep full precision).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        use_rslora: bool = False,
        *,
        base: nn.Module | None = None,
        use_dora: bool = False,
        init_lora_weights: bool | str = True,
        lora_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        if base is None:
            nn.Linear.__init__(self, in_features, out_features, **kwargs)
        else:  # a shell without a weight of its own: the base's tensors go in below
            nn.Linear.__init__(self, in_features, out_features, bias=False, device="meta")
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        # QLoRA: a quantized base (bitsandbytes Linear4bit) computes W0 x itself; weight is None.
        self.base_layer: nn.Module | None = None
        self.fan_in_fan_out = fan_in_fan_out
        self.variant = variant_for(use_dora)
        if base is not None:
            self._share(base)
        like = self.weight if self.base_layer is None else self.base_layer.weight
        if r > 0:
            if lora_dtype is None:
                lora_dtype = like.dtype if base is None else _LORA_DTYPE_OVER.get(like.dtype, like.dtype)
            self.lora_A = nn.Parameter(torch.zeros((r, in_features), dtype=lora_dtype, device=like.device))
            self.lora_B = nn.Parameter(torch.zeros((out_features, r), dtype=lora_dtype, device=like.device))
            like.requires_grad = False
        if base is None:
            self.reset_parameters()  # loralib's order: W0 and b drawn again, then A and B
            if fan_in_fan_out:
                self.weight.data = self.weight.data.T
        elif r > 0 and like.device.type != "meta":
            _init_pair(self.lora_A, self.lora_B, init_lora_weights)
        if r > 0:
            self.variant.init(self)
        self._install_state_dict_hooks()
        if base is not None:
            self.train(base.training)

    def _share(self, base: nn.Module) -> None:
        weight = base.weight
        if getattr(weight, "quant_state", None) is not None or weight.dtype == torch.uint8:
            self.weight, self.bias = None, None  # the 4-bit layer stays whole and computes W0 x
            self.base_layer = base
        else:
            self.weight, self.bias = weight, base.bias

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            _init_pair(self.lora_A, self.lora_B)

    @property
    def use_dora(self) -> bool:
        return self.variant.name == "dora"

    def _w(self) -> torch.Tensor:
        return self.weight.T if self.fan_in_fan_out else self.weight  # (out, in)

    def dense_weight(self) -> torch.Tensor:
        """``W0`` as an (out, in) tensor in its own dtype: a view of the weight, or the
        dequantized weight of a 4-bit base (a new tensor each call)."""
        if self.base_layer is not None:
            return dequantize_4bit(self.base_layer)
        return self._w()

    def base_bias(self) -> torch.Tensor | None:
        """The bias added to ``W0 x``: this layer's, or the 4-bit base layer's."""
        return self.base_layer.bias if self.base_layer is not None else self.bias

    def update_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        delta = self.update_weight()  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        merged = self.variant.merged(self, w.T if self.fan_in_fan_out else w)
        return merged.T if self.fan_in_fan_out else merged

    def _unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        unmerged = self.variant.unmerged(self, w.T if self.fan_in_fan_out else w)
        return unmerged.T if self.fan_in_fan_out else unmerged

    def train(self, mode: bool = True) -> Linear:
        nn.Linear.train(self, mode)
        self._loralib_train(mode)
        return self

    def _base_weight(self) -> torch.Tensor:
        if self.base_layer is not None:
            raise RuntimeError("cannot merge into a 4-bit base weight; dequantize the model first")
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = _fused_linear_args(self, x)
        if fused is not None:  # mixed-precision training over a frozen base: base and LoRA in one op
            return lora_linear(x, *fused)
        if self.base_layer is not None:
            result = self.base_layer(x)
        else:
            result = F.linear(x, self._w(), self.bias)
        if self.has_lora and not self.merged:
            return self.variant.forward(self, x, result)
        return result


def _fused_linear_args(layer: Linear, x: torch.Tensor) -> tuple | None:
    """:func:`lora_linear`'s arguments after ``x`` when it computes ``layer(x)``: plain LoRA under
    autocast, unmerged, base weight frozen; else None (the variant's op-by-op path)."""
    if not (layer.has_lora and not layer.merged and torch.is_autocast_enabled(x.device.type)):
        return None
    if layer.variant is not LORA or (layer.base_layer is None and layer.weight.requires_grad):
        return None
    weight = layer._w() if layer.base_layer is None else functools.partial(dequantize_4bit, layer.base_layer)
    drop = layer.lora_dropout
    p = drop.p if layer.training and isinstance(drop, nn.Dropout) else 0.0
    return weight, layer.base_bias(), layer.lora_A, layer.lora_B, layer.scaling, p


# The LoRA dtype over a shared 16-bit base (PEFT's choice); a 4-bit base stores uint8: fp32 too.
_LORA_DTYPE_OVER = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.uint8: torch.float32}


def dequantize_4bit(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes ``Linear4bit`` in its original dtype."""
    import bitsandbytes.functional as bnb_f

    data, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # repacked for CPU inference: undo
        data, state = bnb_f._convert_weight_packed_for_cpu_inverse(data, state)
    return bnb_f.dequantize_4bit(data, state)
