"""``lorafit bench``: lorafit against PEFT + TRL on one model, one dataset and one set of settings.

``--size small`` (the default) trains the small *bench model*: Phi-3's architecture and
vocabulary (32,064 tokens, untied head) at hidden 512, 8 layers of 8 heads, intermediate 1376,
on 8 rows of at most 512 tokens a step, with a synthetic chat set of 2,000 conversations (system
prompts and answers from a few words to a few hundred). ``--size phi3-mini`` trains Phi-3-mini's
published configuration (hidden 3072, 32 layers of 32 heads, intermediate 8192; written once
under ``$LORAFIT_CACHE/bench``) on 1 row of 2048 tokens a step, with chats of 260 to 1,900
tokens, against PEFT + TRL's best setting that fits (packing with gradient checkpointing), with
lorafit's fast (nothing recomputed), lean and QLoRA settings. Weights are random from a fixed
seed, stored in bf16. The data is tokenised once with Phi-3's chat template (the demo tokenizer) and
assistant-only labels; TRL gets those very ``input_ids`` and ``labels``. The settings are
shared: LoRA r=16, alpha 32, dropout 0.05 on every linear layer but the head; AdamW, learning
rate, cosine schedule and seed; bf16 autocast; the loss is the mean cross-entropy over label
tokens.

:func:`run_bench` then

1. checks parity: one batch through lorafit (its layers and its loss) and through PEFT (its
   layers and the model's own loss) with the same LoRA weights: the losses must agree within
   bf16's rounding (2^-8 relative) and lorafit's LoRA gradients must be as close to an fp32
   computation of the same batch as PEFT's are (for phi3-mini on a 2-layer cut of its widths,
   one row of 512 tokens, so that three copies fit);
2. measures the ceiling: the machine's rate for products of bf16 matrices (native, or as fp32
   products where that is faster; on the model's own shapes) divided by the model's FLOPs per
   trained token without recomputation;
3. trains each side in its own process, alternately, ``repeats`` times: lorafit as a user
   gets it (``lorafit.training.train``: its defaults, and the other ``--lorafit``
   configurations), PEFT + TRL (``SFTTrainer``) with each ``--trl`` configuration;
4. reports, per configuration, the median real (non-pad) tokens per second over the steps
   after ``warmup``, the peak resident memory of the process, the share of the ceiling, and the
   loss at every step, with ratios against TRL's fastest and leanest configurations, as
   ``bench.json``, ``bench.txt`` and ``bench.png`` in ``out``, with the minutes it all took.

``--quick`` shrinks everything (a tiny model, a few steps, one TRL configuration) into a smoke
test of the whole pipeline; its figures mean nothing. ``--layers N`` keeps the size's widths
with N decoder layers, for machines where the whole model takes too long (labelled so).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from lorafit.bench.parity import ceiling, parity_check
from lorafit.bench.report import format_report, plot, summarise
from lorafit.bench.settings import (
    LORA,
    LORAFIT_CONFIGS,
    TRL_CONFIGS,
    TRL_FP32_CONFIGS,
    TRL_QLORA_CONFIGS,
    BenchSettings,
)
from lorafit.bench.workers import _run_worker
from lorafit.bench.workload import prepare_assets
from lorafit.errors import LorafitError


def run_bench(out: Path, settings: BenchSettings, echo: Any = print) -> dict[str, Any]:
    """The whole benchmark; writes ``bench.json``, ``bench.png`` and ``bench.txt`` to ``out``."""
    for option, chosen, known in (
        ("--trl", settings.trl_configs, {**TRL_CONFIGS, **TRL_QLORA_CONFIGS, **TRL_FP32_CONFIGS}),
        ("--lorafit", settings.lorafit_configs, LORAFIT_CONFIGS),
    ):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise LorafitError(
                f"{option}: unknown configuration {unknown[0]!r}; expected any of {', '.join(known)}"
            )
    if not settings.lorafit_configs:
        raise LorafitError("--lorafit: name at least one configuration")
    begun = time.time()
    out.mkdir(parents=True, exist_ok=True)
    echo(f"preparing the bench model and data in {out / 'assets'}")
    paths = prepare_assets(out / "assets", settings)
    parity = None
    if settings.parity_length != 0:
        echo("parity check: one batch through lorafit, PEFT and an fp32 reference")
        parity = parity_check(paths, settings)
    echo("measuring the bf16 matmul rate")
    roof = ceiling(paths, settings)
    order = [("lorafit", c) for c in settings.lorafit_configs] + [("trl", c) for c in settings.trl_configs]
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
            f"{settings.model_name}: Phi-3 architecture, vocab {sizes['vocab_size']}, "
            f"hidden {sizes['hidden_size']}, "
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
        "summary": summarise(runs, settings, roof),
        "runs": runs,
        "minutes": (time.time() - begun) / 60,
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
