"""LoRA's linear layer under autocast as one autograd op, and its dropout masks.

:func:`lora_linear` computes what autocast makes of a LoRA layer over a frozen base,
``y = x W0^T + b + s * drop(x) A^T B^T``, as one op that keeps for backward only the 16-bit
input (shared by the base and the LoRA path), the rank-r ``drop(x) A^T`` and the seed of the
dropout mask; when the input is itself a cheap function of tensors that are kept anyway (a norm
of the residual stream, SiLU(gate) * up: :func:`lorafit.kernels.mark_rebuildable`), not even the
input. :func:`lora_update` is the older op that adds the update to a base output computed outside.
Its products are :func:`lorafit.kernels.matmul16`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from lorafit.kernels import matmul16, rebuild_recipe, widen_products


def lora_update(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``result + scaling * drop(x) A^T B^T`` under autocast, as one autograd op.

    It computes what autocast makes of :class:`Linear`'s update (``x``, ``A`` and ``B`` cast to
    the autocast dtype, products in that dtype, dropout as ``nn.Dropout``'s) with less work:
    no fp32 copy of ``x``, the scaling and the sum folded into one ``addmm``. The sum is
    rounded once instead of three times, so results agree with the op-by-op path (and with
    PEFT's under autocast) to bf16 rounding. Backward keeps ``drop(x)`` (plus the dropout mask)
    and the rank-r ``drop(x) A^T``, as the op-by-op path does, and returns fp32 gradients for
    fp32 ``A`` and ``B``.
    """
    return _LoRAUpdate.apply(result, x, lora_A, lora_B, scaling, dropout)


_PARALLEL_MASK_MIN = 1 << 18  # below this many elements a thread hand-off costs more than it saves


@functools.cache
def _mask_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorafit-dropout")


def dropout_keep_mask(
    shape: torch.Size, p: float, device: torch.device, seed: int | None = None
) -> torch.Tensor:
    """``nn.Dropout(p)``'s keep mask: i.i.d. True with probability ``1 - p``, shaped ``shape``.

    On CPU each element is a uniform 31-bit integer ``u`` (``random_`` on int32), kept where
    ``u >= round(p * 2^31)``: the keep probability is ``1 - p`` to within 2^-32 (``bernoulli_``
    resolves it to 2^-24), at half ``bernoulli_``'s cost per element. PyTorch draws CPU random
    numbers on one thread, and for LoRA dropout on every linear layer that is a tenth of a
    training step, so large masks are cut into one piece per intra-op thread, each drawn by its
    own generator on its own thread. Those generators are seeded from the default one (which
    draws small masks itself), so ``torch.manual_seed`` and gradient checkpointing's RNG
    replay decide the mask as they decide ``nn.Dropout``'s.

    With ``seed`` the mask is a function of ``seed`` alone (the default generator is not used),
    so :func:`lora_linear` draws it again in backward instead of keeping it.
    """
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    source = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    if device.type != "cpu":
        return keep.bernoulli_(1.0 - p, generator=source)
    threshold = round(p * 2**31)

    def draw(piece: torch.Tensor, generator: torch.Generator | None = None) -> None:
        bits = torch.empty(piece.shape, dtype=torch.int32).random_(generator=generator)  # [0, 2^31)
        torch.ge(bits, threshold, out=piece)

    threads = torch.get_num_threads()
    if threads < 2 or keep.numel() < _PARALLEL_MASK_MIN:
        draw(keep, source)
        return keep
    pool = _mask_pool(threads - 1)
    pieces = keep.view(-1).chunk(threads)
    seeds = torch.randint(0, 2**62, (len(pieces),), generator=source).tolist()
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    others = [pool.submit(draw, piece, g) for piece, g in zip(pieces[1:], generators[1:], strict=True)]
    draw(pieces[0], generators[0])
    for future in others:
        future.result()
    return keep


