"""Tiny real Hugging Face models built in the tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM


def phi3_config(vocab: int = 128, hidden: int = 32, layers: int = 2, **kw) -> Phi3Config:
    return Phi3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **kw,
    )


def tiny_phi3(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(phi3_config(**kw)).to(dtype)
    model.config._name_or_path = "tiny-phi3"
    return model.eval()


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.config._name_or_path = "tiny-llama"
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
