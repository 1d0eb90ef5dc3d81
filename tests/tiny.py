"""Tiny real Hugging Face models built in the tests (no downloads)."""

from __future__ import annotations

import torch
import transformers
from transformers import LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

# Shared by every tiny model below: 2 layers of hidden 32, a 128-token vocabulary.
SIZES = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,  # some configs default to ids of their real, larger vocabulary
    tie_word_embeddings=False,
)
# The architecture matrix: config class, model class, what each needs beyond SIZES.
ARCHITECTURES = {
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {"num_key_value_heads": 4, "bos_token_id": 1, "eos_token_id": 2},
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"bos_token_id": 1, "eos_token_id": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q, k and v projections with biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 64}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 64}),
}


def phi3_config(vocab: int = 128, hidden: int = 32, layers: int = 2, **kw) -> Phi3Config:
    sizes = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
    }
    return Phi3Config(**{**SIZES, **ARCHITECTURES["phi3"][2], **sizes, **kw})


def tiny_phi3(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(phi3_config(**kw)).to(dtype)
    model.config._name_or_path = "tiny-phi3"
    return model.eval()


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random causal LM of one of ``ARCHITECTURES`` (eval mode, named ``tiny-<arch>``)."""
    config_name, model_name, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(**{**SIZES, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype)
    model.config._name_or_path = f"tiny-{arch}"
    return model.eval()


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return tiny_model("llama", seed, dtype)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
