"""Decoder layers that keep less for backward: norms and SiLU gates rebuilt, not kept.

A Llama-family decoder layer (Llama, Phi-3, Mistral, Qwen2/3, SmolLM) computes, per token::

    a = x + o_proj(attention(qkv(n1)))      n1 = w1 * norm(x),  norm(x) = x / sqrt(mean(x^2) + eps)
    y = a + down(silu(gate) * up)           gate, up = gate_up(n2),  n2 = w2 * norm(a)

Autograd keeps, for a bf16 Phi-3-mini layer, fp32 copies of ``x`` and ``a`` and of their
normalised values in the norms, SiLU's input and output and ``up`` in the gate, and each linear
layer's input again. But ``n1``, ``n2`` and ``silu(gate) * up`` are elementwise functions of
tensors that backward needs anyway (``x`` and ``a`` with one fp32 number per token, ``gate`` and
``up``). :func:`use_lean_layers` gives a model's norms and MLPs forwards that compute exactly
what transformers' do (the same ops in the same order: outputs are bit for bit the same) with
autograd functions that keep only those tensors and mark their outputs rebuildable
(:func:`lorafit.kernels.mark_rebuildable`): the LoRA linear layer that reads ``n1``, ``n2`` or
the gate then keeps nothing of its own input and rebuilds it in backward. Per token and layer
that is ``x``, ``a``, ``gate``, ``up`` and the attention's q, k, v and output, all 16-bit
(68 KB for Phi-3-mini in bf16, against about 180 KB op by op).

Only modules whose classes compute exactly the formulas above are changed (``LEAN_NORMS``,
``LEAN_MLPS``, with a SiLU activation); anything else keeps its own forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.kernels import frozen_linear, mark_rebuildable
from lorafit.models.precision import Precision

__all__ = ["LEAN_MLPS", "LEAN_NORMS", "rms_norm", "silu_mul", "use_lean_layers", "use_wide_linears"]

# RMSNorms computing ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)``.
LEAN_NORMS = frozenset({"LlamaRMSNorm", "Phi3RMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# MLPs computing ``down(act(gate(x)) * up(x))`` (separate projections) or, Phi-3's,
# ``down(up * act(gate))`` with ``gate, up = gate_up(x).chunk(2, -1)``.
LEAN_MLPS = {
    "LlamaMLP": "separate",
    "MistralMLP": "separate",
    "Qwen2MLP": "separate",
    "Qwen3MLP": "separate",
    "Phi3MLP": "fused",
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` in fp32, keeping
    ``x`` and one fp32 ``rsqrt`` per row for backward; the output is marked rebuildable from them."""
    y, rstd = _RMSNorm.apply(x, weight, eps)
    return mark_rebuildable(y, _norm_output, x, rstd, weight)


def _norm_output(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x.to(torch.float32) * rstd).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.to(torch.float32)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        y = weight * (h * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        ctx.mark_non_differentiable(rstd)
        return y, rstd

    @staticmethod
    def backward(ctx, dy, _drstd):
        # y = w * round(n), n = x * r, r = (mean(x^2) + eps)^-1/2:
        #   dn = dy * w (in y's dtype, as autograd's mul),  dx = r * (dn - n * mean(dn * n))
        x, rstd, weight = ctx.saved_tensors
        n = x.to(torch.float32) * rstd
        dn16 = dy * weight
        dn = dn16.to(torch.float32)
        dx = (dn - n * (dn * n).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * n.to(x.dtype)).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, keeping ``gate`` and ``up`` only; the output is marked rebuildable."""
    return mark_rebuildable(_SiluMul.apply(gate, up), _gated, gate, up)


def _gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _gated(gate, up)

    @staticmethod
    def backward(ctx, grad):
        # the ops autograd runs for silu(gate) * up, in the same dtypes
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


def _lean_norm_forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _lean_separate_mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))


def _lean_fused_mlp_forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    gate, up = module.gate_up_proj(hidden_states).chunk(2, dim=-1)
    return module.down_proj(silu_mul(gate, up))


def _wide_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    frozen = not module.weight.requires_grad and (module.bias is None or not module.bias.requires_grad)
    if frozen and torch.is_autocast_enabled(x.device.type):
        return frozen_linear(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


def use_wide_linears(model: nn.Module, precision: Precision) -> int:
    """Where ``precision.widened`` (16-bit weights on a CPU without 16-bit matrix instructions), give
    the model's plain ``nn.Linear`` layers (those LoRA does not wrap: the output head, layers outside
    ``target_modules``) a forward whose products under autocast are fp32 products of the same
    16-bit values (:func:`lorafit.kernels.frozen_linear`), as lorafit's LoRA layers, attention and
    loss compute theirs; elsewhere it changes nothing. Returns how many layers changed."""
    if not precision.widened:
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):
            module.forward = functools.partial(_wide_linear_forward, module)
            changed += 1
    return changed


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def use_lean_layers(model: nn.Module) -> int:
    """Give the model's RMSNorms and SiLU MLPs the lean forwards; returns how many modules changed.

    The forwards are set on the modules (an instance attribute, so ``del module.forward`` goes
    back); they compute the same outputs as transformers' own, so inference and merging are
    unaffected. Modules whose forward was already replaced (by a hub kernel, say) are left alone.
    """
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if "forward" in vars(module):
            continue
        if name in LEAN_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = functools.partial(_lean_norm_forward, module)
        elif LEAN_MLPS.get(name) == "separate" and _is_silu(getattr(module, "act_fn", None)):
            module.forward = functools.partial(_lean_separate_mlp_forward, module)
        elif LEAN_MLPS.get(name) == "fused" and _is_silu(getattr(module, "activation_fn", None)):
            module.forward = functools.partial(_lean_fused_mlp_forward, module)
        else:
            continue
        changed += 1
    return changed
