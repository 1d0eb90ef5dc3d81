"""Attention within each packed example, in tiles: memory linear in its length, sdpa's accuracy.

For a packed row transformers builds a block-diagonal causal mask from the position_ids, and
sdpa then scores every pair of the row's ``T`` tokens before masking most of them away.
:func:`packed_attention` computes each example of ``n`` tokens on its own, a block of query
rows at a time (flash attention's forward and backward, with whole key rows per block)::

    S = (Q_i K_{<=i}^T) * scale,   P = softmax(S + causal mask),   O_i = P V,   L_i = logsumexp(S)
    backward, S again from Q, K and L:   P = exp(S - L),   dP = dO_i V^T,   D = rowsum(dP * P),
    dV += P^T dO_i,   dS = P * (dP - D) * scale,   dQ_i = dS K,   dK += dS^T Q_i

A block of ``m`` queries meets only the keys up to its last row, so about ``n^2 / 2`` scores are
formed per example instead of ``T^2`` per row, and no more than one block's scores exist at a
time (``TILE_SCORES``). Backward keeps Q, K, V and ``L`` (one fp32 number per query and head):
memory grows linearly with the example's length (keeping P, as a plain
implementation does, costs ``H n^2`` 16-bit numbers: 268 MB per layer for one 2048-token
Phi-3-mini example). Grouped-query attention reads each key/value head for its group of query
heads without repeating it.

S, the softmax, dP and dS are computed in fp32 (from 16-bit Q, K, V and dO): a rounded score
would become a relative error in its weight, and dP - D cancels. P and dS are rounded to the
model's dtype for the products O = P V, dQ = dS K and dK = dS^T Q where the machine multiplies
16-bit matrices natively (:func:`lorafit.kernels.widen_products`; elsewhere they stay fp32), as
transformers' eager attention does for P; dV = P^T dO is an fp32 product, and partial sums of dK
and dV over query blocks accumulate in fp32.
Against an fp64 computation the output's and the gradients' errors are within sdpa's bf16 errors
(tests/models/test_attention.py).

The example boundaries come from :class:`lorafit.data.PackedCollator` (``cu_seq_lens_q``, which
transformers passes on to attention functions). Everything else goes to transformers' own sdpa
function with the mask it was given: rows without boundaries (padded batches, whose attention
mask is sdpa's to apply), boundaries that do not cover the rows exactly, a KV cache (keys longer
than the queries), mixed dtypes, attention dropout in training, a non-causal module, and a
sliding window shorter than an example. The per-example loop reads the boundaries on the host,
so it runs on CPUs only: tensors on an accelerator go to sdpa without the boundaries being read
(no host sync per layer), and :func:`lorafit.training.train` switches to it only on CPU;
flash-attention's varlen kernel and sdpa read the boundaries from the position_ids there.
"""

from __future__ import annotations

from typing import Any

import torch

from lorafit.kernels import widen_products

__all__ = ["PACKED_ATTENTION", "packed_attention", "use_packed_attention"]