def draw_seed() -> int:
    """A seed for :func:`dropout_keep_mask`, from the default CPU generator (so ``manual_seed``
    and checkpointing's RNG replay decide it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_scale(p: float, dtype: torch.dtype, device: torch.device) -> float:
    """The factor ``nn.Dropout(p)`` multiplies kept elements by, as it rounds it.

    On CPU, ``nn.Dropout`` forms its noise ``keep / (1 - p)`` in the input's dtype, so a 16-bit
    input is scaled by ``1 / (1 - p)`` rounded to that dtype (1.0547 for p = 0.05 in bf16); on
    accelerators the fused kernel scales in fp32.
    """
    scale = 1.0 / (1.0 - p)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        scale = float(torch.tensor(scale, dtype=dtype))
    return scale


# -- the LoRA linear layer as one op -------------------------------------------------------------


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``x W0^T + b + s * drop(x) A^T B^T`` under autocast, as one autograd op.

    ``weight`` is the frozen (out, in) base weight, or a function returning it (a 4-bit base,
    dequantized each time it is needed instead of being kept); ``bias`` may be trained (loralib's
    ``bias="all"``); ``A`` (r, in) and ``B`` (out, r) are trainable. Everything is computed in the
    autocast dtype (16 bits), as autocast computes it op by op: the base product, ``u = drop(x) A^T``
    and ``u B^T`` with fp32 accumulation; the update is added to the base output before a single rounding
    (autocast rounds ``x W0^T``, ``u B^T`` and ``s * u B^T`` each), so outputs and gradients
    equal PEFT's under autocast to bf16 rounding. Dropout is ``nn.Dropout``'s (the same keep
    probability and scale).

    Kept for backward: the 16-bit input (or, for a :func:`lorafit.kernels.mark_rebuildable` input, the tensors
    it is rebuilt from), ``u`` (N, r), the mask's seed and the parameters themselves (no 16-bit
    copies); backward draws the mask again::

        g_u = s * g B            grad_B = s * g^T u          grad_A = g_u^T drop(x)
        grad_x = g W0 + drop'(g_u A)    (drop': the same mask and scale)

    and returns fp32 gradients for fp32 ``A`` and ``B``. Without dropout ``g W0 + g_u A`` is
    one accumulating product.
    """
    return _LoRALinear.apply(x, weight, bias, lora_A, lora_B, scaling, dropout)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout):
        device = x.device
        dtype = torch.get_autocast_dtype(device.type)
        recipe = rebuild_recipe(x)
        with torch.autocast(device.type, enabled=False):
            w = (weight() if callable(weight) else weight).to(dtype)  # (out, in)
            b = None if bias is None else bias.to(dtype)
            A, B = lora_A.to(dtype), lora_B.to(dtype)  # (r, in), (out, r)
            x16 = x.to(dtype)
            flat = x16.reshape(-1, x16.shape[-1])  # (N, in)
            seed = draw_seed() if dropout > 0.0 else None
            wide = widen_products(dtype, device.type)
            xw = flat.float() if wide else flat  # the working copy of x for both products
            xd = _dropped(xw, dropout, seed, dtype, device)  # drop(x)
            u = matmul16(xd, A.t(), dtype)  # (N, r), rounded as autocast's lora_A output is
            if wide:
                acc = torch.mm(xw, w.float().t()) if b is None else torch.addmm(b.float(), xw, w.float().t())
                out = acc.addmm_(u.float(), B.float().t(), alpha=scaling).to(dtype)
            else:
                base = flat @ w.t() if b is None else torch.addmm(b, flat, w.t())
                out = torch.addmm(base, u, B.t(), alpha=scaling)  # (N, out)
        if recipe is not None:
            rebuild, sources = recipe
            ctx.rebuild, ctx.n_sources = rebuild, len(sources)
        else:
            ctx.rebuild, ctx.n_sources, sources = None, 1, (x16,)
        ctx.weight_fn = weight if callable(weight) else None
        # the parameters themselves, cast again in backward: their 16-bit copies would be kept per layer
        ctx.save_for_backward(*sources, u, lora_A, lora_B, None if callable(weight) else weight)
        ctx.scaling, ctx.dropout, ctx.seed, ctx.dtype = scaling, dropout, seed, dtype
        ctx.in_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.param_dtypes = (lora_A.dtype, lora_B.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        sources, (u, lora_A, lora_B, weight) = saved[: ctx.n_sources], saved[ctx.n_sources :]
        dtype, s, device = ctx.dtype, ctx.scaling, grad.device
        wide = widen_products(dtype, device.type)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            A, B = lora_A.to(dtype), lora_B.to(dtype)  # (r, in), (out, r): as forward rounded them
            x16 = ctx.rebuild(*sources).to(dtype) if ctx.rebuild is not None else sources[0]
            flat = x16.reshape(-1, x16.shape[-1])  # (N, in)
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)  # (N, out)
            if wide:
                g, flat, u, A, B = g.float(), flat.float(), u.float(), A.float(), B.float()
            xd = _dropped(flat, ctx.dropout, ctx.seed, dtype, device)
            g_u = matmul16(g, B, g.dtype).mul_(s)  # (N, r)
            grad_B = matmul16(g.t(), u, torch.float32).mul_(s).to(ctx.param_dtypes[1])  # (out, r)
            grad_A = matmul16(g_u.t(), xd, torch.float32).to(ctx.param_dtypes[0])  # (r, in)
            grad_x = None
            if ctx.needs_input_grad[0]:
                w = (ctx.weight_fn() if ctx.weight_fn is not None else weight).to(dtype)  # (out, in)
                if wide:
                    w = w.float()
                lora_part = g_u @ A  # (N, in)
                if ctx.dropout > 0.0:
                    lora_part = _dropped(lora_part, ctx.dropout, ctx.seed, dtype, device)
                grad_x = torch.addmm(lora_part, g, w).to(ctx.x_dtype).view(ctx.in_shape)
            grad_bias = g.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_A, grad_B, None, None


