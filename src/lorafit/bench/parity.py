"""Before timing: the same math on both sides (one batch, loss and gradients), and the ceiling
that the machine's matrix-product rate puts on tokens per second."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from lorafit.bench.settings import LORA, BenchSettings
from lorafit.bench.workload import bench_tokenizer, tokenized_examples
from lorafit.errors import LorafitError


def parity_check(paths: dict[str, str], settings: BenchSettings) -> dict[str, Any]:
    """Loss and LoRA gradients of one packed batch: lorafit vs PEFT vs an fp32 reference.

    All three start from the same bf16 base weights and the same LoRA weights (``B`` random,
    not zero, so every gradient is non-trivial); dropout is off so the batch is deterministic.
    lorafit runs its layers, its packed attention and :func:`lorafit.training.loss.causal_lm_loss`
    under bf16 autocast (what its Trainer does); PEFT runs its layers, sdpa and the model's own
    loss under bf16 autocast (what TRL's Trainer does); the reference is PEFT's computation in
    fp32 without autocast. The check passes when the two losses differ by at most bf16's unit
    roundoff (2^-8) relative and lorafit's largest relative LoRA-gradient error against the
    reference is at most 1.5 times PEFT's. (The two attention paths round independently, so
    the one-number loss errors scatter either way by a factor of 2 or 3, and gradient errors,
    carried back through every layer, by about a quarter; lorafit.models.attention alone is at least as
    accurate as sdpa: tests/models/test_attention.py.)
    """
    bounded = _parity_batch(paths, settings)
    # lorafit trains packed rows with its per-example attention (lorafit.models.attention), which reads
    # the example boundaries; PEFT's model gets the same rows without them and runs sdpa.
    batch = {k: v for k, v in bounded.items() if not k.startswith("cu_seq_lens")}
    config = {**LORA, "lora_dropout": 0.0}
    ours = _lorafit_model(paths["parity_model"], config, settings.seed)
    lora_weights = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    results = {
        "lorafit": _loss_and_grads(ours, bounded, ours_loss=True, autocast=True),
        "peft": _loss_and_grads(
            _peft_model(paths["parity_model"], config, lora_weights, torch.bfloat16), batch, False, True
        ),
        "fp32 reference": _loss_and_grads(
            _peft_model(paths["parity_model"], config, lora_weights, torch.float32), batch, False, False
        ),
    }
    report = {
        "tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "loss": {name: value[0] for name, value in results.items()},
        "lorafit_vs_peft": _distance(results["lorafit"], results["peft"]),
        "lorafit_vs_fp32": _distance(results["lorafit"], results["fp32 reference"]),
        "peft_vs_fp32": _distance(results["peft"], results["fp32 reference"]),
    }
    report["passed"] = (
        report["lorafit_vs_peft"]["loss_abs"] <= 2**-8 * abs(report["loss"]["peft"])
        and report["lorafit_vs_fp32"]["grad_rel_max"] <= 1.5 * report["peft_vs_fp32"]["grad_rel_max"]
    )
    return report


LossAndGrads = tuple[float, dict[str, torch.Tensor]]


def _parity_batch(paths: dict[str, str], settings: BenchSettings) -> dict[str, torch.Tensor]:
    """One batch of packed rows of the bench data, with the example boundaries."""
    from lorafit.data import PackedCollator, pack

    length = settings.parity_length or settings.max_length
    examples = tokenized_examples(paths, settings, max_length=length)
    rows = pack(examples.lengths.tolist(), length)[: settings.batch_size]
    tokenizer = bench_tokenizer(paths["model"])
    return PackedCollator(tokenizer.pad_token_id, example_boundaries=True)(
        [[examples[j] for j in row] for row in rows]
    )


def _load_base(folder: str, dtype: torch.dtype) -> torch.nn.Module:
    """The bench model's bf16 weights (in ``dtype``), in training mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    return model.to(dtype).train()


def _lorafit_model(folder: str, config: dict[str, Any], seed: int) -> torch.nn.Module:
    """The bf16 base with lorafit's LoRA and packed attention, ``B`` drawn from ``seed``."""
    from lorafit.adapters import LoraConfig, apply_lora
    from lorafit.models.attention import use_packed_attention

    model = apply_lora(_load_base(folder, torch.bfloat16), LoraConfig.from_dict(config))
    if not use_packed_attention(model):
        raise LorafitError("the bench model did not take lorafit's packed attention")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.02)
    return model


