"""``lorafit train | eval | chat | merge | bench``: the command line.

Errors a user can fix (``LorafitError``) print as one paragraph without a traceback;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError, RunStopped

TRAIN_HELP = """\
Fine-tune a causal LM with LoRA on chat data.

With no CONFIG, trains the embedded demo (a tiny Phi-3-architecture model on a sample chat
dataset) in about two minutes on a laptop CPU. CONFIG is a YAML or JSON file with the sections
model, tokenizer, data, peft_config (PEFT LoraConfig keys) and training_config (transformers
TrainingArguments keys). Any key can be overridden: --section.key value.

examples:
  lorafit train
  lorafit train phi3.yaml --training_config.learning_rate 1e-4 --data.max_length 1024
  lorafit train phi3.yaml --qlora
  lorafit train --resume runs/20261128-101500
  lorafit train phi3.yaml --skip-bad-records
  torchrun --nproc_per_node 4 -m lorafit train phi3.yaml           # DDP over 4 GPUs (or CPU processes)
  torchrun --nproc_per_node 8 -m lorafit train phi3.yaml --fsdp    # shard the base model over 8 GPUs

Ctrl-C (SIGINT) or SIGTERM stops after the current step with a checkpoint saved; --resume
continues it exactly where it stopped.
"""

CHAT_HELP = """\
Chat with a trained adapter: loads the base model recorded in the run, the adapter, and the
tokenizer's chat template, and streams the answer. Without --prompt it is an interactive
conversation that keeps its history (/reset clears it, /exit or Ctrl-D leaves).

examples:
  lorafit chat --adapter runs/20261128-101500 --prompt "What is LoRA?"
  lorafit chat --adapter runs/20261128-101500
"""

EVAL_HELP = """\
Loss and perplexity of a trained adapter on a dataset (the same formats as training: loss on
assistant tokens by default, as the run was trained). With --generate it also answers each
conversation's last assistant turn and scores the answers against it: exact match, whether the
answer contains the reference, and ROUGE-L; one line per example goes to --out (JSONL).

examples:
  lorafit eval --adapter runs/20261128-101500 --data data/eval.jsonl
  lorafit eval --adapter runs/20261128-101500 --data data/eval.jsonl --generate --out answers.jsonl
"""

MERGE_HELP = """\
Fold the adapter into the base weights and save a plain transformers model that loads with
AutoModelForCausalLM.from_pretrained, no lorafit or PEFT needed.

example:
  lorafit merge --adapter runs/20261128-101500 --out merged/
"""

BENCH_HELP = """\
Benchmark lorafit against PEFT + TRL: the same Phi-3-architecture model (random weights),
synthetic chat data, LoRA settings, optimizer and batch on both sides, each run in its own
process, alternately. Prints tokens/s, peak memory and loss per configuration with ratios, a
parity check of loss and gradients on one batch, and the machine's matmul ceiling; writes
bench.json, bench.png and bench.txt to --out. Needs peft and trl (pip install -e ".[bench]").

