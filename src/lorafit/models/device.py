"""Where a model runs: whether torch sees an accelerator. In which dtypes it computes there is
:class:`lorafit.models.precision.Precision`'s decision."""

from __future__ import annotations

import torch


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, XPU, MPS)."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))
