"""Attention within each packed example: a fraction of the work, sdpa's accuracy.

For a packed row transformers builds a block-diagonal causal mask from the position_ids, and
sdpa then scores every pair of the row's ``T`` tokens before masking most of them away. On CPU
its fused kernel is also slow per score: on the bench model (8 rows of 512 tokens, 8 heads of
64) it takes about 83 ms per layer, forward and backward, whatever the mask: a third of a
training step. :func:`packed_attention` computes each example of ``n`` tokens on its own
(about 42 ms per layer for the same rows):

    S = (Q K^T) * scale,   P = softmax(S + causal mask),   O = P V,
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dP * P)) * scale,   dQ = dS K,   dK = dS^T Q.

Only ``sum(n_i^2)`` scores are formed instead of ``B T^2``. S, the softmax, dP and dS are
computed in fp32 (from bf16 Q, K, V and dO when the model runs in bf16): a rounded score would
become a relative error in its weight, and dP - rowsum(dP * P) cancels. P and dS are rounded
to the model's dtype for the products with V, K and Q, which run at the machine's bf16 rate, as
transformers' eager attention does for P. Against an fp64 computation the output's error is
1.04x sdpa's bf16 error and the gradients' 0.9-0.95x (tests/test_attention.py). Backward keeps P
besides Q, K and V.

The example boundaries come from :class:`lorafit.data.PackedCollator` (``cu_seq_lens_q``, which
transformers passes on to attention functions). Everything else goes to transformers' own sdpa
function with the mask it was given: rows without boundaries (padded batches, whose attention
mask is sdpa's to apply), boundaries that do not cover the rows exactly, a KV cache (keys longer
than the queries), mixed dtypes, attention dropout in training, a non-causal module, and a
sliding window shorter than an example.
"""

from __future__ import annotations

from typing import Any

import torch

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
    lengths = cu_seq_lens.diff().tolist() if cu_seq_lens is not None else []
    if (
        not lengths
        or sum(lengths) != batch * length
        or key.shape[2] != length
        or not query.dtype == key.dtype == value.dtype
        or (dropout and module.training)
        or not getattr(module, "is_causal", True)
        or (window is not None and max(lengths) > window)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if key.shape[1] != heads:  # grouped-query attention: repeat each key/value head
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    scale = dim**-0.5 if scaling is None else scaling
    out = _ExampleAttention.apply(query, key, value, _examples(lengths, batch, length), scale)
    return out.transpose(1, 2).contiguous(), None


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


class _ExampleAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, examples, scale):  # noqa: ANN001, ANN205
        with torch.autocast(q.device.type, enabled=False):  # the dtypes below, whatever autocast says
            return _ExampleAttention._forward(ctx, q, k, v, examples, scale)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        with torch.autocast(grad.device.type, enabled=False):
            return _ExampleAttention._backward(ctx, grad)

    @staticmethod
    def _forward(ctx, q, k, v, examples, scale):  # noqa: ANN001, ANN205
        # Contiguous (B, H, T, D) once: each example's (H, n, D) slice is then a strided batch
        # that bmm reads and writes in place.
        wide = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        qf, kf, v = q.to(wide).contiguous(), k.to(wide).contiguous(), v.contiguous()
        above = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).triu_(1)
        out = torch.empty_like(v)
        probs = []
        for b, s, n in examples:
            rows = slice(s, s + n)
            scores = torch.bmm(qf[b, :, rows], kf[b, :, rows].transpose(1, 2)).mul_(scale)  # (H, n, n)
            scores.masked_fill_(above[:n, :n], float("-inf"))
            p = torch.softmax(scores, dim=-1).to(v.dtype)
            torch.bmm(p, v[b, :, rows], out=out[b, :, rows])
            probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.examples, ctx.scale = examples, scale
        return out

    @staticmethod
    def _backward(ctx, grad):  # noqa: ANN001, ANN205
        q, k, v, *probs = ctx.saved_tensors
        dtype = v.dtype
        q, k = q.contiguous(), k.contiguous()
        g = grad.to(dtype).contiguous()
        # dP in fp32 too: dP - rowsum(dP * P) cancels, and would magnify dP's bf16 rounding
        wide = torch.promote_types(dtype, torch.float32)
        gf, vf = g.to(wide), v.to(wide)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for (b, s, n), p in zip(ctx.examples, probs, strict=True):
            rows = slice(s, s + n)
            torch.bmm(p.transpose(1, 2), g[b, :, rows], out=dv[b, :, rows])
            dp = torch.bmm(gf[b, :, rows], vf[b, :, rows].transpose(1, 2))  # (H, n, n)
            pf = p.to(wide)
            ds = dp.sub_((dp * pf).sum(-1, keepdim=True)).mul_(pf).mul_(ctx.scale).to(dtype)
            torch.bmm(ds, k[b, :, rows], out=dq[b, :, rows])
            torch.bmm(ds.transpose(1, 2), q[b, :, rows], out=dk[b, :, rows])
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
