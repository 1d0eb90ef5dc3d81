"""lorafit's packed attention against sdpa, one example of n tokens, n = 64 .. 4096.

For each length: forward + backward time (median of ``--repeats`` after a warm-up) and the bytes
kept for backward (saved-tensor hooks, each storage once) of

- ``lorafit``: :class:`lorafit.models.attention._ExampleAttention` on the example (whatever
  lorafit is on the path: run it with an older checkout's ``src`` to compare);
- ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on the example alone,
  sdpa's best case (its fused CPU kernel, skipping the blocks above the diagonal);

Phi-3-mini's heads by default (32 heads of 96), bf16, batch 1. Prints a table and, with ``--json``,
writes it::

    PYTHONPATH=src python benchmarks/attention_lengths.py [--lengths 64,128,...] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafit.models import attention


def kept_bytes(run) -> tuple[torch.Tensor, int]:
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(kept.values())


def timed(run, repeats: int) -> float:
    def once() -> float:
        start = time.perf_counter()
        out = run()
        out.backward(torch.ones_like(out))
        return time.perf_counter() - start

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="64,128,256,512,1024,2048,4096")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sides", default="lorafit,sdpa")
    p.add_argument("--json")
    args = p.parse_args()
    tiled = hasattr(attention, "TILE_SCORES")  # this checkout's attention, or the older one
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=gen).bfloat16() for _ in range(3))
        for t in (q, k, v):
            t.requires_grad_()
        scale = args.dim**-0.5
        # the tensors bound as defaults: each length's closures read that length's q, k, v
        runs = {
            "lorafit": lambda q=q, k=k, v=v, n=n, scale=scale: attention._ExampleAttention.apply(
                q, k, v, ((0, 0, n),), scale
            ),
            "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        row = {"n": n}
        for side in args.sides.split(","):
            _, kept = kept_bytes(runs[side])
            row[f"{side}_s"] = timed(runs[side], args.repeats)
            row[f"{side}_kept_mb"] = kept / 2**20
        rows.append(row)
        print(json.dumps(row), flush=True)
    sides = args.sides.split(",")
    print(f"\nattention, one example, {args.heads} heads of {args.dim}, bf16, forward + backward")
    print(f"lorafit: {'tiled (this checkout)' if tiled else 'untiled (an older checkout)'}")
    header = f"{'n':>5} " + " ".join(f"{s + ' ms':>12} {s + ' kept MB':>15}" for s in sides)
    if len(sides) == 2:
        header += f" {'speed vs ' + sides[1]:>14}"
    print(header)
    for row in rows:
        line = f"{row['n']:5d} " + " ".join(
            f"{1e3 * row[s + '_s']:12.1f} {row[s + '_kept_mb']:15.1f}" for s in sides
        )
        if len(sides) == 2:
            line += f" {row[sides[1] + '_s'] / row[sides[0] + '_s']:13.2f}x"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"tiled": tiled, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
