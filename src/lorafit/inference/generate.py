"""Answers from a model: greedy generation that stops at the end of the assistant's turn.

:func:`generate` answers one conversation (and can stream it); :func:`generate_batch` answers
many at once, which is how evaluation prompts are answered. A batch holds prompts of similar
length (sorted), left-padded so that every row's next token sits in the last column, with an
attention mask over the padding and position ids counted from each row's first real token::

    row:        [pad pad p0 p1 p2 | a0 a1 ...]     mask: [0 0 1 1 1 | 1 1 ...]
    positions:  [0   0   0  1  2  | 3  4  ...]

so each row sees what it would alone, and greedy decoding gives it the same answer, up to the
rounding of products whose shapes differ with the batch (exact in fp32 unless two logits tie
within that rounding; 16-bit dtypes round more coarsely and may part sooner). The KV cache keeps
each step to one new token per row. Each row's answer ends at its own first stop token
(:func:`lorafit.models.load.stop_token_ids`); the batch runs until every row has stopped or
reached ``max_new_tokens``.

Answering 20 prompts together rather than one by one turns the matrix-vector products of
decoding into matrix products, which a CPU or GPU runs at many times the throughput
(``benchmarks/generation.py`` measures it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafit.models.load import stop_token_ids

# A batch holds at most this many prompts, and at most this many tokens (prompt + answer, times
# rows: what its KV cache holds; 8192 tokens of Phi-3-mini in bf16 are 3.2 GB of cache).
BATCH_ROWS = 32
BATCH_TOKENS = 8192


@dataclass
class GenerationStats:
    """How much a call of :func:`generate_batch` produced and how fast."""

    answers: int = 0
    tokens: int = 0  # new tokens, each answer's stop token included
    seconds: float = 0.0
    lengths: list[int] = field(default_factory=list)  # each answer's new tokens, in order

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def describe(self) -> str:
        """``20 answers, 1,234 tokens in 9.8 s (126 tokens/s)``."""
        return (
            f"{self.answers} answers, {self.tokens:,} tokens in {self.seconds:.1f} s "
            f"({self.tokens_per_s:,.0f} tokens/s)"
        )


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
            pad_token_id=_pad_id(tokenizer),
            use_cache=True,
            streamer=streamer,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 64,
    batch_rows: int = BATCH_ROWS,
    batch_tokens: int = BATCH_TOKENS,
    tools: Sequence[list[dict] | None] | None = None,
) -> tuple[list[str], GenerationStats]:
    """Greedy answers to ``conversations`` (each ending with a user turn or a tool result), in
    their order, each equal to :func:`generate`'s for it (see the module docstring), and what it
    took. ``tools``: each conversation's function schemas (or None), given to the chat template.

    Prompts are answered in batches of up to ``batch_rows`` rows and ``batch_tokens`` tokens of
    KV cache (``rows * (longest prompt + max_new_tokens)``; a longer prompt gets a batch alone).
    """
    t0 = time.perf_counter()
    tools = list(tools) if tools is not None else [None] * len(conversations)
    if len(tools) != len(conversations):
        raise ValueError(f"{len(tools)} tool lists for {len(conversations)} conversations")
    prompts = [
        tokenizer.apply_chat_template(
            c, tools=t, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for c, t in zip(conversations, tools, strict=True)
    ]
    answers: list[str] = [""] * len(prompts)
    stats = GenerationStats(answers=len(prompts), lengths=[0] * len(prompts))
    stops = stop_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(prompts, max_new_tokens, batch_rows, batch_tokens):
            rows = _generate_rows(
                model, [prompts[i] for i in batch], max_new_tokens, stops, _pad_id(tokenizer)
            )
            for i, row in zip(batch, rows, strict=True):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
                stats.lengths[i] = len(row)
    finally:
        model.train(was_training)
    stats.tokens = sum(stats.lengths)
    stats.seconds = time.perf_counter() - t0
    return answers, stats


def _batches(prompts: list[list[int]], max_new_tokens: int, rows: int, tokens: int) -> list[list[int]]:
    """Indices of ``prompts`` grouped into batches, longest prompts first (little padding)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            current = batches[-1]
            longest = len(prompts[current[0]])  # sorted: the batch's first prompt is its longest
            if len(current) < rows and (len(current) + 1) * (longest + max_new_tokens) <= tokens:
                current.append(i)
                continue
        batches.append([i])
    return batches


def _generate_rows(
    model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, stops: list[int], pad: int
) -> list[list[int]]:
    """One left-padded batch through ``model.generate``; each row's new tokens up to and
    including its first stop token."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),  # generate derives the position ids from it
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=pad,
        use_cache=True,
    )
    rows = []
    for new in out[:, width:].tolist():
        end = next((j + 1 for j, token in enumerate(new) if token in stops), len(new))
        rows.append(new[:end])  # a finished row is filled with pad ids after its stop token
    return rows


def _pad_id(tokenizer: Any) -> int:
    """The id that fills a batch's padding (masked, so never read): the pad token, else eos."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return token
    return 0
