"""LoRA, DoRA and QLoRA on the bench model: base weight memory, peak RSS, tokens/s, one process each.

The model is ``lorafit bench``'s bench model (Phi-3 architecture and vocabulary, hidden 512,
8 layers, 8 heads, intermediate 1376, random weights from a fixed seed), in bf16 where this CPU
multiplies in bf16 natively and in fp32 where it would emulate it (``lorafit.models.precision``);
LoRA r=16, alpha 32, dropout 0.05 on every linear layer but the head; the data are random token
rows with every token a label. Each mode runs in its own process (peak RSS is per process), the
modes alternating, ``--repeats`` times; tokens/s is the median over the steps after the first.

    python benchmarks/lora_variants.py [--modes lora,dora,qlora] [--steps 6] [--batch 4] [--seq 512]
                                       [--repeats 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = {"lora": {}, "dora": {"use_dora": True}, "qlora": {}, "qdora": {"use_dora": True}}


def run_one(mode: str, steps: int, batch: int, seq: int) -> dict:
    """One measurement in this process."""
    import torch

    from lorafit.adapters import LoraConfig, apply_lora
    from lorafit.bench.settings import BENCH_MODEL
    from lorafit.bench.workload import build_bench_model
    from lorafit.config import ModelConfig
    from lorafit.models.precision import Precision
    from lorafit.models.quant import QLORA_SETTINGS, prepare_kbit_model

    dtype = Precision.decide(ModelConfig(torch_dtype="bfloat16"), {}).load_dtype  # as chat and eval load it
    model = build_bench_model(BENCH_MODEL).to(dtype)
    if mode.startswith("q"):
        settings = dict(QLORA_SETTINGS, bnb_4bit_compute_dtype=str(dtype).removeprefix("torch."))
        prepare_kbit_model(model, settings)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", **MODES[mode])
    apply_lora(model, config)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    for _ in range(steps + 1):  # the first step warms up allocator and kernels
        ids = torch.randint(10, 32000, (batch, seq), generator=g)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step = statistics.median(times[1:])
    return {
        "mode": mode,
        "dtype": str(dtype).removeprefix("torch."),
        "base_weight_MB": round(weight_bytes / 2**20, 1),
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tokens_per_s": round(batch * seq / step, 1),
        "median_step_s": round(step, 3),
        "losses": [round(x, 4) for x in losses],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="lora,dora,qlora", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="write the JSON here too")
    p.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, args.steps, args.batch, args.seq)))
        return {}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    shape = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    for _ in range(args.repeats):
        for mode in modes:
            cmd = [sys.executable, __file__, "--child", mode, *shape]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"{mode}: {runs[mode][-1]}", file=sys.stderr)
    keys = ("base_weight_MB", "peak_rss_MB", "tokens_per_s")
    summary: dict = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    base = modes[0]
    summary[f"over_{base}"] = {
        mode: {k: round(summary[mode][k] / summary[base][k], 3) for k in keys} for mode in modes[1:]
    }
    summary["settings"] = {**vars(args), "dtype": runs[base][0]["dtype"]}
    summary["settings"].pop("child")
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "runs": runs}, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
