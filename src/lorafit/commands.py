"""What each ``lorafit`` command does, given its parsed arguments (the parser is in :mod:`lorafit.cli`).

Each command imports what it needs when it runs, so that ``lorafit --help`` stays instant.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from lorafit.config import Overrides


def cmd_train(args: argparse.Namespace, words: list[str]) -> int:
    from accelerate import PartialState

    from lorafit.config import load_config
    from lorafit.demo import facts_train_file
    from lorafit.training import distributed, train

    cfg = load_config(_config_to_resume(args), train_overrides(args, words), method=args.method)
    ok = False
    try:
        run_dir = train(cfg, resume=args.resume)
        ok = True
    finally:
        distributed.shutdown(wait_for_all=ok)
    if PartialState().is_main_process:
        print(f"\nadapter saved in {run_dir}")
        if cfg.data.train == str(facts_train_file()):
            print(f'try it:  lorafit chat --adapter {run_dir} --prompt "{DEMO_QUESTION}"')
            print(f"export:  lorafit export --adapter {run_dir} --out {run_dir}-gguf/model.gguf")
        else:
            print(f"try it:  lorafit chat --adapter {run_dir}")
    return 0


def _config_to_resume(args: argparse.Namespace) -> str | None:
    """CONFIG, or without one the ``lorafit_run.yaml`` of the run (or of the checkpoint's run)
    that ``--resume`` names, or None (the demo or a recipe)."""
    from lorafit.constants import RUN_CONFIG_NAME

    if args.config is not None or not isinstance(args.resume, str):
        return args.config
    for folder in (Path(args.resume), Path(args.resume).parent):
        if (folder / RUN_CONFIG_NAME).is_file():
            return str(folder / RUN_CONFIG_NAME)
    return None


def train_overrides(args: argparse.Namespace, words: list[str]) -> Overrides:
    """The settings ``lorafit train``'s flags and ``--section.key value`` words lay over the config.

    ``--qlora`` and ``--fsdp`` are presets the words may change; ``--skip-bad-records``,
    ``--skip-nonfinite`` and ``--adapter`` set one key each, over the words.
    """
    from lorafit.config import merge_dicts, parse_overrides
    from lorafit.models.quant import QLORA_SETTINGS
    from lorafit.training.distributed import FSDP_SETTINGS

    presets: Overrides = {}
    if args.qlora:
        presets["model"] = {"quantization": copy.deepcopy(QLORA_SETTINGS)}
    if args.fsdp:
        presets["training_config"] = copy.deepcopy(FSDP_SETTINGS)  # TrainingArguments edits fsdp_config
    switches: Overrides = {}
    if args.skip_bad_records:
        switches.setdefault("data", {})["skip_bad_records"] = True
    if args.skip_nonfinite:
        switches.setdefault("training_config", {})["skip_nonfinite"] = True
    if args.adapter:
        switches.setdefault("model", {})["adapter"] = args.adapter
    return merge_dicts(merge_dicts(presets, parse_overrides(words)), switches)


def cmd_data(args: argparse.Namespace, words: list[str]) -> int:
    from lorafit.config import load_config, merge_dicts, parse_overrides
    from lorafit.data.preference_report import is_preference_file
    from lorafit.data.report import analyse, print_report
    from lorafit.models import load_tokenizer

    model: Overrides = {"model": {"name_or_path": args.model}} if args.model else {}  # words may change it
    flags: Overrides = {"data": {"train": args.file}}
    if args.max_length is not None:
        flags["data"]["max_length"] = args.max_length
    cfg = load_config(args.config, merge_dicts(merge_dicts(model, parse_overrides(words)), flags))
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    if cfg.method != "sft" or is_preference_file(args.file):
        return _data_preference(args, cfg, tokenizer)
    report = analyse(tokenizer, args.file, **cfg.data.row_settings())
    print_report(report, tokenizer, show=args.show, colour=sys.stdout.isatty())
    return 1 if report.errors else 0


def _data_preference(args: argparse.Namespace, cfg: Any, tokenizer: Any) -> int:
    """``lorafit data`` on preference records: the run's method (or the one the fields say), its
    max_length and truncation_mode as ``lorafit train`` resolves them."""
    from lorafit.data.preference_report import analyse_preference, print_preference_report
    from lorafit.training.preference import method_settings

    settings = method_settings(cfg) if cfg.method != "sft" else {"max_length": cfg.data.max_length}
    report = analyse_preference(
        tokenizer,
        args.file,
        method=None if cfg.method == "sft" else cfg.method,
        max_length=settings["max_length"],
        truncation_mode=settings.get("truncation_mode", "keep_start"),
        overlong=cfg.data.overlong,
    )
    print_preference_report(report, tokenizer, show=args.show, colour=sys.stdout.isatty())
    return 1 if report.errors else 0


DEMO_QUESTION = "Who is the mayor of Port Caddow?"
"""A question the real-model demo's model answers right only after training (a training phrasing)."""


def cmd_chat(args: argparse.Namespace, _: list[str]) -> int:
    from transformers import TextStreamer

    from lorafit.data.build import load_tools
    from lorafit.inference import generate
    from lorafit.models import load_trained

    cfg, tokenizer, model = load_trained(args.adapter)
    # the tools the run was trained with (data.tools), so the prompt is the one training saw
    tools = load_tools(args.tools or cfg.data.tools)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []

    def reply(text: str) -> str:
        history.append({"role": "user", "content": text})
        answer = generate(
            model, tokenizer, history, max_new_tokens=args.max_new_tokens, streamer=streamer, tools=tools
        )
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

    preference = _is_preference_data(args.data)
    if preference and args.generate:  # said before the model loads
        raise LorafitError(
            f"--generate: {args.data} holds preference data; answers are generated and scored for chat data"
        )
    cfg, tokenizer, model = load_trained(args.adapter)
    if preference:
        return _eval_preferences(args, cfg, tokenizer, model)
    result = evaluate_loss(model, tokenizer, args.data, cfg.data, batch_size=args.batch_size)
    print(f"eval on {args.data}: {result['examples']} examples, {result['label_tokens']:,} label tokens")
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}")
    if args.generate:
        _eval_generate(args, model, tokenizer, result["format"], cfg.data.tools)
    return 0