PACKED_ATTENTION = "lorafit_packed"
"""The attention implementation name :func:`use_packed_attention` gives a model."""


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: ``query`` (B, H, T, D), ``key``/``value`` (B, H_kv, T, D)
    in, (B, T, H, D) out, each packed example attending causally to itself alone."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    window = kwargs.get("sliding_window")
    batch, heads, length, dim = query.shape
    on_cpu = query.device.type == "cpu"  # elsewhere reading the boundaries would sync every layer
    lengths = cu_seq_lens.diff().tolist() if cu_seq_lens is not None and on_cpu else []
    if (
        not lengths
        or sum(lengths) != batch * length
        or key.shape[2] != length
        or not query.dtype == key.dtype == value.dtype
        or heads % key.shape[1] != 0
        or (dropout and module.training)
        or not getattr(module, "is_causal", True)
        or (window is not None and max(lengths) > window)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = dim**-0.5 if scaling is None else scaling
    return _ExampleAttention.apply(query, key, value, _examples(lengths, batch, length), scale), None


def _examples(lengths: list[int], batch: int, length: int) -> tuple[tuple[int, int, int], ...]:
    """(row, start, length) of every example; each row's examples (padding too) fill the row."""
    examples, position = [], 0
    for n in lengths:
        row, start = divmod(position, length)
        if start + n > length:
            raise ValueError(f"an example of {n} tokens crosses the end of packed row {row}")
        examples.append((row, start, n))
        position += n
    return tuple(examples)


TILE_SCORES = 1 << 22
"""Scores per block of query rows (16 MB in fp32): the attention's working memory, whatever ``n``."""


def _query_block(heads: int, n: int) -> int:
    return max(16, min(n, TILE_SCORES // (heads * n)))


class _ExampleAttention(torch.autograd.Function):
    """q (B, H, T, D), k and v (B, H_kv, T, D) in; (B, T, H, D) out (what attention functions return)."""

    @staticmethod
    def forward(ctx, q, k, v, examples, scale):
        with torch.autocast(q.device.type, enabled=False):  # the dtypes below, whatever autocast says
            return _ExampleAttention._forward(ctx, q, k, v, examples, scale)

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return _ExampleAttention._backward(ctx, grad)

    @staticmethod
    def _forward(ctx, q, k, v, examples, scale):
        batch, heads, length, dim = q.shape
        kv_heads, dtype = k.shape[1], v.dtype
        group = heads // kv_heads
        wide = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        low = wide if widen_products(dtype, q.device.type) else dtype  # operands of the P V product
        # Contiguous (B, H, T, D) once: an example's (H, n, D) slice is then a strided batch.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty(batch, length, heads, dim, dtype=dtype, device=q.device)
        lse = torch.empty(batch, heads, length, dtype=wide, device=q.device)
        for b, s, n in examples:
            rows = slice(s, s + n)
            qe = q[b, :, rows].view(kv_heads, group, n, dim)
            ke, ve = k[b, :, rows].to(wide), v[b, :, rows].to(low)  # (H_kv, n, D)
            step = _query_block(heads, n)
            above = torch.ones(step, step, dtype=torch.bool, device=q.device).triu_(1)
            for i0 in range(0, n, step):
                i1 = min(n, i0 + step)
                m = i1 - i0
                qb = qe[:, :, i0:i1].reshape(kv_heads, group * m, dim).to(wide)
                scores = torch.bmm(qb, ke[:, :i1].transpose(1, 2)).mul_(scale)  # (H_kv, g m, i1)
                scores.view(kv_heads, group, m, i1)[..., i0:].masked_fill_(above[:m, :m], float("-inf"))
                top = scores.amax(-1, keepdim=True)
                probs = scores.sub_(top).exp_()
                total = probs.sum(-1, keepdim=True)
                probs.div_(total)  # softmax, as torch.softmax computes it
                lse[b, :, s + i0 : s + i1] = (top + total.log_()).view(heads, m)
                o = torch.bmm(probs.to(low), ve[:, :i1])  # (H_kv, g m, D)
                out[b, s + i0 : s + i1] = o.view(heads, m, dim).transpose(0, 1)
        ctx.save_for_backward(q, k, v, lse)
        ctx.examples, ctx.scale = examples, scale
        return out

    @staticmethod
    def _backward(ctx, grad):
        q, k, v, lse = ctx.saved_tensors
        heads, dim, kv_heads, dtype = q.shape[1], q.shape[3], k.shape[1], v.dtype
        group = heads // kv_heads
        wide = torch.promote_types(dtype, torch.float32)
        low = wide if widen_products(dtype, q.device.type) else dtype  # operands of dV, dQ, dK
        grad = grad.to(dtype)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for b, s, n in ctx.examples:
            rows = slice(s, s + n)
            qe = q[b, :, rows].view(kv_heads, group, n, dim)
            ke, ve = k[b, :, rows].to(wide), v[b, :, rows].to(wide)  # (H_kv, n, D)
            ke_low = ke.to(low)
            dk_acc = torch.zeros(kv_heads, n, dim, dtype=wide, device=q.device)
            dv_acc = torch.zeros(kv_heads, n, dim, dtype=wide, device=q.device)
            step = _query_block(heads, n)
            above = torch.ones(step, step, dtype=torch.bool, device=q.device).triu_(1)
            for i0 in range(0, n, step):
                i1 = min(n, i0 + step)
                m = i1 - i0
                block = slice(s + i0, s + i1)
                qb = qe[:, :, i0:i1].reshape(kv_heads, group * m, dim).to(wide)  # (H_kv, g m, D)
                # dO of the block as (H_kv, g m, D), like qb
                do = grad[b, block].transpose(0, 1).reshape(kv_heads, group * m, dim).to(wide)
                scores = torch.bmm(qb, ke[:, :i1].transpose(1, 2)).mul_(ctx.scale)  # (H_kv, g m, i1)
                scores.view(kv_heads, group, m, i1)[..., i0:].masked_fill_(above[:m, :m], float("-inf"))
                probs = scores.sub_(lse[b, :, block].reshape(kv_heads, group * m, 1)).exp_()
                # in fp32: bf16 partial sums of P^T dO over query blocks would add up to 1.03x sdpa's error
                dv_acc[:, :i1] += torch.bmm(probs.transpose(1, 2), do)
                # dP in fp32: dP - D cancels, and would magnify dP's bf16 rounding. D = rowsum(dP * P)
                # rather than rowsum(dO * O), which carries O's rounding (1.2x the error of dQ, dK)
                dp = torch.bmm(do, ve[:, :i1].transpose(1, 2))  # (H_kv, g m, i1)
                ds = dp.sub_((dp * probs).sum(-1, keepdim=True)).mul_(probs).mul_(ctx.scale).to(low)
                dq_block = torch.bmm(ds, ke_low[:, :i1])  # (H_kv, g m, D)
                dq[b, :, block] = dq_block.view(heads, m, dim)
                dk_acc[:, :i1] += torch.bmm(ds.transpose(1, 2), qb.to(low))
            dk[b, :, rows] = dk_acc
            dv[b, :, rows] = dv_acc
        return dq, dk, dv, None, None


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Give an sdpa model :func:`packed_attention`; returns whether it did.

    Masks are built as for sdpa, so every case the function hands back to sdpa gets the mask it
    expects. ``model.set_attn_implementation(...)`` goes back.
    """
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(PACKED_ATTENTION)
    except (ValueError, NotImplementedError):  # a model that refuses custom attention functions
        return False
    return model.config._attn_implementation == PACKED_ATTENTION
