"""How well a trained model does on a dataset: the loss over its label tokens, and perplexity.

The loss is token-weighted over the whole dataset, ``sum CE / n`` with ``n`` the label tokens of
every batch together (not a mean of per-batch means), so it does not depend on the batch size.
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
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        target = labels[:, 1:]  # position t predicts token t+1
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
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
