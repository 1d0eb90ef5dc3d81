"""DPO benchmark: lorafit's ``method: dpo`` against TRL's ``DPOTrainer`` with PEFT, same model,
same synthetic pairs, same settings, optimizer and batch, each run in its own process, alternately.

    lorafit bench --method dpo|orpo [--out bench_out] [--steps 8] [--repeats 2] [--quick]
    python -m lorafit.bench.preference --out bench_dpo [--method dpo|orpo] [--pairs 200] [--batch-size 4]

The model is the small bench model (``lorafit bench``'s: hidden 512, 8 layers, Phi-3's vocabulary),
the pairs are its synthetic chats: the prompt is a chat up to its last user turn, ``chosen`` the
chat's own last answer and ``rejected`` the last answer of the next chat. tokens/s counts prompt +
chosen and prompt + rejected (the tokens a step runs forward), after ``--warmup`` steps; peak RSS
is the process's. lorafit runs as ``lorafit train`` does (bf16 weights, products widened on a CPU
without bf16 instructions); TRL in fp32 on such a CPU (its bf16 would be emulated) and bf16 elsewhere.
The reference, on both sides, is the base model with the adapter switched off.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lorafit.bench.settings import LORA, BenchSettings
from lorafit.bench.workload import bench_tokenizer, prepare_assets, training_config

BETA = 0.1


def write_pairs(paths: dict[str, str], out: Path, n: int) -> str:
    """Preference pairs from the bench chats (conversational form), ``n`` of them."""
    chats = [json.loads(line)["messages"] for line in Path(paths["train"]).read_text().splitlines()[: n + 1]]
    path = out / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for chat, other in zip(chats, chats[1:], strict=False):
            last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
            rejected = next(m for m in reversed(other) if m["role"] == "assistant")
            record = {"prompt": chat[:last], "chosen": [chat[last]], "rejected": [rejected]}
            f.write(json.dumps(record) + "\n")
    return str(path)


class _Meter:
    """Step end times and each step's forward tokens (counted as the collator sees the examples)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.start: float | None = None
        self.cpu_start: float | None = None
        self.losses: list[float] = []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        meter = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):  # noqa: ANN001, ANN201
                loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
                collate = loader.collate_fn

                def counting(examples: list[dict]) -> Any:
                    meter.tokens.append(sum(_forward_tokens(e) for e in examples))
                    return collate(examples)

                loader.collate_fn = counting

            def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
                if meter.start is None:
                    meter.start, meter.cpu_start = time.perf_counter(), _cpu_seconds()

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
                meter.ends.append(time.perf_counter())
                meter.cpu_ends.append(_cpu_seconds())

            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
                if logs and "loss" in logs:
                    meter.losses.append(float(logs["loss"]))

        return Callback()

    def result(self, warmup: int) -> dict[str, Any]:
        times = [self.ends[0] - self.start, *(b - a for a, b in zip(self.ends, self.ends[1:], strict=False))]
        cpu = [
            self.cpu_ends[0] - self.cpu_start,
            *(b - a for a, b in zip(self.cpu_ends, self.cpu_ends[1:], strict=False)),
        ]
        per_step = len(self.tokens) // max(len(self.ends), 1)  # batches per step (accumulation)
        step_tokens = [sum(self.tokens[i * per_step : (i + 1) * per_step]) for i in range(len(self.ends))]
        kept = slice(warmup, None)
        return {
            "tokens_per_s": sum(step_tokens[kept]) / sum(times[kept]),
            # on a shared machine wall time counts the waits for a core; CPU time counts the work
            "tokens_per_cpu_s": sum(step_tokens[kept]) / sum(cpu[kept]),
            "step_seconds": times,
            "step_cpu_seconds": cpu,
            "losses": self.losses,
        }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _forward_tokens(example: dict) -> int:
    if "chosen_input_ids" in example:  # lorafit: prompt + answer, twice
        return len(example["chosen_input_ids"]) + len(example["rejected_input_ids"])
    prompt = len(example["prompt_ids"])  # TRL: prompt_ids, chosen_ids, rejected_ids
    return 2 * prompt + len(example["chosen_ids"]) + len(example["rejected_ids"])


