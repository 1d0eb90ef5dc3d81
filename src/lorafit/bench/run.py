"""``lorafit bench``: lorafit against PEFT + TRL on one model, one dataset and one set of settings.

Both sides fine-tune the same *bench model*: Phi-3's architecture and vocabulary (32,064
tokens, untied head) at hidden 512, 8 layers of 8 heads, intermediate 1376, random weights from
a fixed seed, stored in bf16. The data is a synthetic chat set made here (2,000 conversations
with system prompts and answers from a few words to a few hundred), tokenised once with
Phi-3's chat template (the demo tokenizer) and assistant-only labels; TRL gets those very
``input_ids`` and ``labels``. The settings are shared: LoRA r=16, alpha 32, dropout 0.05 on
every linear layer but the head; AdamW, learning rate, cosine schedule and seed; 8 rows of at
most 512 tokens a step; bf16 autocast; the loss is the mean cross-entropy over label tokens.

:func:`run_bench` then

1. checks parity: one batch through lorafit (its layers and its loss) and through PEFT (its
   layers and the model's own loss) with the same LoRA weights: the losses must agree within
   bf16's rounding (2^-8 relative) and lorafit's LoRA gradients must be as close to an fp32
   computation of the same batch as PEFT's are;
2. measures the ceiling: the machine's bf16 matrix-product rate (on the model's own shapes)
   divided by the model's FLOPs per trained token;
3. trains each side in its own process, alternately, ``repeats`` times: lorafit as a user
   gets it (``lorafit.training.train`` with its defaults), PEFT + TRL (``SFTTrainer``) with
   packing on and off and gradient checkpointing on and off;
4. reports, per configuration, the median real (non-pad) tokens per second over the steps
   after ``warmup``, the peak resident memory of the process, and the loss at every step, with
   ratios against TRL's fastest configuration, as ``bench.json`` and ``bench.png`` in ``out``.

``--quick`` shrinks everything (a tiny model, a few steps, one TRL configuration) into a smoke
test of the whole pipeline; its figures mean nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from lorafit.bench.parity import ceiling, parity_check
from lorafit.bench.report import format_report, plot, summarise
from lorafit.bench.settings import LORA, LORAFIT_CONFIG, TRL_CONFIGS, BenchSettings
from lorafit.bench.workers import _run_worker
from lorafit.bench.workload import prepare_assets
from lorafit.errors import LorafitError


def run_bench(out: Path, settings: BenchSettings, echo: Any = print) -> dict[str, Any]:
    """The whole benchmark; writes ``bench.json``, ``bench.png`` and ``bench.txt`` to ``out``."""
    unknown = [c for c in settings.trl_configs if c not in TRL_CONFIGS]
    if unknown:
        raise LorafitError(
            f"--trl: unknown configuration {unknown[0]!r}; expected any of {', '.join(TRL_CONFIGS)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    echo(f"preparing the bench model and data in {out / 'assets'}")
    paths = prepare_assets(out / "assets", settings)
    echo("parity check: one batch through lorafit, PEFT and an fp32 reference")
    parity = parity_check(paths, settings)
    echo("measuring the bf16 matmul rate")
    roof = ceiling(paths, settings)
    order = [("lorafit", LORAFIT_CONFIG)] + [("trl", c) for c in settings.trl_configs]
    runs = []
    for repeat in range(settings.repeats):
        for side, config in order if repeat % 2 == 0 else order[::-1]:
            echo(f"run {repeat + 1}/{settings.repeats}: {side} {config} (load {os.getloadavg()[0]:.1f})")
            run = _run_worker(out, side, config, repeat, paths, settings)
            echo(f"  {run['tokens_per_s']:.0f} tokens/s, peak RSS {run['peak_rss_mb']:.0f} MB")
            runs.append(run)
    sizes = settings.model_sizes
    report = {
        "model": (
            f"Phi-3 architecture, vocab {sizes['vocab_size']}, hidden {sizes['hidden_size']}, "
            f"{sizes['num_hidden_layers']} layers x {sizes['num_attention_heads']} heads, intermediate "
            f"{sizes['intermediate_size']}, bf16"
        ),
        "settings_line": (
            f"{settings.batch_size} rows x {settings.max_length} tokens, {settings.steps} steps "
            f"({settings.warmup} warm-up) x {settings.repeats} runs per configuration; LoRA r={LORA['r']} "
            f"alpha={LORA['lora_alpha']} dropout={LORA['lora_dropout']} all-linear"
        ),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "settings": dataclasses.asdict(settings),
        "parity": parity,
        "ceiling": roof,
        "summary": summarise(runs, settings),
        "runs": runs,
    }
    text = format_report(report)
    report["text"] = text
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.txt").write_text(text + "\n")
    plot(report, out / "bench.png")
    echo("")
    echo(text)
    echo(f"\nwritten: {out / 'bench.json'}, {out / 'bench.png'}, {out / 'bench.txt'}")
    return report
