"""Where a model runs and in which dtype: what the machine in hand does fast.

A 16-bit dtype is a speed-up only where the hardware multiplies in it. GPUs do; CPUs do bf16
only with AVX-512 BF16 or AMX (recent Xeons and EPYCs), where bf16 matrix products run about
3x faster than fp32. A CPU without them (AVX2 only) emulates bf16 and fp16 products at a few
percent of its fp32 rate: measured on a 2-core AVX2 EPYC, 0.6 GFLOP/s in bf16 against 31 in
fp32 for 512 x 512 products. There lorafit computes in fp32 instead, and says so once; except
in LoRA training, whose ops (:func:`lorafit.kernels.matmul16`) multiply the 16-bit values as
fp32 products: the fp32 rate with half the weight memory (Phi-3-mini: 7.6 GB, not 15.3) and the
16-bit math of the same run on other machines.
"""

from __future__ import annotations

import torch

from lorafit.constants import torch_dtype

HALF = {"bfloat16", "float16"}


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, XPU, MPS)."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


def cpu_half_is_fast(name: str) -> bool:
    """Whether this CPU multiplies matrices natively in ``name`` (``bfloat16`` or ``float16``)."""
    cpu = torch.cpu
    if name == "bfloat16":
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    return bool(cpu._is_amx_fp16_supported())


def compute_dtype(name: str, *, on_cpu: bool) -> tuple[torch.dtype | str, str | None]:
    """The dtype to load a model in for ``model.torch_dtype: name``, and a note when it differs.

    On a CPU that would emulate ``name``'s products, the model loads in float32 (twice the
    weight memory, a fraction of the time); everywhere else ``name`` is kept.
    """
    if on_cpu and name in HALF and not cpu_half_is_fast(name):
        return torch.float32, (
            f"model.torch_dtype: {name} -> float32: this CPU has no native {name} matrix products "
            "(no AVX-512 BF16 / AMX), which would run them tens of times slower than float32"
        )
    return torch_dtype(name), None
