"""lorafit.lora.ops against the plain path: lora_linear, matmul16, dropout masks, rebuilt inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit import kernels, lora
from lorafit.lora import ops


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(params=["native", "wide"])
def products(request, monkeypatch):
    """Both ways of multiplying 16-bit matrices, whatever this CPU has."""
    monkeypatch.setattr(kernels, "cpu_multiplies_natively", lambda name: request.param != "wide")
    yield request.param


def _layer(dropout: float, bias: bool = False) -> lora.Linear:
    torch.manual_seed(0)
    layer = lora.Linear(48, 40, r=4, lora_alpha=8, lora_dropout=dropout, merge_weights=False, bias=bias)
    layer.weight.data = layer.weight.data.bfloat16()  # a bf16 base under fp32 LoRA, as apply_lora leaves it
    if bias:
        layer.bias.data = layer.bias.data.bfloat16()
        layer.bias.requires_grad = False
    nn.init.normal_(layer.lora_B)
    return layer


def _reference(layer: lora.Linear, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """PEFT's computation under autocast, op by op, with nn.Dropout's arithmetic on ``keep``."""
    xd = x
    if keep is not None:
        noise = keep.to(x.dtype).div_(1.0 - layer.lora_dropout.p)  # nn.Dropout's CPU noise, in x's dtype
        xd = x * noise
    update = F.linear(F.linear(xd, layer.lora_A), layer.lora_B)
    return F.linear(x, layer.weight, layer.bias) + update * layer.scaling


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_equals_the_op_by_op_path(products, dropout, bias) -> None:
    """Outputs and gradients (input, A, B) equal autocast's op-by-op computation with the same mask,
    to bf16 rounding, with products native or widened to fp32."""
    layer = _layer(dropout, bias)
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(3, 5, 40)

    def run(fused: bool) -> list[torch.Tensor]:
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                out = layer(x)
            else:
                # the mask lora_linear draws: from a seed taken from the default generator
                keep = ops.dropout_keep_mask(x.shape, dropout, x.device, ops.draw_seed()) if dropout else None
                out = _reference(layer, x, keep)
        out.backward(upstream.to(out.dtype))
        return [out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad]

    fused, reference = run(True), run(False)
    assert fused[0].dtype == torch.bfloat16 and fused[1].dtype == torch.bfloat16
    assert fused[2].dtype == fused[3].dtype == torch.float32
    for a, b in zip(fused, reference, strict=True):
        assert _rel(a, b) < 5e-3  # about one bf16 rounding (2^-8) of the output


def test_lora_linear_keeps_only_the_input_and_rank_r_tensors() -> None:
    """With dropout, nothing of the input's size is kept but the 16-bit input itself (no mask, no
    fp32 copy, no dropped copy)."""
    layer = _layer(0.3)
    x = torch.randn(64, 48, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    kept = [x, layer.weight, layer.lora_A, layer.lora_B]
    assert all(any(t is k for t in saved) for k in kept)  # no copies of these
    others = [t for t in saved if not any(t is k for k in kept)]
    assert len(others) == 1 and others[0].shape == (64, 4)  # u = drop(x) A^T


def test_the_mask_drawn_again_from_its_seed_is_the_same(monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # pieces on their own generators
    shape = torch.Size([300, 1024])
    first = ops.dropout_keep_mask(shape, 0.2, torch.device("cpu"), seed=123)
    torch.manual_seed(5)  # the default generator plays no part
    assert torch.equal(first, ops.dropout_keep_mask(shape, 0.2, torch.device("cpu"), seed=123))
    assert not torch.equal(first, ops.dropout_keep_mask(shape, 0.2, torch.device("cpu"), seed=124))
    assert abs(first.float().mean().item() - 0.8) < 5e-3


def test_dropout_scale_is_nn_dropouts() -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        torch.manual_seed(0)
        out = nn.Dropout(0.05).train()(torch.ones(1000, dtype=dtype))
        ones = torch.ones(1000, dtype=dtype)
        assert out.max() == ones.mul_(ops.dropout_scale(0.05, dtype, torch.device("cpu"))).max()


def test_matmul16_widened_is_one_rounding_of_the_exact_product(products) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(33, 70, generator=gen).bfloat16()
    b = torch.randn(70, 21, generator=gen).bfloat16()
    exact = a.double() @ b.double()
    got = kernels.matmul16(a, b)
    assert got.dtype == torch.bfloat16
    assert _rel(got, exact) < 2**-8


def _double(t: torch.Tensor) -> torch.Tensor:
    return t * 2


def test_a_rebuildable_input_is_not_kept_and_gives_the_same_gradients() -> None:
    layer = _layer(0.3)
    source = torch.randn(64, 48, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(64, 40)

    def run(rebuildable: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layer.zero_grad()
        source.grad = None
        saved: list[torch.Tensor] = []
        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x = source * 2
                if rebuildable:
                    kernels.mark_rebuildable(x, _double, source)
                out = layer(x)
        out.backward(upstream.to(out.dtype))
        return [out.detach(), source.grad, layer.lora_A.grad, layer.lora_B.grad], saved

    (plain, plain_saved), (rebuilt, rebuilt_saved) = run(False), run(True)
    for a, b in zip(plain, rebuilt, strict=True):
        assert torch.equal(a, b)
    assert any(t.numel() == 64 * 48 and t is not source for t in plain_saved)
    assert not any(t.numel() == 64 * 48 and t is not source for t in rebuilt_saved)


def test_an_input_changed_in_place_is_kept_not_rebuilt() -> None:
    source = torch.randn(4, 48, dtype=torch.bfloat16)
    x = kernels.mark_rebuildable(source * 2, _double, source)
    assert kernels.rebuild_recipe(x) is not None
    x.add_(1)
    assert kernels.rebuild_recipe(x) is None


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_linear_over_a_4bit_base_equals_the_op_by_op_path(products, dropout, monkeypatch) -> None:
    """Over a bitsandbytes NF4 base, lora_linear (the weight dequantized when needed) gives what
    bitsandbytes' layer plus autocast's op-by-op update gives, to bf16 rounding."""
    pytest.importorskip("bitsandbytes")
    from lorafit.adapters import LoraConfig, apply_lora
    from lorafit.models.quant import QLORA_SETTINGS, prepare_kbit_model

    from tiny import tiny_phi3

    model = tiny_phi3(dtype=torch.bfloat16, hidden=64).train()
    prepare_kbit_model(model, QLORA_SETTINGS)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    layer = model.model.layers[0].mlp.gate_up_proj
    assert layer.base_layer is not None
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(3, 7, layer.out_features)

    def run(fused: bool) -> list[torch.Tensor]:
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                out = layer(x)
            else:
                keep = ops.dropout_keep_mask(x.shape, dropout, x.device, ops.draw_seed()) if dropout else None
                xd = x if keep is None else (x * keep).mul_(ops.dropout_scale(dropout, x.dtype, x.device))
                update = F.linear(F.linear(xd, layer.lora_A), layer.lora_B) * layer.scaling
                out = layer.base_layer(x) + update
        out.backward(upstream.to(out.dtype))
        return [out.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad]

    for a, b in zip(run(True), run(False), strict=True):
        assert _rel(a, b) < 5e-3


def test_frozen_linear_equals_autocasts_linear_and_keeps_only_the_weight(products) -> None:
    gen = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(40, 48, generator=gen).bfloat16(), torch.randn(40, generator=gen).bfloat16()
    x = torch.randn(3, 5, 48, generator=gen).bfloat16().requires_grad_()
    upstream = torch.randn(3, 5, 40, generator=gen).bfloat16()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = kernels.frozen_linear(x, weight, bias)
    (ours_grad,) = torch.autograd.grad(ours, x, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.linear(x, weight, bias)
    (plain_grad,) = torch.autograd.grad(plain, x, upstream)
    assert ours.dtype == plain.dtype == torch.bfloat16
    assert _rel(ours, plain) < 2**-8 and _rel(ours_grad, plain_grad) < 2**-8
    assert len(saved) == 1 and saved[0] is weight
