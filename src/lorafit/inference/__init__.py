"""Using a trained model: greedy answers and chat, and evaluation on a dataset."""

from lorafit.inference.evaluate import evaluate_loss
from lorafit.inference.generate import answer_prompts, generate

__all__ = ["answer_prompts", "evaluate_loss", "generate"]