def _peft_model(
    folder: str, config: dict[str, Any], lora_weights: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.nn.Module:
    """The base in ``dtype`` with PEFT's LoRA, holding lorafit's LoRA weights."""
    import peft

    model = peft.get_peft_model(_load_base(folder, dtype), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(lora_weights[_lorafit_name(name)])
    return model


def _loss_and_grads(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], ours_loss: bool, autocast: bool
) -> LossAndGrads:
    """The batch's loss (lorafit's or the model's own) and the LoRA gradients, by lorafit's names."""
    from lorafit.training.loss import causal_lm_loss

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = causal_lm_loss(model, batch) if ours_loss else model(**batch, use_cache=False).loss
    loss.backward()
    grads = {_lorafit_name(n): p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def _distance(a: LossAndGrads, b: LossAndGrads) -> dict[str, float]:
    """``|loss_a - loss_b|`` and the largest and median ``|g_a - g_b| / |g_b|`` over the LoRA tensors."""
    (la, ga), (lb, gb) = a, b
    rel = [float((ga[k] - gb[k]).norm() / gb[k].norm().clamp_min(1e-30)) for k in gb]
    return {"loss_abs": abs(la - lb), "grad_rel_max": max(rel), "grad_rel_median": statistics.median(rel)}


def _lorafit_name(name: str) -> str:
    """lorafit's name of a PEFT LoRA parameter (``base_model.model.X.lora_A.default.weight``)."""
    return name.removeprefix("base_model.model.").replace(".default.weight", "")


def flops_per_token(sizes: dict[str, int], lora_r: int, mean_context: float) -> float:
    """Forward + backward FLOPs per token of LoRA training, every token through the head.

    A frozen linear layer (in, out) costs ``2 in out`` forward and ``2 in out`` backward (the
    input gradient; no weight gradient). LoRA on it adds ``2 r (in + out)`` forward and twice
    that backward. Attention over ``c`` earlier tokens costs ``4 c hidden`` forward (scores and
    weighted sum) and twice that backward, per layer.
    """
    h, i, n = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"]
    kv = h * sizes["num_key_value_heads"] // sizes["num_attention_heads"]
    layer = [(h, h + 2 * kv), (h, h), (h, 2 * i), (i, h)]  # qkv, o, gate_up, down
    frozen = n * sum(a * b for a, b in layer) + h * sizes["vocab_size"]
    lora = n * sum(lora_r * (a + b) for a, b in layer)
    return 4 * frozen + 6 * lora + 12 * n * h * mean_context


def matmul_rate(sizes: dict[str, int], tokens: int, repeats: int = 5, wide: bool = False) -> float:
    """FLOP/s of the model's forward and input-gradient products of bf16 matrices at ``tokens``
    rows: native bf16 products, or (``wide``) fp32 products of the same values with the cast and
    the rounding back included, as :func:`lorafit.kernels.matmul16` computes them on CPUs without
    bf16 matrix instructions."""
    h, i = sizes["hidden_size"], sizes["intermediate_size"]
    shapes = [(h, 3 * h), (h, h), (h, 2 * i), (i, h), (h, min(sizes["vocab_size"], 8192))]
    shapes += [(b, a) for a, b in shapes]  # backward: grad (N, out) @ W (out, in)

    def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x.float() @ w.float().t()).bfloat16() if wide else x @ w.t()

    flops, seconds = 0.0, 0.0
    for k, m in shapes:
        x = torch.randn(tokens, k, dtype=torch.bfloat16)
        w = torch.randn(m, k, dtype=torch.bfloat16)
        product(x, w)  # warm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            product(x, w)
            times.append(time.perf_counter() - start)
        flops += 2 * tokens * k * m
        seconds += statistics.median(times)
    return flops / seconds


def ceiling(paths: dict[str, str], settings: BenchSettings) -> dict[str, float]:
    """The tokens/s that the machine's matmul rate allows for the work of a step without
    recomputation, at the faster of the two ways to multiply bf16 matrices (both reported).

    The rate is measured at up to 512 rows (enough to reach it; at Phi-3-mini's widths a native
    bf16 product of 2048 rows takes minutes on CPUs without bf16 instructions)."""
    examples = tokenized_examples(paths, settings)
    lengths = examples.lengths.astype(float)
    mean_context = float((lengths * (lengths + 1) / 2).sum() / lengths.sum())  # causal, per example
    per_token = flops_per_token(settings.model_sizes, LORA["r"], mean_context)
    rows = min(512, settings.batch_size * settings.max_length)
    native = matmul_rate(settings.model_sizes, rows, repeats=3)
    wide = matmul_rate(settings.model_sizes, rows, repeats=3, wide=True)
    rate = max(native, wide)
    return {
        "matmul_flops_per_s": rate,
        "native_bf16_flops_per_s": native,
        "widened_bf16_flops_per_s": wide,
        "flops_per_token": per_token,
        "mean_context": mean_context,
        "tokens_per_s": rate / per_token,
        "label_token_share": float((examples.labels != -100).sum() / len(examples.labels)),
    }
