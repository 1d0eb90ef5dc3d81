"""Using a trained model: greedy answers and chat, evaluation on a dataset, generation metrics."""

from lorafit.inference.evaluate import evaluate_loss
from lorafit.inference.generate import generate, generate_batch
from lorafit.inference.metrics import generation_report, score_answers

__all__ = ["evaluate_loss", "generate", "generate_batch", "generation_report", "score_answers"]