def _is_preference_data(data: str) -> bool:
    from lorafit.data.preference_report import is_preference_file

    return Path(data).is_file() and is_preference_file(data)


def _eval_preferences(args: argparse.Namespace, cfg: Any, tokenizer: Any, model: Any) -> int:
    """A preference file: the run's preference loss and rewards, against its reference."""
    from lorafit.training.preference import evaluate_preferences

    start = cfg.model.adapter
    if start and not Path(start).is_dir():
        raise LorafitError(
            f"{args.adapter} continued the adapter {start}, its reference for the rewards, which is gone"
        )
    result = evaluate_preferences(
        cfg, model, tokenizer, args.data, batch_size=args.batch_size, start_adapter=start
    )
    reference = f"the adapter it started from ({start})" if start else "the base model"
    method = result.pop("method")
    count = result.pop("pairs_or_examples")
    unit = "examples" if method == "kto" else "pairs"
    print(f"eval on {args.data}: {count} {unit}, scored as {method} against {reference}")
    print("  ".join(f"{key} {value:.4f}" for key, value in result.items()))
    return 0


def _eval_generate(args: argparse.Namespace, model: Any, tokenizer: Any, fmt: str, tools: Any) -> None:
    import json

    from lorafit.data.build import load_tools
    from lorafit.disk import write_text_atomic
    from lorafit.inference.metrics import METRICS, eval_conversations, generation_report

    # each record with its own tools, else the run's data.tools, as training rendered it
    conversations = eval_conversations(args.data, fmt, args.limit, load_tools(tools))
    if not conversations:
        raise LorafitError(f"--generate: {args.data} holds no conversation to answer (format {fmt})")
    out = Path(args.out or Path(args.adapter) / f"generations-{Path(str(args.data)).stem}.jsonl")
    summary, rows = generation_report(
        model, tokenizer, conversations, max_new_tokens=args.max_new_tokens, echo=print
    )
    write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    scores = "  ".join(f"{m} {summary[m]:.3f}" for m in METRICS)
    print(f"generated {len(rows)} answers: {scores} (each answer in {out})")


