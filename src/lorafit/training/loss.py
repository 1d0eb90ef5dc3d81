"""The causal-LM loss without full-vocabulary logits: prompt tokens never reach the output head.

Hugging Face's loss (``ForCausalLMLoss``) projects every position through the head, upcasts
the ``(B, T, V)`` logits to fp32 and takes the cross-entropy over the positions whose
shifted label is not -100::

    loss = sum_{t : y_{t+1} != -100} (logsumexp(z_t) - z_t[y_{t+1}]) / n,    z_t = W h_t + b

with ``n`` = ``num_items_in_batch`` when the Trainer passes it (gradient accumulation:
label tokens of the whole accumulated batch), else the number of label tokens here.
:func:`causal_lm_loss` computes the same number. It runs the model with
an empty ``logits_to_keep`` (the head sees no position), takes the decoder's final
hidden states from a forward hook, keeps only the ``M`` positions with a label, and
projects those through the head in chunks of rows: a ``(chunk, V)`` tile is computed in the
head's compute dtype (bf16 under autocast, as ``nn.Linear`` would), upcast to fp32 for the
log-sum-exp, and dropped. Its gradient ``softmax(z) - onehot(y)`` is formed from the same
tile right away and multiplied back through the head, so the backward pass only scales a
saved ``(M, hidden)`` tensor: no logits are recomputed and none are kept. With a frozen head
this is the whole gradient; a trainable head, logit soft-capping or scaling, a sharded head
weight, or a model without ``logits_to_keep`` makes :func:`supports_fast_loss` say no, and
the caller uses the model's own loss.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.constants import IGNORE_INDEX
from lorafit.kernels import widen_products

__all__ = ["causal_lm_loss", "supports_fast_loss", "head_cross_entropy_sum"]

# Rows per head tile: about 4M logits (16 MB in fp32) whatever the vocabulary, so a tile stays
# well under glibc's largest mmap threshold (32 MB) and its memory is reused, not page-faulted.
TILE_LOGITS = 1 << 22

# Config attributes that change logits after the head (Gemma 2 soft-capping, Cohere and Granite
# scaling, ...): the plain path applies them, this one does not, so their presence means "no".
_LOGIT_MODIFIERS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier",
)


def supports_fast_loss(model: nn.Module) -> bool:
    """Whether :func:`causal_lm_loss` computes ``model``'s own loss for it.

    ``model`` is the unwrapped Hugging Face causal LM. It needs a plain, frozen ``nn.Linear``
    head whose weight is an ordinary (V, hidden) tensor (not sharded by FSDP or ZeRO-3), a
    separate decoder module (``get_decoder``), a ``logits_to_keep`` forward argument and no
    logit post-processing in its config.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    get_decoder = getattr(model, "get_decoder", None)
    if get_head is None or get_decoder is None:
        return False
    head = get_head()
    if type(head) is not nn.Linear or head.weight.requires_grad or type(head.weight) is not nn.Parameter:
        return False
    if head.bias is not None and head.bias.requires_grad:
        return False
    if head.weight.shape != (head.out_features, head.in_features):
        return False  # a flattened or partitioned shard
    try:
        decoder = get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return False
    if decoder is model or not isinstance(decoder, nn.Module):
        return False
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text_config, name, None) not in (None, 1, 1.0) for name in _LOGIT_MODIFIERS):
        return False
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def causal_lm_loss(
    model: nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None = None,
    *,
    unwrapped: nn.Module | None = None,
) -> torch.Tensor:
    """The causal-LM loss of ``inputs`` (with ``labels``), equal to the model's own.

    ``model`` is what the Trainer calls (possibly wrapped by DDP, so the forward goes through
    it); ``unwrapped`` is the Hugging Face model inside (default: ``model``), which must pass
    :func:`supports_fast_loss`. Returns the fp32 scalar ``sum CE / n`` of the module docstring.
    """
    unwrapped = model if unwrapped is None else unwrapped
    labels = inputs["labels"]
    captured: list[torch.Tensor] = []

    def keep_hidden(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0])  # last_hidden_state, (B, T, hidden), after the final norm

    handle = unwrapped.get_decoder().register_forward_hook(keep_hidden)
    try:
        # An empty index: the head sees no position at all. (``logits_to_keep=1`` would hand it
        # a strided slice, which F.linear turns into a bmm over B copies of the head weight.)
        no_position = torch.empty(0, dtype=torch.long, device=labels.device)
        rest = {k: v for k, v in inputs.items() if k != "labels"}
        model(**rest, logits_to_keep=no_position, use_cache=False)
    finally:
        handle.remove()
    hidden = captured[-1]

    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    head = unwrapped.get_output_embeddings()
    total = head_cross_entropy_sum(hidden[:, :-1][keep], head.weight, head.bias, targets[keep])
    denominator = keep.sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator


