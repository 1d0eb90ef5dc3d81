"""One GPU, a few minutes: lorafit and PEFT + TRL on Phi-3-mini's shapes, LoRA bf16 and QLoRA.

Each run trains Phi-3-mini's published configuration (random bf16 weights from the bench seed,
written once under ``$LORAFIT_CACHE/bench`` by ``lorafit bench``'s own code) on the phi3-mini
bench's chats (260-1,900 tokens) packed into rows of 2048 tokens, LoRA r=16 on all linear layers,
bf16, in its own process, and prints real tokens/s (after the warm-up steps),
``torch.cuda.max_memory_allocated``, peak host RSS and the loss of the first and last step:

- lorafit ``fast`` (no layer recomputed) and ``qlora`` (NF4 base, 3/4 of the layers recomputed);
- PEFT + TRL ``packing`` and ``packing+checkpointing`` (bf16) and ``qlora+packing+checkpointing``
  (``prepare_model_for_kbit_training``, the QLoRA recipe of PEFT's docs).

Run it with ``benchmarks/gpu_check.sh``. ``--quick`` runs the same pipeline on the bench's tiny
model, on CPU too (a check of the script, not of a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lorafit.bench.settings import BenchSettings
from lorafit.bench.workers import _run_worker
from lorafit.bench.workload import prepare_assets

RUNS = [
    ("lorafit", "fast"),
    ("trl", "packing"),
    ("trl", "packing+checkpointing"),
    ("lorafit", "qlora"),
    ("trl", "qlora+packing+checkpointing"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=1, help="rows of 2048 tokens a step")
    p.add_argument("--only", help="comma-separated side:config pairs (default: all five)")
    p.add_argument("--quick", action="store_true", help="the tiny model: a check of the script")
    args = p.parse_args()
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --quick to check the script on CPU)")
    settings = BenchSettings.quick_settings() if args.quick else BenchSettings.for_size("phi3-mini")
    settings.steps, settings.warmup, settings.repeats = args.steps, args.warmup, 1
    if not args.quick:
        settings.batch_size = args.rows
    out = Path(args.out)
    paths = prepare_assets(out / "assets", settings)
    runs = RUNS if not args.only else [tuple(x.split(":", 1)) for x in args.only.split(",")]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"gpu_check on {device}: {settings.model_name}, {settings.batch_size} x {settings.max_length} tokens"
    )
    results = []
    for side, config in runs:
        run = _run_worker(out, side, config, 0, paths, settings)
        cuda = run.get("cuda_max_memory_mb")
        line = (
            f"{side:8} {config:28} {run['tokens_per_s']:9.1f} tokens/s  "
            f"max_memory_allocated {cuda / 1024 if cuda is not None else float('nan'):6.2f} GB  "
            f"peak RSS {run['peak_rss_mb'] / 1024:5.1f} GB  "
            f"loss {run['losses'][0]:.4f} -> {run['losses'][-1]:.4f}"
        )
        print(line, flush=True)
        results.append({"side": side, "config": config, **run, "line": line})
    by = {(r["side"], r["config"]): r for r in results}
    for ours, theirs in (
        (("lorafit", "fast"), ("trl", "packing")),
        (("lorafit", "qlora"), ("trl", "qlora+packing+checkpointing")),
    ):
        if ours in by and theirs in by:
            a, b = by[ours], by[theirs]
            gap = statistics.mean(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=False))
            print(
                f"{ours[1]} vs PEFT+TRL {theirs[1]}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                f"mean |loss gap| per step {gap:.4f}"
            )
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
