"""In which dtypes a run computes: decided once, from the machine, the model's size and the config.

A 16-bit dtype is a speed-up only where the hardware multiplies in it. GPUs do; CPUs do bf16 only
with AVX-512 BF16 or AMX (recent Xeons and EPYCs), where bf16 matrix products run about 3x faster
than fp32. A CPU without them (AVX2 only) emulates bf16 and fp16 products at a few percent of its
fp32 rate (a 2-core AVX2 EPYC: 0.6 GFLOP/s in bf16 against 31 in fp32 for 512 x 512 products).
There a run computes in fp32 instead, and says so once; except LoRA training of a model from
:data:`WIDE_ABOVE` parameters, which keeps the 16-bit weights and autocast while lorafit's
kernels (:func:`lorafit.kernels.matmul16`) multiply the 16-bit values as fp32 products: the fp32
rate with half the weight memory (Phi-3-mini: 7.6 GB, not 15.3) and the 16-bit math of the same
run on other machines. A smaller model trains faster in fp32 (the demo: 2,268 tokens/s against
158), since some backward products outside lorafit's kernels stay 16-bit.

:class:`Precision` holds the decision; loading, the widened layers, the training arguments and the
memory planner read it, and a run records it in ``lorafit_run.yaml`` (``precision:``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lorafit.config import ModelConfig
from lorafit.constants import torch_dtype
from lorafit.kernels import HALF_DTYPES, cpu_multiplies_natively
from lorafit.models.device import has_accelerator

WIDE_ABOVE = 1_000_000_000
"""Parameters from which LoRA training on a CPU without 16-bit products keeps a 16-bit model
16-bit (its products widened); ``LORAFIT_WIDE_ABOVE`` overrides it (the benchmarks set 0 so that a
cut of Phi-3-mini trains as the 3.8 B model would)."""


@dataclass(frozen=True)
class Precision:
    """Where a run computes and in which dtypes.

    Attributes:
        on_cpu: the run computes on the CPU (no accelerator, or ``training_config.use_cpu``).
        native: the 16-bit dtypes this CPU multiplies natively
            (:func:`lorafit.kernels.cpu_multiplies_natively`).
        torch_dtype: ``model.torch_dtype`` as configured.
        load: the dtype the base model loads in (a dtype name, or ``auto``).
        widened: 16-bit weights kept on a CPU without 16-bit products, lorafit's kernels and the
            widened plain linears (:func:`lorafit.models.lean.use_wide_linears`) multiplying their
            values as fp32 products.
        quant_compute: the 4-bit layers' ``bnb_4bit_compute_dtype`` (None: no 4-bit base, or the
            key left to bitsandbytes' default).
        bf16: ``TrainingArguments.bf16``: bf16 autocast in training.
        fp16: ``TrainingArguments.fp16``: fp16 autocast in training.
        training: decided for LoRA training (not DoRA, not chat, eval or export).
        n_params: the model's parameters where the decision needed them (None elsewhere).
        notes: one line per setting this machine changed, said at the start of a run.
    """

    on_cpu: bool
    native: tuple[str, ...]
    torch_dtype: str
    load: str
    widened: bool = False
    quant_compute: str | None = None
    bf16: bool = False
    fp16: bool = False
    training: bool = False
    n_params: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def load_dtype(self) -> torch.dtype | str:
        """:attr:`load` as ``from_pretrained``'s ``dtype`` takes it (a ``torch.dtype``, or ``auto``)."""
        return torch_dtype(self.load)

    @property
    def autocast(self) -> str | None:
        """The training run's autocast dtype, or None (no autocast)."""
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else None

    def record(self) -> dict[str, Any]:
        """The decision as ``lorafit_run.yaml``'s ``precision:`` section records it (the notes are
        the file's header comments already)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "notes"}
        return {**fields, "native": list(self.native), "autocast": self.autocast}

    @classmethod
    def decide(
        cls,
        model: ModelConfig,
        training_config: Mapping[str, Any],
        *,
        training: bool = False,
        dora: bool = False,
        count_params: Callable[[], int] | None = None,
        on_cpu: bool | None = None,
        native: Collection[str] | None = None,
    ) -> Precision:
        """The decision for the ``model`` section and ``training_config``; ``training``: LoRA
        training (``dora``: DoRA, whose variant multiplies natively, so it is never widened).

        ``count_params`` gives the model's parameters (called only where the decision depends
        on them: LoRA training of a 16-bit model on a CPU that would emulate it). ``on_cpu`` and
        ``native`` stand for the machine (default: this one); ``LORAFIT_WIDE_ABOVE`` is read here
        and nowhere else."""
        tc = training_config
        if on_cpu is None:
            on_cpu = not has_accelerator() or bool(tc.get("use_cpu"))
        if native is None:
            native = tuple(name for name in HALF_DTYPES if cpu_multiplies_natively(name))
        native = tuple(native)
        name = model.torch_dtype
        notes: list[str] = []
        n_params = None
        widened = False
        if on_cpu and name in HALF_DTYPES and name not in native:  # this CPU would emulate its products
            if training and not dora and count_params is not None:
                n_params = int(count_params())
                widened = n_params >= int(os.environ.get("LORAFIT_WIDE_ABOVE", WIDE_ABOVE))
            load = name if widened else "float32"
            dtype_note = (
                f"model.torch_dtype: {name} kept: this CPU has no native {name} matrix "
                "products, so lorafit's training ops multiply the 16-bit values as float32 products"
                if widened
                else _emulated("model.torch_dtype", name)
            )
        else:
            load, dtype_note = name, None
        quant_compute = None
        if model.quantization:
            quant_compute = model.quantization.get("bnb_4bit_compute_dtype")
            half = quant_compute or "float32"
            if on_cpu and not widened and half in HALF_DTYPES and half not in native:
                quant_compute = "float32"
                notes.append(_emulated("model.quantization.bnb_4bit_compute_dtype", half))
        if dtype_note:
            notes.append(dtype_note)
        bf16, fp16 = bool(tc.get("bf16")), bool(tc.get("fp16"))
        if not training:
            bf16 = fp16 = False  # chat, eval and export run without autocast
        elif on_cpu:
            bf16, fp16 = _cpu_autocast(bf16, fp16, native, widened, notes)
        return cls(
            on_cpu=on_cpu,
            native=native,
            torch_dtype=name,
            load=load,
            widened=widened,
            quant_compute=quant_compute,
            bf16=bf16,
            fp16=fp16,
            training=training,
            n_params=n_params,
            notes=tuple(notes),
        )


def _emulated(key: str, name: str) -> str:
    return (
        f"{key}: {name} -> float32: this CPU has no native {name} matrix products "
        "(no AVX-512 BF16 / AMX), which would run them tens of times slower than float32"
    )


def _cpu_autocast(
    bf16: bool, fp16: bool, native: tuple[str, ...], widened: bool, notes: list[str]
) -> tuple[bool, bool]:
    """The autocast flags a CPU runs, each change a note: 16-bit autocast it would emulate is off
    (unless ``widened``: lorafit's kernels multiply the 16-bit values as fp32 products), fp16
    becomes bf16 where bf16 runs (fp32's range, no loss scaling). The Phi-3 cookbook's script asks
    for fp16."""
    bf16_runs = "bfloat16" in native or widened
    if fp16 and "float16" not in native:
        fp16 = False
        if bf16_runs:
            bf16 = True
            how = "natively" if "bfloat16" in native else "as fp32 products (lorafit's training ops)"
            notes.append(f"fp16: true -> bf16: true (this CPU multiplies bf16 {how}, fp16 only emulated)")
        else:
            notes.append("fp16: true -> false (no native float16 products on this CPU; fp32 is faster)")
    if bf16 and not bf16_runs:
        bf16 = False
        notes.append("bf16: true -> false (no native bfloat16 products on this CPU; fp32 is faster)")
    return bf16, fp16
