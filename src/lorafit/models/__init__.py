"""Base models and tokenizers: where they come from, in which dtype, quantized or not, and with
which attention implementation."""

from lorafit.models.load import load_model, load_tokenizer, load_trained, stop_token_ids

__all__ = ["load_model", "load_tokenizer", "load_trained", "stop_token_ids"]