def run_lorafit(spec: dict[str, Any]) -> dict[str, Any]:
    from lorafit.config import build_config
    from lorafit.training import train

    settings, paths = BenchSettings(**spec["settings"]), spec["paths"]
    tc = {**training_config(settings, spec["run_dir"]), "beta": BETA}
    run = {
        "method": spec["method"],
        "model": {"name_or_path": paths["model"], "torch_dtype": "bfloat16", "attn_implementation": "sdpa"},
        "data": {"train": paths["pairs"], "max_length": settings.max_length, "eval_prompts": 0},
        "peft_config": {**LORA, "lora_dropout": 0.0},
        "training_config": tc,
    }
    meter = _Meter()
    train(build_config(run), callbacks=[meter.callback()], echo=lambda *a: print(*a, file=sys.stderr))
    return meter.result(settings.warmup)


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import peft
    from transformers import AutoModelForCausalLM

    from lorafit.kernels import cpu_multiplies_natively
    from lorafit.models.device import has_accelerator

    settings, paths = BenchSettings(**spec["settings"]), spec["paths"]
    bf16 = has_accelerator() or cpu_multiplies_natively("bfloat16")
    records = [json.loads(line) for line in Path(paths["pairs"]).read_text().splitlines()]
    common = {
        **training_config(settings, spec["run_dir"]),
        "bf16": bf16,
        "beta": BETA,
        "max_length": settings.max_length,
        "gradient_checkpointing": False,
    }
    if spec["method"] == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=dtype, attn_implementation="sdpa")
    meter = _Meter()
    trainer = Trainer(
        model=model,
        args=Config(**common),
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=bench_tokenizer(paths["model"]),
        peft_config=peft.LoraConfig(**{**LORA, "lora_dropout": 0.0}),
        callbacks=[meter.callback()],
    )
    trainer.train()
    return meter.result(settings.warmup)


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ["LORAFIT_CACHE"] = spec["paths"]["cache"]
    result = run_lorafit(spec) if spec["side"] == "lorafit" else run_trl(spec)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.update(side=spec["side"], torch_threads=torch.get_num_threads())
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run(out: Path, method: str, settings: BenchSettings, pairs: int, echo: Any = print) -> dict[str, Any]:
    """Both sides ``settings.repeats`` times, alternating; the medians and lorafit / TRL ratios."""
    out.mkdir(parents=True, exist_ok=True)
    paths = prepare_assets(out, settings)
    paths["pairs"] = write_pairs(paths, out, pairs)
    runs: dict[str, list[dict]] = {"lorafit": [], "trl": []}
    for repeat in range(settings.repeats):
        for side in ("lorafit", "trl") if repeat % 2 == 0 else ("trl", "lorafit"):
            run_dir = out / f"{side}-{method}-{repeat}"
            spec = {
                "side": side,
                "method": method,
                "settings": settings.__dict__,
                "paths": paths,
                "run_dir": str(run_dir),
                "result": str(out / f"{side}-{method}-{repeat}.json"),
            }
            spec_path = out / f"{side}-{method}-{repeat}.spec.json"
            spec_path.write_text(json.dumps(spec))
            code = "import sys; from lorafit.bench.preference import worker; sys.exit(worker(sys.argv[1]))"
            subprocess.run([sys.executable, "-c", code, str(spec_path)], check=True)
            result = json.loads(Path(spec["result"]).read_text())
            runs[side].append(result)
            losses = [round(x, 4) for x in result["losses"]]
            echo(
                f"{side} {method} run {repeat}: {result['tokens_per_s']:.0f} tokens/s, "
                f"{result['tokens_per_cpu_s']:.0f} tokens/CPU-s, peak RSS {result['peak_rss_mb']:.0f} MB, "
                f"losses {losses}"
            )
    summary = {
        side: {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in rs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
        }
        for side, rs in runs.items()
    }
    summary["ratio"] = {
        "tokens_per_s": summary["lorafit"]["tokens_per_s"] / summary["trl"]["tokens_per_s"],
        "tokens_per_cpu_s": summary["lorafit"]["tokens_per_cpu_s"] / summary["trl"]["tokens_per_cpu_s"],
        "peak_rss": summary["lorafit"]["peak_rss_mb"] / summary["trl"]["peak_rss_mb"],
    }
    (out / f"report-{method}.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    echo(json.dumps(summary, indent=2))
    return summary


def preference_settings(
    quick: bool = False,
    steps: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    pairs: int | None = None,
) -> tuple[BenchSettings, int]:
    """The settings and pair count of a preference bench: 8 steps of 4 pairs up to 512 tokens each,
    2 repeats, 200 pairs (or ``quick``: the tiny model, 3 steps of 4 pairs up to 128 tokens, 1
    repeat, 63 pairs); each option given replaces its default."""
    if quick:
        settings = BenchSettings.quick_settings()
    else:
        settings = BenchSettings(steps=8, warmup=2, repeats=2, batch_size=4, max_length=512)
    if pairs is None:
        pairs = settings.conversations - 1 if quick else 200
    for key, value in (
        ("steps", steps),
        ("warmup", warmup),
        ("repeats", repeats),
        ("max_length", max_length),
        ("batch_size", batch_size),
    ):
        if value is not None:
            setattr(settings, key, value)
    settings.conversations = pairs + 1
    return settings, pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_dpo")
    p.add_argument("--method", default="dpo", choices=["dpo", "orpo"])
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 8)")
    p.add_argument("--warmup", type=int, help="first steps left out of tokens/s (default 2)")
    p.add_argument("--repeats", type=int, help="runs of each side (default 2)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 4)")
    p.add_argument("--max-length", type=int, help="tokens per sequence (default 512)")
    p.add_argument("--pairs", type=int, help="synthetic pairs (default 200)")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps: a smoke test")
    args = p.parse_args(argv)
    settings, pairs = preference_settings(
        args.quick, args.steps, args.warmup, args.repeats, args.max_length, args.batch_size, args.pairs
    )
    run(Path(args.out), args.method, settings, pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
