"""Training: :func:`train` runs a config from the model to the saved adapter (``run.py``)."""

from lorafit.training.run import train

__all__ = ["train"]
