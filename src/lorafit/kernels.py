"""Kernels below LoRA: 16-bit products at the machine's best rate, and inputs rebuilt, not kept.

:func:`matmul16` multiplies 16-bit matrices as the machine does it fastest for the same math:
natively, or, on CPUs without 16-bit matrix instructions (AVX2), as fp32 products of the same
values (exact: a product of two bf16 or fp16 numbers fits fp32), accumulated in fp32 and
rounded once, as a native bf16 product is. :func:`frozen_linear` is a frozen layer's product by
it. :func:`mark_rebuildable` notes on a tensor how to recompute it from tensors kept anyway, so
that an op reading it (LoRA's linear layer) keeps those instead. Used by LoRA's ops
(:mod:`lorafit.lora.ops`), attention, the lean layers and the loss; nothing Hugging Face.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

# -- 16-bit products -----------------------------------------------------------------------------

HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def cpu_multiplies_natively(name: str) -> bool:
    """Whether this CPU has instructions that multiply ``name`` (``bfloat16`` or ``float16``)
    matrices in 16 bits: AVX-512 BF16 or AMX for bf16, AMX-FP16 for fp16. The one detector every
    dtype decision asks (:class:`lorafit.models.precision.Precision`, :func:`widen_products`).

    Why these flags and not oneDNN's ``_is_mkldnn_bf16_supported``: oneDNN "supports" bf16 on any
    AVX-512 core by converting to fp32 inside its kernels, which is no faster than lorafit's fp32
    products of the same values, so asking it would call such a CPU native where the load dtype
    (decided on these flags) calls it emulating, and the two would disagree. fp16 counts only with
    AMX-FP16: elsewhere a CPU run's fp16 becomes bf16 (no loss scaling) or fp32. On an AVX2-only
    CPU PyTorch's fallback runs 16-bit products at a fraction of the fp32 rate (a 2-core AVX2
    EPYC: 0.6-4 GFLOP/s in bf16 against 15-60 in fp32, measured)."""
    cpu = torch.cpu
    if name == "bfloat16":
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    if name == "float16":
        return bool(cpu._is_amx_fp16_supported())
    raise ValueError(f"not a 16-bit dtype name: {name!r} (bfloat16 or float16)")


def widen_products(dtype: torch.dtype, device_type: str) -> bool:
    """Whether :func:`matmul16` multiplies ``dtype`` matrices on ``device_type`` as fp32 products:
    on a CPU without instructions for them (:func:`cpu_multiplies_natively`); accelerators and
    CPUs with those instructions multiply natively."""
    if device_type != "cpu":
        return False
    name = next((n for n, d in HALF_DTYPES.items() if d == dtype), None)
    return name is not None and not cpu_multiplies_natively(name)


def matmul16(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``a @ b`` for 16-bit ``a`` and ``b`` (any of them may be fp32 already): fp32 accumulation,
    one rounding to ``out_dtype`` (default ``a``'s dtype), computed natively or, where
    :func:`widen_products` says so, as an fp32 product of the same values."""
    dtype = a.dtype if out_dtype is None else out_dtype
    low = a.dtype if a.dtype != torch.float32 else b.dtype
    if widen_products(low, a.device.type):
        return torch.matmul(a.float(), b.float()).to(dtype)
    return torch.matmul(a, b).to(dtype)


def linear16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 16-bit tensors with one rounding, as :func:`matmul16`."""
    if not widen_products(x.dtype, x.device.type):
        return F.linear(x, weight, bias)
    wide = x.reshape(-1, x.shape[-1]).float()
    out = wide @ weight.float().t() if bias is None else torch.addmm(bias.float(), wide, weight.float().t())
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` under autocast for a frozen weight and bias, its products by
    :func:`matmul16` (so widened where the CPU has no 16-bit matrix instructions). Backward keeps
    only the weight: ``grad_x = g W``."""
    return _FrozenLinear.apply(x, weight, bias)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            out = linear16(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = matmul16(grad.to(ctx.dtype), weight.to(ctx.dtype)).to(ctx.x_dtype)
        return grad_x, None, None


# -- inputs that are rebuilt instead of kept ---------------------------------------------------

_RECIPE = "_lorafit_rebuild"


def mark_rebuildable(
    out: torch.Tensor, rebuild: Callable[..., torch.Tensor], *sources: torch.Tensor
) -> torch.Tensor:
    """Note on ``out`` that ``rebuild(*sources)`` recomputes it bit for bit, and cheaply.

    The producer (a norm, an activation) keeps ``sources`` for its own backward anyway;
    :func:`lorafit.lora.ops.lora_linear` then keeps ``sources`` instead of ``out`` and rebuilds ``out`` in
    backward, so the two ops share one saved copy. The note holds for this tensor object as long
    as it is not modified in place (its version is recorded); views and copies carry no note.
    """
    setattr(out, _RECIPE, (rebuild, sources, out._version))
    return out


def rebuild_recipe(x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]] | None:
    """``(rebuild, sources)`` noted on ``x`` by :func:`mark_rebuildable`, or None (no note, or ``x``
    changed in place since)."""
    note = getattr(x, _RECIPE, None)
    if note is None or note[2] != x._version:
        return None
    return note[0], note[1]
