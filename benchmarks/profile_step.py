"""Where a training step's time goes: one model's shapes, lorafit's stack or PEFT's, torch.profiler.

Builds a model from a configuration (random bf16 weights from a fixed seed, nothing downloaded),
applies LoRA r=16 (alpha 32, dropout 0.05, all linear layers), and trains packed rows of random
token ids (examples of ``--min``..``--max`` tokens, every token a label but each example's first)
with bf16 autocast and AdamW:

- ``--side lorafit``: lorafit's layers, its per-example attention, its lean norms and gates where
  the installed lorafit has them, and its loss (``causal_lm_loss``);
- ``--side peft``: PEFT's layers, sdpa over the same rows (the block mask from position_ids) and
  the model's own loss.

Prints the median step time, tokens/s and peak RSS, then (``--profile``) the profiler's table of
the ops with the most self CPU time over the timed steps, and the time in matrix products, in
other ops, and outside any op (Python and dispatch: the per-layer overhead). Runs with whatever
lorafit is on the path, so the same script measures a checkout before and after a change::

    PYTHONPATH=src python benchmarks/profile_step.py --model smollm2 --rows 1 --length 1024 --profile
    PYTHONPATH=/path/to/old/src python benchmarks/profile_step.py --model smollm2 ...

Models: ``smollm2`` (SmolLM2-135M's config: hidden 576, 30 layers, 9 heads, 3 key/value heads,
intermediate 1536, vocab 49152, tied embeddings), ``phi3-mini`` (hidden 3072, 32 layers, 32
heads, intermediate 8192, vocab 32064; ``--layers`` cuts it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

MODELS = {
    "smollm2": dict(
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
    ),
    "phi3-mini": dict(
        family="phi3",
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    ),
}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


def build(name: str, layers: int | None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    spec = dict(MODELS[name])
    family = spec.pop("family")
    if layers:
        spec["num_hidden_layers"] = layers
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Phi3Config, Phi3ForCausalLM)
    )
    config = config_cls(**spec, max_position_embeddings=8192, pad_token_id=0, use_cache=False)
    config.initializer_range = spec["hidden_size"] ** -0.5
    torch.manual_seed(1234)
    model = model_cls._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.train()


def rows(args: argparse.Namespace, vocab: int) -> list[list[dict]]:
    """Packed rows of random examples, the same for both sides."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.steps + 1):
        batch = []
        for _ in range(args.rows):
            row, room = [], args.length
            while room > 0:
                n = int(torch.randint(args.min, args.max + 1, (1,), generator=gen))
                n = min(n, room)
                ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
                row.append({"input_ids": ids, "labels": [-100] + ids[1:]})
                room -= n
            batch.append(row)
        out.append(batch)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="smollm2")
    p.add_argument("--layers", type=int, help="decoder layers (default: the model's)")
    p.add_argument("--side", choices=["lorafit", "peft"], default="lorafit")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--min", type=int, default=100, help="shortest example")
    p.add_argument("--max", type=int, default=600, help="longest example")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()

    from lorafit.data import PackedCollator

    model = build(args.model, args.layers)
    config = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
    if args.side == "lorafit":
        from lorafit.adapters import LoraConfig, apply_lora
        from lorafit.models.attention import use_packed_attention
        from lorafit.training.loss import causal_lm_loss

        apply_lora(model, LoraConfig.from_dict(config))
        assert use_packed_attention(model)
        try:
            from lorafit.models.lean import use_lean_layers
        except ImportError:  # a lorafit from before the lean layers
            use_lean_layers = None
        lean = use_lean_layers(model) if use_lean_layers else 0

        def loss_of(batch: dict) -> torch.Tensor:
            return causal_lm_loss(model, batch)
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **config))
        lean = 0

        def loss_of(batch: dict) -> torch.Tensor:
            plain = {k: v for k, v in batch.items() if not k.startswith("cu_seq_lens")}
            return model(**plain, use_cache=False).loss

    collate = PackedCollator(0, example_boundaries=True)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = MODELS[args.model]["vocab_size"]

    def step(batch: dict) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    batches = [collate(b) for b in rows(args, vocab)]
    step(batches[0])  # warm-up: allocator, lazy initialisation
    times, losses = [], []
    profiler = None
    if args.profile:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        profiler.__enter__()
    for batch in batches[1:]:
        start = time.perf_counter()
        losses.append(step(batch))
        times.append(time.perf_counter() - start)
    tokens = args.rows * args.length
    median = statistics.median(times)
    peak = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 2**20
    figures = {
        "model": args.model,
        "layers": args.layers or MODELS[args.model]["num_hidden_layers"],
        "side": args.side,
        "lean_modules": lean,
        "rows": args.rows,
        "length": args.length,
        "step_s": times,
        "median_step_s": median,
        "tokens_per_s": tokens / median,
        "peak_rss_gb": peak,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "step_s"}))
    if profiler is not None:
        profiler.__exit__(None, None, None)
        events = profiler.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=18))
        total = sum(times) * 1e6
        self_total = sum(e.self_cpu_time_total for e in events)
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
        calls = sum(e.count for e in events)
        figures.update(
            matmul_share=matmul / total,
            other_ops_share=(self_total - matmul) / total,
            outside_ops_share=max(0.0, 1 - self_total / total),
            op_calls_per_step=calls / len(times),
        )
        print(
            f"per step: {median:.2f} s; matrix products {100 * matmul / total:.0f}%, other ops "
            f"{100 * (self_total - matmul) / total:.0f}%, outside any op (Python, dispatch) "
            f"{100 * max(0.0, 1 - self_total / total):.0f}%; {calls / len(times):.0f} op calls"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