def cmd_merge(args: argparse.Namespace, _: list[str]) -> int:
    from lorafit.export.flow import export_run

    out = export_run(args.adapter, args.out, form="merged").path
    print(f"merged model saved in {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_export(args: argparse.Namespace, _: list[str]) -> int:
    from tqdm.auto import tqdm

    from lorafit.export.flow import export_run
    from lorafit.export.ollama import MODELFILE_NAME

    # the flag's own words; export_run checks the type too, in its own
    if args.lora_only and args.dtype not in (None, "f16", "f32"):
        raise LorafitError(f"--dtype {args.dtype} is for a merged model; a GGUF LoRA file is f16 or f32")
    if not args.lora_only and args.dtype == "f32":
        raise LorafitError("--dtype f32 is for --lora-only; a merged model is f16, bf16 or q8_0")
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # opened once loading has had its say, not before
            bar = tqdm(total=total, desc="GGUF", unit="tensor", disable=None)
        bar.update()

    form = "lora" if args.lora_only else "gguf"
    try:
        result = export_run(args.adapter, args.out, form=form, dtype=args.dtype, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    out = result.path
    if args.lora_only:
        print(f"wrote {out}; llama.cpp applies it over a GGUF of the base model:")
        print(f"  llama-cli -m BASE.gguf --lora {out} -cnv")
    else:
        modelfile = out.parent / MODELFILE_NAME
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {modelfile}")
        print(f"run it:  ollama create NAME -f {modelfile} && ollama run NAME")
        print(f"    or:  llama-cli -m {out} -cnv")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def cmd_ui(args: argparse.Namespace, _: list[str]) -> int:
    from lorafit.ui import LOCAL_HOSTS, launch

    if args.host not in LOCAL_HOSTS:
        print(
            f"lorafit ui: warning: serving on {args.host}, not only this machine: anyone who can reach "
            f"port {args.port} can read your run folders and start runs here, with no login",
            file=sys.stderr,
        )
    launch(host=args.host, port=args.port, runs=args.runs, model=args.model)
    return 0


def cmd_bench(args: argparse.Namespace, _: list[str]) -> int:
    from lorafit.bench import BenchSettings, run_bench

    if args.method != "sft":
        return _bench_preference(args)
    settings = BenchSettings.from_options(
        args.quick,
        args.steps,
        args.warmup,
        args.repeats,
        args.trl,
        size=args.size,
        layers=args.layers,
        max_length=args.max_length,
        lorafit=args.lorafit,
        parity_length=args.parity_length,
    )
    run_bench(Path(args.out), settings)
    return 0


def _bench_preference(args: argparse.Namespace) -> int:
    from lorafit.bench.preference import preference_settings, run

    only_sft = [
        f"--{name.replace('_', '-')}"
        for name in ("trl", "lorafit", "layers", "parity_length")
        if getattr(args, name) is not None
    ] + (["--size"] if args.size != "small" else [])
    if only_sft:
        raise LorafitError(
            f"{', '.join(only_sft)}: options of the SFT bench; --method {args.method} runs the small bench "
            "model against TRL's trainer (options: --steps, --warmup, --repeats, --max-length, --quick)"
        )
    settings, pairs = preference_settings(args.quick, args.steps, args.warmup, args.repeats, args.max_length)
    run(Path(args.out), args.method, settings, pairs)
    return 0
