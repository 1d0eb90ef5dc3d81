"""``lorafit bench``: lorafit against PEFT + TRL on the same model, data and settings
(see :mod:`lorafit.bench.run`)."""

from lorafit.bench.run import run_bench
from lorafit.bench.settings import BenchSettings
from lorafit.bench.workers import worker

__all__ = ["BenchSettings", "run_bench", "worker"]
