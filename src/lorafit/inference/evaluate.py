"""How well a trained model does on a dataset: the loss over its label tokens, and perplexity.

The loss is token-weighted over the whole dataset, ``sum CE / n`` with ``n`` the label tokens of
every batch together (not a mean of per-batch means), so it does not depend on the batch size.

Each batch's ``sum CE`` comes from the head training uses (:mod:`lorafit.training.loss`): only the
label positions reach the output head, a tile of rows at a time, so no ``(tokens, vocabulary)``
fp32 logits exist (8 rows of 2048 tokens with Phi-3's 32,064-token vocabulary would be 2.1 GB of
them) and evaluation fits wherever training did. A model that head cannot serve (see
:func:`lorafit.training.loss.supports_fast_loss`: training used the model's own full logits too)
is scored from its full logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lorafit.config import DataConfig
from lorafit.constants import IGNORE_INDEX
from lorafit.data import build_datasets, collator_for
from lorafit.errors import LorafitError
from lorafit.training.loss import causal_lm_loss, supports_fast_loss


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, tokenizer: Any, source: str, data: DataConfig, *, batch_size: int = 8
) -> dict[str, Any]:
    """``{"loss", "perplexity", "examples", "label_tokens", "format"}`` of ``model`` on ``source``, read and
    tokenised with the run's data settings (format, max length, packing, assistant-only labels)."""
    dataset, _, stats = build_datasets(tokenizer, train=source, **data.row_settings())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, collate_fn=collator_for(tokenizer, packing=data.packing)
    )
    total, count = 0.0, 0
    device = next(model.parameters()).device
    light = supports_fast_loss(model)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        target = batch["labels"][:, 1:]  # position t predicts token t+1
        if light:
            loss = causal_lm_loss(model, batch, num_items_in_batch=1)  # sum CE: divided by 1
        else:
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        total += loss.item()
        count += int((target != IGNORE_INDEX).sum())
    if count == 0:
        raise LorafitError(f"{source}: no tokens to evaluate on (no assistant tokens left)")
    mean = total / count
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 50.0)),
        "examples": stats["examples"],
        "label_tokens": count,
        "format": stats["format"],
    }
