"""The fused LoRA update under autocast, and dropout masks drawn on every core.

What autocast makes of ``result + scaling * drop(x) A^T B^T`` (three casts, four products
and sums) computed as one autograd op with less work and less kept for backward.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch


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


def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """``nn.Dropout(p)``'s keep mask: i.i.d. True with probability ``1 - p``, shaped ``shape``.

    On CPU each element is a uniform 31-bit integer ``u`` (``random_`` on int32), kept where
    ``u >= round(p * 2^31)``: the keep probability is ``1 - p`` to within 2^-32 (``bernoulli_``
    resolves it to 2^-24), at half ``bernoulli_``'s cost per element. PyTorch draws CPU random
    numbers on one thread, and for LoRA dropout on every linear layer that is a tenth of a
    training step, so large masks are cut into one piece per intra-op thread, each drawn by its
    own generator on its own thread. Those generators are seeded from the default one (which
    draws small masks itself), so ``torch.manual_seed`` and gradient checkpointing's RNG
    replay decide the mask as they decide ``nn.Dropout``'s.
    """
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    if device.type != "cpu":
        return keep.bernoulli_(1.0 - p)
    threshold = round(p * 2**31)

    def draw(piece: torch.Tensor, generator: torch.Generator | None = None) -> None:
        bits = torch.empty(piece.shape, dtype=torch.int32).random_(generator=generator)  # [0, 2^31)
        torch.ge(bits, threshold, out=piece)

    threads = torch.get_num_threads()
    if threads < 2 or keep.numel() < _PARALLEL_MASK_MIN:
        draw(keep)
        return keep
    pool = _mask_pool(threads - 1)
    pieces = keep.view(-1).chunk(threads)
    generators = [torch.Generator().manual_seed(s) for s in torch.randint(0, 2**62, (len(pieces),)).tolist()]
    others = [pool.submit(draw, piece, g) for piece, g in zip(pieces[1:], generators[1:], strict=True)]
    draw(pieces[0], generators[0])
    for future in others:
        future.result()
    return keep


class _LoRAUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, x, lora_A, lora_B, scaling, dropout):  # noqa: ANN001, ANN205
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
    def backward(ctx, grad):  # noqa: ANN001, ANN205
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