def head_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """``sum_i logsumexp(z_i) - z_i[targets_i]`` with ``z = hidden @ weight.T + bias``, in tiles.

    ``hidden``: (M, H); ``weight``: (V, H), frozen; ``targets``: (M,). The product runs in the
    autocast dtype when autocast is on (else in ``hidden``'s dtype), the log-sum-exp in fp32.
    Returns an fp32 scalar whose gradient flows to ``hidden`` only.
    """
    return _HeadCrossEntropy.apply(hidden, weight, bias, targets, *head_tiling(hidden, weight))


def head_tiling(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, int, bool]:
    """How a tiled head runs over ``hidden`` (M, H) and ``weight`` (V, H): the product's dtype (the
    autocast dtype when autocast is on, else the promoted one), the rows per tile (a tile holds at
    most ``TILE_LOGITS`` logits) and whether a gradient to ``hidden`` is needed."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return dtype, max(1, TILE_LOGITS // weight.shape[0]), need_grad


class _HeadCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, tile by tile, d(loss)/d(hidden); backward scales it."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        dtype: torch.dtype,
        rows: int,
        need_grad: bool,
    ):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            # On CPUs without bf16 matrix instructions (where bf16 products run at 0.3-4 GFLOP/s) the
            # products are fp32 products of the same 16-bit values: the head is widened once here,
            # not once per tile, and each product is rounded to dtype as a bf16 product would be.
            wide = widen_products(dtype, hidden.device.type)
            if wide:
                w = w.float()
                b = None if b is None else b.float()
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            # fp32, so the one rounding to hidden's dtype happens after scaling in backward
            grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows].to(dtype)  # (c, H)
                t = targets[start : start + rows]  # (c,)
                logits = F.linear(h.float() if wide else h, w, b)  # (c, V)
                logits = logits.to(dtype).float() if wide else logits.float()  # rounded as nn.Linear's
                picked = logits.gather(1, t[:, None]).squeeze(1)  # z_i[t_i], before z is overwritten
                # The softmax as exp(z - max) / sum, not exp(z - logsumexp): z - max is exact for
                # the largest logits, where z - lse would carry lse's rounding (up to 4e-3
                # relative error in a gradient element for logits in the thousands, measured);
                # one exp over the tile, in place, serves both the loss and the gradient.
                top = logits.amax(dim=-1, keepdim=True)  # (c, 1)
                top = top.masked_fill(~top.isfinite(), 0.0)  # as torch.logsumexp: no inf - inf
                exps = logits.sub_(top).exp_()  # (c, V)
                sums = exps.sum(dim=-1, keepdim=True)  # (c, 1)
                total += (sums.log() + top).squeeze(1).sub_(picked).sum()
                if need_grad:
                    probs = exps.div_(sums)  # softmax, in place: (c, V)
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0
                    probs = probs.to(dtype)  # rounded as autograd rounds the logits' gradient
                    # d(sum CE)/dh: (c, H), rounded to dtype as a bf16 product is
                    grad[start : start + rows] = (probs.float() @ w).to(dtype) if wide else probs @ w
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total).to(ctx.hidden_dtype), None, None, None, None, None, None
