"""The architecture matrix: LoRA on tiny Phi-3, Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3.

Each model is built in the test from its transformers config (random weights, no download). For
each: ``all-linear`` finds the layers PEFT's ``all-linear`` does, lorafit's logits equal PEFT's
with the same adapter weights (fp32, 1e-6), a few optimizer steps lower the loss, and the fast
loss path is used where it computes the model's own loss (to 1e-5) and refused where it cannot
(Gemma 2 soft-caps its logits after the head).
"""

from __future__ import annotations

import peft
import pytest
import torch

from lorafit.adapters import LoraConfig, apply_lora, find_targets, load_adapter
from lorafit.training.loss import causal_lm_loss, supports_fast_loss

from tiny import ARCHITECTURES, logits, tiny_model

FAST_LOSS = {"gemma2": False}  # final_logit_softcapping: the head's output is changed after it
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def peft_lora_modules(model: torch.nn.Module) -> set[str]:
    return {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and isinstance(m, peft.tuners.lora.LoraLayer)
    }


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_all_linear_targets_and_logits_equal_peft(arch, tmp_path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ref = peft.get_peft_model(tiny_model(arch), config)
    ours_targets = set(
        find_targets(tiny_model(arch), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    )
    assert ours_targets == peft_lora_modules(ref) and ours_targets
    ref.save_pretrained(tmp_path)
    ours = load_adapter(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(ours, IDS), logits(ref, IDS), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_training_lowers_the_loss_with_the_right_loss_path(arch) -> None:
    model = apply_lora(tiny_model(arch), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert supports_fast_loss(model) is FAST_LOSS.get(arch, True)
    inputs = {"input_ids": IDS, "labels": IDS}
    model.train()
    if supports_fast_loss(model):  # lorafit's head loss is the model's own
        own = model(**inputs).loss
        torch.testing.assert_close(causal_lm_loss(model, inputs), own, atol=1e-5, rtol=0)
    loss_of = (
        (lambda: causal_lm_loss(model, inputs))
        if supports_fast_loss(model)
        else (lambda: model(**inputs).loss)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_of()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