def _dropped(
    x: torch.Tensor, p: float, seed: int | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``x`` times the keep mask drawn from ``seed`` and nn.Dropout's scale (a new tensor), or
    ``x`` itself when ``p`` is 0. The same seed gives the same mask in forward and backward."""
    if p == 0.0:
        return x
    keep = dropout_keep_mask(x.shape, p, device, seed)
    return (x * keep).mul_(dropout_scale(p, dtype, device))


class _LoRAUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, x, lora_A, lora_B, scaling, dropout):
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            A, B = lora_A.to(dtype), lora_B.to(dtype)  # (r, in), (out, r)
            keep = None
            if dropout > 0.0:
                keep = dropout_keep_mask(x.shape, dropout, x.device)
                x = (x * keep).mul_(1.0 / (1.0 - dropout))  # nn.Dropout's arithmetic
            after_A = x @ A.t()  # (..., r)
            flat = torch.addmm(
                result.reshape(-1, result.shape[-1]).to(dtype),
                after_A.reshape(-1, after_A.shape[-1]),
                B.t(),
                alpha=scaling,
            )
        ctx.save_for_backward(x, keep, after_A, A, B)
        ctx.scaling, ctx.dropout = scaling, dropout
        ctx.dtypes = (result.dtype, lora_A.dtype, lora_B.dtype)
        return flat.view(result.shape[:-1] + (flat.shape[-1],))

    @staticmethod
    def backward(ctx, grad):
        x, keep, after_A, A, B = ctx.saved_tensors
        s = ctx.scaling
        result_dtype, A_dtype, B_dtype = ctx.dtypes
        g = grad.reshape(-1, grad.shape[-1]).to(x.dtype)  # (N, out)
        xs = x.reshape(-1, x.shape[-1])  # (N, in): drop(x)
        u = after_A.reshape(-1, after_A.shape[-1])  # (N, r)
        g_u = (g @ B).mul_(s)  # (N, r)
        grad_B = (g.t() @ u).mul_(s).to(B_dtype)  # (out, r)
        grad_A = (g_u.t() @ xs).to(A_dtype)  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = g_u @ A  # (N, in)
            if keep is not None:
                grad_x = (grad_x * keep.reshape(grad_x.shape)).mul_(1.0 / (1.0 - ctx.dropout))
            grad_x = grad_x.view(x.shape)
        grad_result = grad.to(result_dtype) if ctx.needs_input_grad[0] else None
        return grad_result, grad_x, grad_A, grad_B, None, None
