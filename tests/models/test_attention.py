"""lorafit.models.attention on its own: sdpa's result over a block-diagonal mask, as accurately,
in tiles of query rows, with grouped-query attention, keeping nothing quadratic in the length.

The model-level checks (packed logits equal per-example logits, gradients equal sdpa's, the
fallbacks to sdpa, training through it) are in tests/data/test_pack.py and tests/training/test_run.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafit import kernels
from lorafit.models import attention
from lorafit.models.attention import _ExampleAttention, _examples

B, H, T, D = 4, 4, 96, 16
LENGTHS = [30, 40, 26, 50, 46, 20, 60, 16, 96]  # four rows of 96 tokens; the last row one example


def block_causal_mask() -> torch.Tensor:
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b, s, n in _examples(LENGTHS, B, T):
        mask[b, 0, s : s + n, s : s + n] = torch.ones(n, n, dtype=torch.bool).tril()
    return mask


@pytest.fixture(params=["native", "wide", "tiles"])
def mode(request, monkeypatch):
    """16-bit products native or widened to fp32; "tiles": blocks of 16 query rows (several per example)."""
    monkeypatch.setattr(kernels, "cpu_multiplies_natively", lambda name: request.param != "wide")
    if request.param == "tiles":
        monkeypatch.setattr(attention, "TILE_SCORES", 16 * H * 16)
    yield request.param


def run(attention, dtype: torch.dtype, seed: int, kv_heads: int = H) -> list[torch.Tensor]:
    """Output and the gradients of Q, K and V, in fp64 for comparison."""
    gen = torch.Generator().manual_seed(seed)
    q, upstream = (torch.randn(B, H, T, D, generator=gen) * 2 for _ in range(2))
    k, v = (torch.randn(B, kv_heads, T, D, generator=gen) * 2 for _ in range(2))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = attention(q, k, v)
    out.backward(upstream.to(dtype))
    return [t.detach().double() for t in (out, q.grad, k.grad, v.grad)]


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(), enable_gqa=True)


def ours(q, k, v):
    return _ExampleAttention.apply(q, k, v, _examples(LENGTHS, B, T), D**-0.5).transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [H, 2])
def test_equals_sdpa_with_the_block_diagonal_mask_in_fp64(mode, kv_heads) -> None:
    found, expected = run(ours, torch.float64, 0, kv_heads), run(sdpa, torch.float64, 0, kv_heads)
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_is_as_accurate_as_sdpa(mode, seed) -> None:
    """Against fp64: the output within 10% of sdpa's bf16 error (natively the weights are rounded to
    bf16 before the product with V), the gradients no worse."""
    truth = run(sdpa, torch.float64, seed)

    def errors(attention) -> list[float]:
        found = run(attention, torch.bfloat16, seed)
        return [float((a - t).norm() / t.norm()) for a, t in zip(found, truth, strict=True)]

    mine, theirs = errors(ours), errors(sdpa)
    assert mine[0] <= 1.1 * theirs[0]
    assert all(m <= t for m, t in zip(mine[1:], theirs[1:], strict=True))


def test_an_example_across_a_row_end_is_refused() -> None:
    with pytest.raises(ValueError, match="crosses the end of packed row 0"):
        _examples([60, 60], batch=2, length=96)


def test_keeps_nothing_quadratic_in_the_example_length(monkeypatch) -> None:
    """Backward keeps Q, K, V and one fp32 log-sum-exp per query and head, and no block of scores is
    larger than TILE_SCORES."""
    n, heads, dim = 256, 4, 8
    monkeypatch.setattr(attention, "TILE_SCORES", 32 * heads * n)  # eight blocks of 32 rows
    q, k, v = (torch.randn(1, heads, n, dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _ExampleAttention.apply(q, k, v, ((0, 0, n),), dim**-0.5)
    assert sum(t.numel() for t in saved) == 3 * heads * n * dim + heads * n
    largest = []
    real_bmm = torch.bmm

    def bmm(a, b, **kw):
        result = real_bmm(a, b, **kw)
        largest.append(result.numel())
        return result

    monkeypatch.setattr(torch, "bmm", bmm)
    out.backward(torch.ones_like(out))
    assert max(largest) <= 32 * heads * n
