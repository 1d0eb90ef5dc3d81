"""``lorafit eval``'s loss: training's memory-light head, the full-logits loss's value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lorafit.adapters import LoraConfig, apply_lora
from lorafit.config import DataConfig
from lorafit.constants import IGNORE_INDEX
from lorafit.data import build_datasets, collator_for
from lorafit.inference import evaluate_loss
from lorafit.training.loss import TILE_LOGITS

from chat_data import chat_rows, write_jsonl


class LargestTensor(TorchDispatchMode):
    """Records the largest floating-point tensor any op returns while active (numel), leaving out
    the model's own weights (``weight.to(dtype)`` in its dtype hands back the weight itself)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(t, torch.Tensor)
                and t.is_floating_point()
                and t.untyped_storage().data_ptr() not in self.weights
            ):
                self.numel = max(self.numel, t.numel())
        return out


def full_logits_loss(model, tokenizer, source: str, data: DataConfig, batch_size: int) -> tuple[float, int]:
    """The loss as computed from the whole ``(B, T, V)`` fp32 logits (transformers' way)."""
    dataset, _, _ = build_datasets(tokenizer, train=source, **data.row_settings())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, collate_fn=collator_for(tokenizer, packing=data.packing)
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / count, count


@pytest.mark.parametrize("packing", [True, False])
def test_eval_loss_equals_the_full_logits_loss(
    packing, tmp_path, lorafit_cache, phi3_tokenizer, make_tiny_phi3
):
    source = write_jsonl(tmp_path / "eval.jsonl", chat_rows(24, seed=3))
    data = DataConfig(max_length=128, packing=packing)
    model = make_tiny_phi3(len(phi3_tokenizer))
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter, not the zero update
    model.eval()
    result = evaluate_loss(model, phi3_tokenizer, source, data, batch_size=4)
    reference, count = full_logits_loss(model, phi3_tokenizer, source, data, batch_size=4)
    assert result["label_tokens"] == count > 100
    assert result["loss"] == pytest.approx(reference, rel=1e-5)


def test_eval_never_forms_full_vocabulary_logits(tmp_path, lorafit_cache, phi3_tokenizer, make_tiny_phi3):
    """A 256k-token vocabulary (Gemma's) over 4 packed rows of 512 tokens: the full fp32 logits
    would be 4 x 511 x 256,000 x 4 bytes = 2.1 GB, 8 times the model's whole activations here.
    No tensor of even one row's ``T x V`` logits is formed: the head sees label positions only,
    one tile of at most ``TILE_LOGITS`` logits at a time."""
    vocab = 256_000
    source = write_jsonl(tmp_path / "eval.jsonl", chat_rows(120, seed=5))
    data = DataConfig(max_length=512, packing=True)
    model = make_tiny_phi3(vocab)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.eval()
    with LargestTensor(model) as largest:
        result = evaluate_loss(model, phi3_tokenizer, source, data, batch_size=4)
    assert result["label_tokens"] * vocab > 20 * TILE_LOGITS  # the premise: full logits are far larger
    assert largest.numel <= TILE_LOGITS + vocab  # one tile, rounded up to whole rows
    assert largest.numel < 512 * vocab  # not even one row's logits
    assert 0 < result["loss"] < 2 * torch.log(torch.tensor(float(vocab))).item()
