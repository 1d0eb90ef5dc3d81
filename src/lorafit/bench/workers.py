"""One training run in its own process, per side: lorafit as a user gets it, or PEFT + TRL."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lorafit.bench.settings import (
    LORA,
    LORAFIT_CONFIGS,
    TRL_CONFIGS,
    TRL_FP32_CONFIGS,
    TRL_QLORA_CONFIGS,
    BenchSettings,
)
from lorafit.bench.workload import bench_tokenizer, tokenized_examples, training_config


def _meter() -> Any:
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        """Per step: end time, CPU time and minor page faults of the process, real tokens (as the
        collator sees them) and loss."""

        def __init__(self) -> None:
            self.batch_tokens: list[int] = []
            self.step_ends: list[tuple[float, float, int]] = []  # (wall, CPU seconds, minor faults)
            self.start: tuple[float, float, int] | None = None
            self.losses: list[float] = []

        @staticmethod
        def now() -> tuple[float, float, int]:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_minflt

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            # accelerate's DataLoaderShard iterates the DataLoader it wraps
            loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
            collate = loader.collate_fn

            def counting(examples: list[dict]) -> Any:
                # a packed row or an example: its input_ids hold real tokens only, before padding
                self.batch_tokens.append(sum(len(e["input_ids"]) for e in examples))
                return collate(examples)

            loader.collate_fn = counting

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = self.now()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(self.now())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def result(self, warmup: int) -> dict[str, Any]:
            ends = [self.start, *self.step_ends]
            steps = [[b - a for a, b in zip(x, y, strict=True)] for x, y in zip(ends, ends[1:], strict=False)]
            seconds = [s[0] for s in steps]
            tokens = self.batch_tokens[: len(seconds)]
            timed_tokens = sum(tokens[warmup:])
            timed_seconds = sum(seconds[warmup:])
            return {
                "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else 0.0,
                "step_seconds": seconds,
                "step_cpu_seconds": [s[1] for s in steps],
                "step_minor_faults": [s[2] for s in steps],
                "step_tokens": tokens,
                "losses": self.losses,
            }

    return Meter()


def _peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB.

    On Linux, VmHWM: getrusage's ru_maxrss would carry over the driver's peak, since a forked
    child starts out sharing the parent's pages and Linux keeps that high-water mark across exec.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def run_lorafit(spec: dict[str, Any]) -> dict[str, Any]:
    """lorafit as a user runs it: ``lorafit.training.train`` with a run config and its defaults."""
    from lorafit.config import build_config
    from lorafit.training import train

    settings, paths = BenchSettings(**spec["settings"]), spec["paths"]
    if settings.size == "phi3-mini":  # a cut of it (--layers) trains as the 3.8 B model would
        os.environ["LORAFIT_WIDE_ABOVE"] = "0"
    run = {
        "model": {
            "name_or_path": paths["model"],
            "torch_dtype": "bfloat16",
            "attn_implementation": "sdpa",
        },
        "data": {"train": paths["train"], "max_length": settings.max_length, "eval_prompts": 0},
        "peft_config": dict(LORA),
        "training_config": training_config(settings, spec["run_dir"]),
    }
    for section, values in LORAFIT_CONFIGS[spec["config"]].items():  # the configuration's settings
        run[section] = {**run[section], **values}
    if "quantization" in run["model"] and torch.cuda.is_available():
        run["model"]["device_map"] = {"": torch.cuda.current_device()}  # bitsandbytes quantizes there
    cfg = build_config(run)
    meter = _meter()
    train(cfg, callbacks=[meter], echo=lambda *a: print(*a, file=sys.stderr))
    return meter.result(settings.warmup)


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """PEFT + TRL: ``SFTTrainer`` with a PEFT ``LoraConfig`` on lorafit's tokenised examples."""
    import datasets
    import peft
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    settings, paths = BenchSettings(**spec["settings"]), spec["paths"]
    packing, checkpointing = {**TRL_CONFIGS, **TRL_QLORA_CONFIGS, **TRL_FP32_CONFIGS}[spec["config"]]
    qlora, fp32 = spec["config"] in TRL_QLORA_CONFIGS, spec["config"] in TRL_FP32_CONFIGS
    examples = tokenized_examples(paths, settings)
    train_set = datasets.Dataset.from_dict(
        {
            "input_ids": [examples[i]["input_ids"] for i in range(len(examples))],
            "labels": [examples[i]["labels"] for i in range(len(examples))],
        }
    )
    args = SFTConfig(
        **{**training_config(settings, spec["run_dir"]), **({"bf16": False} if fp32 else {})},
        max_length=settings.max_length,
        packing=packing,
        gradient_checkpointing=checkpointing,  # TRL's default is on: set it either way
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
    )
    load: dict[str, Any] = {"dtype": torch.float32 if fp32 else torch.bfloat16, "attn_implementation": "sdpa"}
    if qlora:
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(**LORAFIT_CONFIGS["qlora"]["model"]["quantization"])
        if torch.cuda.is_available():
            load["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(paths["model"], **load)
    if qlora:  # the QLoRA recipe of PEFT's docs and the Phi-3 samples
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    meter = _meter()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        processing_class=bench_tokenizer(paths["model"]),
        peft_config=peft.LoraConfig(**LORA),
        callbacks=[meter],
    )
    trainer.train()
    return meter.result(settings.warmup)


def worker(spec_path: str) -> int:
    """Run the training the spec file describes; write its result next to it."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ["LORAFIT_CACHE"] = spec["paths"]["cache"]
    load_before = os.getloadavg()[0]
    result = run_lorafit(spec) if spec["side"] == "lorafit" else run_trl(spec)
    result.update(
        side=spec["side"],
        config=spec["config"],
        peak_rss_mb=_peak_rss_mb(),
        cuda_max_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        torch_threads=torch.get_num_threads(),
    )
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


_WORKER_MAIN = "import sys; from lorafit.bench import worker; sys.exit(worker(sys.argv[1]))"


def _run_worker(out: Path, side: str, config: str, repeat: int, paths: dict, settings: BenchSettings) -> dict:
    name = f"{side}-{config}-{repeat}"
    spec = {
        "side": side,
        "config": config,
        "paths": paths,
        "settings": dataclasses.asdict(settings),
        "run_dir": str(out / "runs" / name),
        "result": str(out / "results" / f"{name}.json"),
    }
    for folder in ("specs", "results", "logs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(spec["run_dir"], ignore_errors=True)  # a previous benchmark's run
    spec_path = out / "specs" / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    log = out / "logs" / f"{name}.log"
    with open(log, "w", encoding="utf-8") as f:
        # the worker imports the lorafit this driver runs, wherever that comes from
        search = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in search if p)}
        code = subprocess.call(
            [sys.executable, "-c", _WORKER_MAIN, str(spec_path)], stdout=f, stderr=f, env=env
        )
    if code != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"the {side} {config} run failed (exit {code}); end of {log}:\n{tail}")
    return json.loads(Path(spec["result"]).read_text())
