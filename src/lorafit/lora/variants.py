"""LoRA variants: how a :class:`lorafit.lora.Linear`'s update enters its output and its weight.

A variant is four small functions over a layer that holds ``lora_A`` (r, in), ``lora_B``
(out, r) and ``scaling`` s, so that ``delta = s * B A`` (out, in):

- ``init(layer)``: extra parameters, made once ``lora_A`` and ``lora_B`` are initialised;
- ``forward(layer, x, result)``: the layer's output, given ``result = W0 x + b``;
- ``merged(layer, w0)`` / ``unmerged(layer, w)``: the weight with the update folded in, and back
  (fp32, (out, in)).

Plain LoRA (``LORA``)::

    h = W0 x + b + s * B A drop(x)                   W = W0 + s B A

DoRA (``DORA``, Liu et al. 2024, PEFT's ``use_dora``) keeps a trainable magnitude per output row,
``m`` = ``lora_magnitude_vector`` (out,), initialised to ``||W0 + s B A||`` row by row (the norm
over the input dimension, so that the layer starts as ``W0``)::

    c = m / ||W0 + s B A||_row        (the norm is a constant for autograd: DoRA section 4.3)
    h = W0 x + b + (c - 1) W0 drop(x) + c * s * B A drop(x)
    W = c * (W0 + s B A)                 W0 = W / c - s B A   (c as it was when merged)

With no dropout (or in eval) ``W0 drop(x)`` is ``result - b``, already computed; with dropout
the base product runs again on the dropped input, as PEFT does. The ops and their order are
PEFT's, so with the same weights outputs and gradients are PEFT's. Its cost: every step forms
``B A`` and the row norms of ``W0 + s B A`` (one pass over the weight) and one more product by
``W0`` when dropout is on.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.lora.ops import lora_update

__all__ = ["DORA", "LORA", "Variant", "parameter_name", "variant_for"]


def _dropout_p(layer: nn.Module) -> float:
    drop = layer.lora_dropout
    return drop.p if layer.training and isinstance(drop, nn.Dropout) else 0.0


class Variant:
    """Plain LoRA; subclasses change what the update does (see the module docstring)."""

    name = "lora"

    def tensors(self, in_features: int, out_features: int, r: int) -> dict[str, tuple[int, ...]]:
        """What a layer of this variant keeps in an adapter file: PEFT's key after the module's
        path -> shape. The layer's parameter is the key less a final ``.weight``
        (:func:`parameter_name`); saving, loading and the fit check all derive from this."""
        return {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}

    def init(self, layer: nn.Module) -> None:
        """Plain LoRA has nothing beyond ``lora_A`` and ``lora_B``."""

    def forward(self, layer: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + s * drop(x) A^T B^T``."""
        if torch.is_autocast_enabled(x.device.type):
            # Mixed-precision training: autocast would run the update in its dtype anyway, so do
            # that in one op that skips the casts and keeps less for backward.
            return lora_update(result, x, layer.lora_A, layer.lora_B, layer.scaling, _dropout_p(layer))
        # Two thin products (x A^T) B^T instead of forming B A: r << in, out. The update is
        # computed in the LoRA dtype (fp32 over a bf16 base). PEFT adds it before the one cast
        # back over a 16-bit base, and after casting it over a 4-bit base; so do we, so that
        # outputs match PEFT's bit for bit on both.
        dtype = result.dtype
        x = layer.lora_dropout(x).to(layer.lora_A.dtype)
        update = F.linear(F.linear(x, layer.lora_A), layer.lora_B) * layer.scaling
        if layer.base_layer is not None:
            return result + update.to(dtype)
        return (result + update).to(dtype)

    def merged(self, layer: nn.Module, w0: torch.Tensor) -> torch.Tensor:
        return w0 + layer.update_weight()

    def unmerged(self, layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
        return w - layer.update_weight()


class DoRA(Variant):
    """Weight-decomposed LoRA: a magnitude per output row times the direction of ``W0 + s B A``."""

    name = "dora"

    def tensors(self, in_features: int, out_features: int, r: int) -> dict[str, tuple[int, ...]]:
        # PEFT's key for the magnitudes has no ".weight" after it
        return {**super().tensors(in_features, out_features, r), "lora_magnitude_vector": (out_features,)}

    def init(self, layer: nn.Module) -> None:
        with torch.no_grad():
            norm = self._row_norm(layer.dense_weight().to(layer.lora_A.dtype), layer.update_weight())
        layer.lora_magnitude_vector = nn.Parameter(norm.to(layer.lora_A.dtype))  # (out,)
        # The row norms the merged weight was scaled by, for unmerge (not saved: a merged layer
        # saves its unmerged weight).
        layer.register_buffer("dora_merged_norm", None, persistent=False)

    @staticmethod
    def _row_norm(w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``||W0 + delta||`` over the input dimension: (out,), detached."""
        return torch.linalg.norm(w0 + delta, dim=1).to(w0.dtype).detach()

    def forward(self, layer: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        dtype = result.dtype
        if layer.base_layer is None or not torch.is_autocast_enabled(x.device.type):
            x = x.to(layer.lora_A.dtype)  # where PEFT casts the input to the LoRA dtype
        A, B, s = layer.lora_A, layer.lora_B, layer.scaling  # (r, in), (out, r)
        w0 = layer.dense_weight().to(x.dtype)  # (out, in)
        # B A through the layers' own product, as PEFT forms it (an identity through both)
        eye = torch.eye(A.shape[1], device=A.device, dtype=A.dtype)
        lora_weight = F.linear(F.linear(eye, A), B).T.to(x.dtype)  # (out, in)
        norm = torch.linalg.norm(w0 + s * lora_weight.detach(), dim=1).to(w0.dtype).detach()  # (out,)
        c = (layer.lora_magnitude_vector / norm).view(1, -1)  # (1, out)
        if _dropout_p(layer) > 0.0:
            x = layer.lora_dropout(x)
            base = F.linear(x, w0)  # W0 drop(x): the base product again, on the dropped input
        else:
            bias = layer.base_bias()
            base = result if bias is None else result - bias  # W0 x
        lora_result = F.linear(F.linear(x, A), B)  # (..., out)
        return (result + ((c - 1) * base + c * lora_result * s)).to(dtype)

    def merged(self, layer: nn.Module, w0: torch.Tensor) -> torch.Tensor:
        delta = layer.update_weight()
        norm = self._row_norm(w0, delta)
        layer.dora_merged_norm = norm
        return (layer.lora_magnitude_vector.detach().float() / norm).view(-1, 1) * (w0 + delta)

    def unmerged(self, layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
        c = (layer.lora_magnitude_vector.detach().float() / layer.dora_merged_norm).view(-1, 1)
        return w / c - layer.update_weight()


LORA = Variant()
DORA = DoRA()


def parameter_name(key: str) -> str:
    """The layer attribute an adapter key of :meth:`Variant.tensors` names (``lora_A.weight`` ->
    ``lora_A``); ``key`` may start with the module's path."""
    lora_ab = key in ("lora_A.weight", "lora_B.weight") or key.endswith((".lora_A.weight", ".lora_B.weight"))
    return key[: -len(".weight")] if lora_ab else key


def variant_for(use_dora: bool) -> Variant:
    """The variant a PEFT config's ``use_dora`` asks for."""
    return DORA if use_dora else LORA
