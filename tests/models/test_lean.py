"""lorafit.models.lean against transformers' own forwards: the same outputs and gradients, less kept."""

from __future__ import annotations

import pytest
import torch

from lorafit.adapters import LoraConfig, apply_lora
from lorafit.models.lean import rms_norm, silu_mul, use_lean_layers, use_wide_linears

from tiny import tiny_llama, tiny_phi3

TOKENS = (2, 24)


def _model(make, lean: bool, dtype: torch.dtype = torch.bfloat16, dropout: float = 0.1) -> torch.nn.Module:
    model = make(dtype=dtype).train()
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False
    )
    apply_lora(model, config)
    if lean:
        assert use_lean_layers(model) == 3 * model.config.num_hidden_layers + 1  # 2 norms + MLP, final norm
    return model


def _step(model: torch.nn.Module, autocast: bool) -> tuple[torch.Tensor, dict, int]:
    """Loss, LoRA gradients and the bytes autograd keeps besides the parameters."""
    ids = torch.randint(3, 128, TOKENS, generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(5)  # the same dropout masks on both sides
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("make", [tiny_phi3, tiny_llama])
def test_same_loss_and_gradients_as_transformers_under_autocast(make) -> None:
    plain_loss, plain_grads, plain_bytes = _step(_model(make, lean=False), autocast=True)
    lean_loss, lean_grads, lean_bytes = _step(_model(make, lean=True), autocast=True)
    assert torch.equal(lean_loss, plain_loss)  # the forward runs the same ops: bit for bit
    for name, g in plain_grads.items():
        assert float((lean_grads[name] - g).norm() / g.norm()) < 1e-3, name  # backward: fp32 rounding
    assert lean_bytes < 0.8 * plain_bytes


@pytest.mark.parametrize("make", [tiny_phi3, tiny_llama])
def test_same_loss_and_gradients_in_fp32_without_autocast(make) -> None:
    plain_loss, plain_grads, _ = _step(_model(make, lean=False, dtype=torch.float32, dropout=0.0), False)
    lean_loss, lean_grads, _ = _step(_model(make, lean=True, dtype=torch.float32, dropout=0.0), False)
    assert torch.equal(lean_loss, plain_loss)
    for name, g in plain_grads.items():
        torch.testing.assert_close(lean_grads[name], g, rtol=1e-5, atol=1e-7)


def test_norm_weight_gradient_and_rebuilt_output() -> None:
    """A trained norm weight gets autograd's gradient; the output rebuilt from what the norm keeps
    is the output bit for bit."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 32, generator=gen) * 3).bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(32, generator=gen)).bfloat16().requires_grad_()
    upstream = torch.randn(6, 32, generator=gen).bfloat16()
    h = x.float()
    plain = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    plain_dx, plain_dw = torch.autograd.grad(plain, (x, w), upstream)
    ours = rms_norm(x, w, 1e-6)
    dx, dw = torch.autograd.grad(ours, (x, w), upstream)
    assert torch.equal(ours, plain)
    rebuild, sources = ours._lorafit_rebuild[:2]
    assert torch.equal(rebuild(*sources), ours)
    torch.testing.assert_close(dx.float(), plain_dx.float(), rtol=1e-2, atol=1e-2)  # one bf16 rounding
    torch.testing.assert_close(dw.float(), plain_dw.float(), rtol=1e-2, atol=1e-2)


def test_silu_gate_gradients_are_autograds() -> None:
    gen = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(5, 16, generator=gen).bfloat16().requires_grad_() for _ in range(2))
    upstream = torch.randn(5, 16, generator=gen).bfloat16()
    plain = torch.nn.functional.silu(gate) * up
    expected = torch.autograd.grad(plain, (gate, up), upstream)
    ours = silu_mul(gate, up)
    assert torch.equal(ours, plain)
    for a, b in zip(torch.autograd.grad(ours, (gate, up), upstream), expected, strict=True):
        assert torch.equal(a, b)


def test_other_activations_keep_their_forward() -> None:
    model = tiny_llama()
    model.config.hidden_act = "gelu"
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    gelu = LlamaForCausalLM(model.config)
    assert use_lean_layers(gelu) == 2 * gelu.config.num_hidden_layers + 1  # the norms only
    assert all("forward" not in vars(layer.mlp) for layer in gelu.model.layers)


def test_wide_linears_only_where_the_cpu_has_no_bf16_products(monkeypatch) -> None:
    from lorafit import kernels
    from lorafit.config import ModelConfig
    from lorafit.models.precision import Precision

    def precision(native: tuple[str, ...]) -> Precision:  # LoRA training of a 10 B bf16 model on a CPU
        model = ModelConfig(torch_dtype="bfloat16")
        return Precision.decide(
            model, {"bf16": True}, training=True, on_cpu=True, native=native, count_params=lambda: 10**10
        )

    model = _model(tiny_phi3, lean=False)  # LoRA on every linear layer but the head
    assert use_wide_linears(model, precision(("bfloat16",))) == 0
    monkeypatch.setattr(kernels, "cpu_multiplies_natively", lambda name: False)  # the kernels widen too
    plain_loss, plain_grads, _ = _step(_model(tiny_phi3, lean=False), autocast=True)
    assert use_wide_linears(model, precision(())) == 1 and "forward" in vars(model.lm_head)
    loss, grads, _ = _step(model, autocast=True)
    assert abs(float(loss - plain_loss)) < 1e-2
    for name, g in plain_grads.items():
        assert float((grads[name] - g).norm() / g.norm()) < 2e-2, name
