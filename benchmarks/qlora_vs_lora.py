"""QLoRA (4-bit NF4 base) against 16-bit LoRA: base weight memory, peak RSS and tokens/s.

Each mode runs in its own process (peak RSS is per process), alternating, ``--repeats`` times.
The model is the benchmark model of ``benchmarks/`` (Phi-3 architecture and vocabulary, hidden
512, 8 layers, 8 heads, intermediate 1376, random weights from a fixed seed, bf16 base);
the data are random token rows with every token a label.

    python benchmarks/qlora_vs_lora.py [--steps 6] [--batch 4] [--seq 512] [--repeats 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def bench_model(dtype):  # noqa: ANN001, ANN201
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=32064,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        use_cache=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Phi3ForCausalLM(config)
    return model.to(dtype)


def run_one(mode: str, steps: int, batch: int, seq: int) -> dict:
    """One measurement in this process: ``mode`` is ``lora`` or ``qlora``."""
    import torch

    from lorafit.adapters import LoraConfig, apply_lora
    from lorafit.models.quant import QLORA_SETTINGS, prepare_kbit_model

    model = bench_model(torch.bfloat16)
    if mode == "qlora":
        prepare_kbit_model(model, QLORA_SETTINGS)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    apply_lora(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
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
        "base_weight_MB": round(weight_bytes / 2**20, 1),
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tokens_per_s": round(batch * seq / step, 1),
        "median_step_s": round(step, 3),
        "losses": [round(x, 4) for x in losses],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="write the JSON here too")
    p.add_argument("--child", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, args.steps, args.batch, args.seq)))
        return {}
    runs: dict[str, list[dict]] = {"lora": [], "qlora": []}
    for _ in range(args.repeats):
        for mode in ("lora", "qlora"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"{mode}: {runs[mode][-1]}", file=sys.stderr)
    summary = {
        mode: {
            "base_weight_MB": rs[0]["base_weight_MB"],
            "peak_rss_MB": statistics.median(r["peak_rss_MB"] for r in rs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
        }
        for mode, rs in runs.items()
    }
    summary["qlora_over_lora"] = {
        k: round(summary["qlora"][k] / summary["lora"][k], 3)
        for k in ("base_weight_MB", "peak_rss_MB", "tokens_per_s")
    }
    summary["settings"] = {"steps": args.steps, "batch": args.batch, "seq": args.seq, "repeats": args.repeats}
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "runs": runs}, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
