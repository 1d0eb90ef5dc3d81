"""What autograd keeps for backward per token and decoder layer: lorafit's stack or PEFT's.

The forward pass of a training step runs under ``torch.autograd.graph.saved_tensors_hooks`` and
every tensor kept for backward is counted once (by storage; parameters not counted), for the
model with 1 and with 2 decoder layers of the chosen widths (random bf16 weights, LoRA r=16 on
all linear layers, dropout 0.05, bf16 autocast, one packed row of examples of ``--example``
tokens): the difference is one layer's share, the same on every layer. Machine-independent: no
timing. Runs with whatever lorafit is on the path (a checkout before and after a change)::

    PYTHONPATH=src python benchmarks/saved_activations.py --side lorafit
    PYTHONPATH=src python benchmarks/saved_activations.py --side peft
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_step import MODELS, build  # noqa: E402


def saved_bytes(args: argparse.Namespace, layers: int) -> int:
    from lorafit.data import PackedCollator

    model = build(args.model, layers)
    config = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
    if args.side == "lorafit":
        from lorafit.adapters import LoraConfig, apply_lora
        from lorafit.models.attention import use_packed_attention
        from lorafit.training.loss import causal_lm_loss

        apply_lora(model, LoraConfig.from_dict(config))
        use_packed_attention(model)
        try:
            from lorafit.models.lean import use_lean_layers

            use_lean_layers(model)
        except ImportError:  # a lorafit from before the lean layers
            pass

        def forward(batch: dict) -> torch.Tensor:
            return causal_lm_loss(model, batch)
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **config))

        def forward(batch: dict) -> torch.Tensor:
            plain = {k: v for k, v in batch.items() if not k.startswith("cu_seq_lens")}
            return model(**plain, use_cache=False).loss

    gen = torch.Generator().manual_seed(0)
    vocab = MODELS[args.model]["vocab_size"]
    row = []
    for _ in range(args.tokens // args.example):
        ids = torch.randint(3, vocab, (args.example,), generator=gen).tolist()
        row.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    batch = PackedCollator(0, example_boundaries=True)([row])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            forward(batch)
    return sum(kept.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="phi3-mini")
    p.add_argument("--side", choices=["lorafit", "peft"], default="lorafit")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--example", type=int, default=256, help="tokens per packed example")
    args = p.parse_args()
    one, two = saved_bytes(args, 1), saved_bytes(args, 2)
    tokens = args.tokens // args.example * args.example
    per_layer = (two - one) / tokens
    print(
        json.dumps(
            {
                "model": args.model,
                "side": args.side,
                "tokens": tokens,
                "example": args.example,
                "kb_per_token_per_layer": round(per_layer / 1024, 2),
                "kb_per_token_rest": round((one - (two - one)) / tokens / 1024, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
