"""Answers from a model: greedy generation that stops at the end of the assistant's turn."""

from __future__ import annotations

from typing import Any

import torch

from lorafit.models.load import stop_token_ids


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    messages: list[dict],
    max_new_tokens: int = 64,
    streamer: Any = None,
    tools: list[dict] | None = None,
) -> str:
    """Greedy answer to a conversation ending with a user turn, stopping at end-of-turn. ``tools``
    (function schemas) go to the chat template, as training rendered them."""
    ids = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    input_ids = ids["input_ids"].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            streamer=streamer,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
