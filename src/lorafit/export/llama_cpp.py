"""An exported GGUF file run in llama.cpp itself, through the ``cyllama`` bindings (lorafit's test
extra, Linux x86-64): how the tests, the examples and ``scripts/answers_in_llama_cpp.py`` check
that llama.cpp reads an export as lorafit computes it. Not needed to export."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from lorafit.errors import LorafitError


def _bindings() -> Any:
    try:
        import cyllama.llama.llama_cpp as llama_cpp
    except ImportError as err:
        raise LorafitError(
            "llama.cpp's Python build is not installed: pip install cyllama (in lorafit's test extra)"
        ) from err
    return llama_cpp


def load_in_llama_cpp(path: str | Path) -> Any:
    """The GGUF file at ``path`` loaded by llama.cpp (CPU, its logging off)."""
    llama_cpp = _bindings()

    class Model(llama_cpp.LlamaModel):
        @property
        def n_vocab(self) -> int:  # cyllama 0.2's LlamaContext.get_logits reads it; LlamaModel lacks it
            return self.get_vocab().n_vocab

    llama_cpp.disable_logging()
    return Model(str(path), llama_cpp.LlamaModelParams())


def llama_cpp_greedy(
    model: Any,
    prompt: list[int],
    max_new_tokens: int,
    *,
    stops: Collection[int] | None = None,
    threads: int = 1,
) -> tuple[list[int], bool]:
    """llama.cpp's greedy continuation of the token ids ``prompt``: the new tokens up to and
    including the first stop token, and whether one came within ``max_new_tokens``. The stop
    tokens are ``stops``, or else those the GGUF's own vocabulary marks end-of-generation (where
    llama.cpp's servers stop)."""
    llama_cpp = _bindings()
    is_stop = model.get_vocab().is_eog if stops is None else stops.__contains__
    params = llama_cpp.LlamaContextParams()
    params.n_ctx, params.n_threads, params.n_threads_batch = (
        len(prompt) + max_new_tokens + 8,
        threads,
        threads,
    )
    context = llama_cpp.LlamaContext(model, params)
    batch = llama_cpp.LlamaBatch(n_tokens=len(prompt), embd=0, n_seq_max=1)
    for position, token in enumerate(prompt):
        batch.add(int(token), position, [0], position == len(prompt) - 1)
    context.decode(batch)
    out: list[int] = []
    for position in range(len(prompt), len(prompt) + max_new_tokens):
        token = int(torch.tensor(context.get_logits()).argmax())
        out.append(token)
        if is_stop(token):
            return out, True
        step = llama_cpp.LlamaBatch(n_tokens=1, embd=0, n_seq_max=1)
        step.add(token, position, [0], True)
        context.decode(step)
    return out, False