examples:
  lorafit bench                          # the full benchmark (about an hour on 2 CPU cores)
  lorafit bench --quick                  # a tiny smoke test of the whole pipeline (under a minute)
  lorafit bench --steps 10 --repeats 1 --trl packing
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafit",
        description="LoRA and QLoRA fine-tuning for Phi-3 and other Hugging Face causal language models.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser(
        "train",
        help="fine-tune (no arguments: the embedded demo)",
        description=TRAIN_HELP,
        formatter_class=fmt,
    )
    t.add_argument("config", nargs="?", help="run config (YAML or JSON); omit for the demo")
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_OR_CHECKPOINT",
        help="continue from the last checkpoint of the run folder (or of training_config.output_dir)",
    )
    t.add_argument(
        "--qlora", action="store_true", help="4-bit NF4 base weights (the Phi-3 QLoRA sample's settings)"
    )
    t.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model over the GPUs of a torchrun/accelerate launch (FSDP2, one unit a layer)",
    )
    t.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="train on the good records and list the bad ones in RUN/skipped_records.jsonl "
        "(data.skip_bad_records); by default the first bad record stops the run",
    )
    t.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip an optimizer step whose loss or gradients are NaN or inf "
        "(training_config.skip_nonfinite); by default such a step stops the run",
    )
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    c = sub.add_parser("chat", help="chat with a trained adapter", description=CHAT_HELP, formatter_class=fmt)
    c.add_argument(
        "--adapter", required=True, metavar="RUN_DIR", help="a run folder (or any PEFT adapter folder)"
    )
    c.add_argument("--prompt", help="one prompt: print the answer and exit")
    c.add_argument("--system", help="a system prompt for the conversation")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    e = sub.add_parser(
        "eval", help="loss and perplexity on a dataset", description=EVAL_HELP, formatter_class=fmt
    )
    e.add_argument("--adapter", required=True, metavar="RUN_DIR", help="a run folder")
    e.add_argument("--data", required=True, help="file, folder or hf:NAME[:SPLIT] to evaluate on")
    e.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    e.add_argument("--generate", action="store_true", help="also answer and score the conversations")
    e.add_argument(
        "--out", help="with --generate: the per-example JSONL (default RUN_DIR/generations-DATA.jsonl)"
    )
    e.add_argument("--limit", type=int, help="with --generate: answer only the first N conversations")
    e.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    m = sub.add_parser(
        "merge", help="merge the adapter into a plain model", description=MERGE_HELP, formatter_class=fmt
    )
    m.add_argument("--adapter", required=True, metavar="RUN_DIR", help="a run folder")
    m.add_argument("--out", required=True, help="folder for the merged model (must be new or empty)")
    m.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    b = sub.add_parser(
        "bench", help="benchmark against PEFT + TRL", description=BENCH_HELP, formatter_class=fmt
    )
    b.add_argument("--out", default="bench_out", help="folder for the results (default bench_out)")
    b.add_argument("--steps", type=int, help="optimizer steps per run (default 15)")
    b.add_argument("--warmup", type=int, help="first steps left out of tokens/s (default 2)")
    b.add_argument("--repeats", type=int, help="runs of each configuration (default 3)")
    b.add_argument(
        "--trl",
        help="comma-separated PEFT+TRL configurations: packing, packing+checkpointing, padded, "
        "padded+checkpointing (default: all)",
    )
    b.add_argument("--quick", action="store_true", help="a tiny model and a few steps: a smoke test")
    b.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take ``--section.key value`` / ``--section.key=value`` pairs out before argparse sees them
    (argparse would read the value as the CONFIG positional)."""
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    argv, overrides = _split_overrides(argv)
    args, rest = parser.parse_known_args(argv)
    rest = [*rest, *overrides]
    if args.command is None:
        parser.print_help()
        return 0
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        commands = {
            "train": cmd_train,
            "chat": cmd_chat,
            "eval": cmd_eval,
            "merge": cmd_merge,
            "bench": cmd_bench,
        }
        return commands[args.command](args, rest)
    except LorafitError as e:
        if args.debug:
            raise
        print(f"lorafit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"lorafit {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from lorafit.config import load_config
    from lorafit.constants import RUN_CONFIG_NAME
    from lorafit.training import distributed, train

    config_path = args.config
    if (
        config_path is None
        and isinstance(args.resume, str)
        and (Path(args.resume) / RUN_CONFIG_NAME).is_file()
    ):
        config_path = str(Path(args.resume) / RUN_CONFIG_NAME)
    elif config_path is None and isinstance(args.resume, str):
        parent = Path(args.resume).parent / RUN_CONFIG_NAME
        config_path = str(parent) if parent.is_file() else None
    if args.qlora:
        from lorafit.models.quant import QLORA_OVERRIDES

        overrides = [*QLORA_OVERRIDES, *overrides]
    if args.fsdp:
        overrides = [*distributed.FSDP_OVERRIDES, *overrides]
    if args.skip_bad_records:
        overrides = [*overrides, "--data.skip_bad_records", "true"]
    if args.skip_nonfinite:
        overrides = [*overrides, "--training_config.skip_nonfinite", "true"]
    cfg = load_config(config_path, overrides)
    ok = False
    try:
        run_dir = train(cfg, resume=args.resume)
        ok = True
    finally:
        distributed.shutdown(wait_for_all=ok)
    if distributed.is_main_process():
        print(f"\nadapter saved in {run_dir}")
        print(f"try it:  lorafit chat --adapter {run_dir}")
    return 0


def cmd_chat(args: argparse.Namespace, _: list[str]) -> int:
    from transformers import TextStreamer

    from lorafit.inference import generate
    from lorafit.models import load_trained

    _, tokenizer, model = load_trained(args.adapter)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []

    def reply(text: str) -> str:
        history.append({"role": "user", "content": text})
        answer = generate(model, tokenizer, history, max_new_tokens=args.max_new_tokens, streamer=streamer)
        history.append({"role": "assistant", "content": answer})
        return answer

    if args.prompt is not None:
        reply(args.prompt)
        return 0
    print("lorafit chat: type a message; /reset clears the history, /exit leaves.")
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            del history[1 if args.system else 0 :]
            print("(history cleared)")
            continue
        if text:
            print("assistant> ", end="", flush=True)
            reply(text)


def cmd_eval(args: argparse.Namespace, _: list[str]) -> int:
    from lorafit.inference import evaluate_loss
    from lorafit.models import load_trained

    cfg, tokenizer, model = load_trained(args.adapter)
    result = evaluate_loss(model, tokenizer, args.data, cfg.data, batch_size=args.batch_size)
    print(f"eval on {args.data}: {result['examples']} examples, {result['label_tokens']:,} label tokens")
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}")
    if args.generate:
        _eval_generate(args, model, tokenizer, result["format"])
    return 0


def _eval_generate(args: argparse.Namespace, model: Any, tokenizer: Any, fmt: str) -> None:
    import json

    from lorafit.disk import write_text_atomic
    from lorafit.inference.metrics import METRICS, eval_conversations, generation_report

    conversations = eval_conversations(args.data, fmt, args.limit)
    if not conversations:
        raise LorafitError(f"--generate: {args.data} holds no conversation to answer (format {fmt})")
    out = Path(args.out or Path(args.adapter) / f"generations-{Path(str(args.data)).stem}.jsonl")
    summary, rows = generation_report(model, tokenizer, conversations, max_new_tokens=args.max_new_tokens)
    write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    scores = "  ".join(f"{m} {summary[m]:.3f}" for m in METRICS)
    print(f"generated {len(rows)} answers: {scores} (each answer in {out})")


def cmd_merge(args: argparse.Namespace, _: list[str]) -> int:
    from lorafit.export import check_new_folder, save_merged
    from lorafit.models import load_trained

    out = Path(args.out)
    check_new_folder(out)  # before the model loads, not after
    cfg, tokenizer, model = load_trained(args.adapter)
    save_merged(model, tokenizer, out, quantized=bool(cfg.model.quantization))
    print(f"merged model saved in {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_bench(args: argparse.Namespace, _: list[str]) -> int:
    from lorafit.bench import BenchSettings, run_bench

    settings = BenchSettings.from_options(args.quick, args.steps, args.warmup, args.repeats, args.trl)
    run_bench(Path(args.out), settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
