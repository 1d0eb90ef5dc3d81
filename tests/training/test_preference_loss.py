"""The memory-light per-token log-probabilities under the preference losses: equal to a plain
log-softmax of the full logits (values and gradients), tile by tile, and never full logits."""

from __future__ import annotations

import torch

import lorafit.training.loss as lf_loss
from lorafit.adapters import LoraConfig, apply_lora
from lorafit.training.preference import head_token_logps, sequence_logps, token_logps

from tiny import tiny_phi3


def test_head_token_logps_equal_log_softmax_with_gradients(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=g, requires_grad=True)
    weight, bias = torch.randn(40, 16, generator=g), torch.randn(40, generator=g)
    targets = torch.randint(0, 40, (11,), generator=g)
    upstream = torch.randn(11, generator=g)

    expected = (hidden @ weight.T + bias).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), hidden)
    for tile_rows in (None, 3):  # one tile, or four (the last short)
        if tile_rows:
            monkeypatch.setattr(lf_loss, "TILE_LOGITS", tile_rows * 40)
        values = head_token_logps(hidden, weight, bias, targets)
        (grad,) = torch.autograd.grad((values * upstream).sum(), hidden)
        torch.testing.assert_close(values, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


def test_token_logps_never_project_every_position() -> None:
    model = apply_lora(tiny_phi3(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)).train()
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, [5, 6, 7, 15, 16]] = True
    seen: list[tuple] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    batch = {"input_ids": ids, "position_ids": torch.cat([torch.arange(10), torch.arange(10)])[None]}
    values = token_logps(model, batch, mask)
    hook.remove()
    assert all(shape[1] == 0 for shape in seen)  # the model's head saw no position at all
    logits = model(**batch, use_cache=False).logits[0, :-1].log_softmax(-1)  # packed: no cache
    expected = logits[mask[0, 1:]].gather(1, ids[0, 1:][mask[0, 1:]][:, None]).squeeze(1)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)
    sums, counts = sequence_logps(values, torch.tensor([0, 0, 0, 1, 1]), 2)
    torch.testing.assert_close(sums, torch.stack([expected[:3].sum(), expected[3:].sum()]))
    assert counts.tolist() == [3.0, 2.0]


def test_a_model_the_fast_head_cannot_serve_gets_the_same_log_probs() -> None:
    """A trainable output head (or logit soft-capping, ...) falls back to the model's logits."""
    model = apply_lora(tiny_phi3(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)).train()
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "position_ids": torch.arange(12)[None]}
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 4:] = True
    fast = token_logps(model, batch, mask)
    model.lm_head.weight.requires_grad_(True)
    plain = token_logps(model, batch, mask)
    torch.testing.assert_close(plain, fast, atol=1e-5, rtol=1e-5)
