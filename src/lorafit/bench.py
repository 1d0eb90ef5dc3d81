"""``lorafit bench``: lorafit against PEFT + TRL on one model, one dataset and one set of settings.

Both sides fine-tune the same *bench model*: Phi-3's architecture and vocabulary (32,064
tokens, untied head) at hidden 512, 8 layers of 8 heads, intermediate 1376, random weights from
a fixed seed, stored in bf16. The data is a synthetic chat set made here (2,000 conversations
with system prompts and answers from a few words to a few hundred), tokenised once with
Phi-3's chat template (the demo tokenizer) and assistant-only labels; TRL gets those very
``input_ids`` and ``labels``. The settings are shared: LoRA r=16, alpha 32, dropout 0.05 on
every linear layer but the head; AdamW, learning rate, cosine schedule and seed; 8 rows of at
most 512 tokens a step; bf16 autocast; the loss is the mean cross-entropy over label tokens.

:func:`run_bench` then

1. checks parity: one batch through lorafit (its layers and its loss) and through PEFT (its
   layers and the model's own loss) with the same LoRA weights: the losses must agree within
   bf16's rounding (2^-8 relative) and lorafit's LoRA gradients must be as close to an fp32
   computation of the same batch as PEFT's are;
2. measures the ceiling: the machine's bf16 matrix-product rate (on the model's own shapes)
   divided by the model's FLOPs per trained token;
3. trains each side in its own process, alternately, ``repeats`` times: lorafit as a user
   gets it (``lorafit.train.train`` with its defaults), PEFT + TRL (``SFTTrainer``) with
   packing on and off and gradient checkpointing on and off;
4. reports, per configuration, the median real (non-pad) tokens per second over the steps
   after ``warmup``, the peak resident memory of the process, and the loss at every step, with
   ratios against TRL's fastest configuration, as ``bench.json`` and ``bench.png`` in ``out``.

``--quick`` shrinks everything (a tiny model, a few steps, one TRL configuration) into a smoke
test of the whole pipeline; its figures mean nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafit.errors import LorafitError

# Sizes of the bench model (Phi-3-mini: 3072 / 32 / 32 / 8192) and of the --quick one.
BENCH_MODEL = {
    "vocab_size": 32064,
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 1376,
}
QUICK_MODEL = {
    "vocab_size": 2048,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 176,
}
MODEL_SEED = 1234
LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": "all-linear",
}
# TRL's configurations: name -> (packing, gradient checkpointing).
TRL_CONFIGS = {
    "packing": (True, False),
    "packing+checkpointing": (True, True),
    "padded": (False, False),
    "padded+checkpointing": (False, True),
}
LORAFIT_CONFIG = "defaults"  # packing, no checkpointing: what `lorafit train` does


@dataclass
class BenchSettings:
    """What both sides share, and how long the benchmark runs.

    Attributes:
        steps: optimizer steps per run.
        warmup: first steps left out of the tokens/s figure (allocator and lazy start-up).
        repeats: runs of each configuration, alternating sides.
        batch_size: rows per step.
        max_length: tokens per row (packed rows) or per example (padded).
        conversations: size of the synthetic chat set.
        learning_rate: AdamW's, under a cosine schedule, on both sides.
        seed: data order, LoRA initialisation and dropout seed.
        trl_configs: which of ``TRL_CONFIGS`` to run.
        quick: the tiny smoke-test model and sizes.
    """

    steps: int = 15
    warmup: int = 2
    repeats: int = 3
    batch_size: int = 8
    max_length: int = 512
    conversations: int = 2000
    learning_rate: float = 5e-4
    seed: int = 0
    trl_configs: list[str] = field(default_factory=lambda: list(TRL_CONFIGS))
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> BenchSettings:
        return cls(
            steps=3,
            warmup=1,
            repeats=1,
            batch_size=4,
            max_length=128,
            conversations=64,
            trl_configs=["packing"],
            quick=True,
        )

    @classmethod
    def from_options(
        cls,
        quick: bool = False,
        steps: int | None = None,
        warmup: int | None = None,
        repeats: int | None = None,
        trl: str | None = None,
    ) -> BenchSettings:
        """The defaults (or the quick ones) with the ``lorafit bench`` options applied."""
        settings = cls.quick_settings() if quick else cls()
        for key, value in (("steps", steps), ("warmup", warmup), ("repeats", repeats)):
            if value is not None:
                setattr(settings, key, value)
        if trl:
            settings.trl_configs = [c.strip() for c in trl.split(",") if c.strip()]
        return settings

    @property
    def model_sizes(self) -> dict[str, int]:
        return QUICK_MODEL if self.quick else BENCH_MODEL


# --------------------------------------------------------------------------------------------
# Assets: the bench model, its tokenizer and the synthetic chat data
# --------------------------------------------------------------------------------------------


def build_bench_model(sizes: dict[str, int]) -> torch.nn.Module:
    """The demo's Phi-3 configuration at ``sizes``, random weights from a fixed seed, in bf16."""
    from transformers import Phi3ForCausalLM

    from lorafit.demo import demo_config

    config = demo_config(vocab_size=sizes["vocab_size"])
    for key, value in sizes.items():
        setattr(config, key, value)
    config.initializer_range = sizes["hidden_size"] ** -0.5  # as demo_config: activations at unit scale
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = Phi3ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.to(torch.bfloat16)


def synthetic_conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat records: a system prompt, then one to three user/assistant turns.

    Text is drawn from the words of the demo conversations (so the demo tokenizer covers it),
    with their frequencies. Answers run from 2 to 160 words, log-uniformly: many short, some
    long, as in instruction data; with the chat template that makes 50 to 500 tokens.
    """
    from lorafit.demo import train_file

    counts: collections.Counter[str] = collections.Counter()
    for line in train_file().read_text(encoding="utf-8").splitlines():
        for message in json.loads(line)["messages"]:
            counts.update(re.findall(r"[A-Za-z]+", message["content"]))
    words = sorted(counts)
    weights = [counts[w] for w in words]
    rng = random.Random(seed)

    def text(n_words: int) -> str:
        sentences = []
        while n_words > 0:
            k = min(n_words, rng.randint(5, 18))
            chosen = rng.choices(words, weights, k=k)
            sentences.append(" ".join([chosen[0].capitalize(), *chosen[1:]]) + rng.choice(".?!"))
            n_words -= k
        return " ".join(sentences)

    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": text(rng.randint(6, 40))}]
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            messages.append({"role": "user", "content": text(rng.randint(3, 40))})
            answer = int(math.exp(rng.uniform(math.log(2), math.log(160))))
            messages.append({"role": "assistant", "content": text(answer)})
        records.append({"messages": messages})
    return records


def prepare_assets(root: Path, settings: BenchSettings) -> dict[str, str]:
    """Write the model (with the demo tokenizer) and the chat data under ``root``, once."""
    from lorafit.demo import load_demo_tokenizer

    spec = {"model": settings.model_sizes, "seed": MODEL_SEED, "conversations": settings.conversations}
    paths = {"model": str(root / "model"), "train": str(root / "train.jsonl"), "cache": str(root / "cache")}
    stamp = root / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return paths
    root.mkdir(parents=True, exist_ok=True)
    build_bench_model(settings.model_sizes).save_pretrained(paths["model"])
    load_demo_tokenizer().save_pretrained(paths["model"])
    with open(paths["train"], "w", encoding="utf-8") as f:
        for record in synthetic_conversations(settings.conversations, settings.seed):
            f.write(json.dumps(record) + "\n")
    stamp.write_text(json.dumps(spec))
    return paths


def bench_tokenizer(model_dir: str) -> Any:
    """The saved tokenizer set up as lorafit sets it up for training (pad = unk, right padding)."""
    from transformers import AutoTokenizer

    from lorafit.data import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir), pad_token="unk")


def tokenized_examples(paths: dict[str, str], settings: BenchSettings) -> Any:
    """lorafit's tokenisation of the chat data (a ``TokenizedDataset``), used by both sides."""
    from lorafit.data import build_datasets

    dataset, _, _ = build_datasets(
        bench_tokenizer(paths["model"]),
        train=paths["train"],
        max_length=settings.max_length,
        packing=False,
        cache_dir=paths["cache"],
        progress=False,
    )
    return dataset


# --------------------------------------------------------------------------------------------
# One training run (in a worker process)
# --------------------------------------------------------------------------------------------


def training_config(settings: BenchSettings, output_dir: str) -> dict[str, Any]:
    """TrainingArguments keys both sides use."""
    return {
        "output_dir": output_dir,
        "max_steps": settings.steps,
        "per_device_train_batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 1,
        "optim": "adamw_torch",
        "weight_decay": 0.0,
        "seed": settings.seed,
        "bf16": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
    }


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

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):  # noqa: ANN001, ANN201
            # accelerate's DataLoaderShard iterates the DataLoader it wraps
            loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
            collate = loader.collate_fn

            def counting(examples: list[dict]) -> Any:
                # a packed row or an example: its input_ids hold real tokens only, before padding
                self.batch_tokens.append(sum(len(e["input_ids"]) for e in examples))
                return collate(examples)

            loader.collate_fn = counting

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if self.start is None:
                self.start = self.now()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.step_ends.append(self.now())

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
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
    """lorafit as a user runs it: ``lorafit.train.train`` with a run config and its defaults."""
    from lorafit.config import build_config
    from lorafit.train import train

    settings, paths = BenchSettings(**spec["settings"]), spec["paths"]
    cfg = build_config(
        {
            "model": {
                "name_or_path": paths["model"],
                "torch_dtype": "bfloat16",
                "attn_implementation": "sdpa",
            },
            "data": {"train": paths["train"], "max_length": settings.max_length, "eval_prompts": 0},
            "peft_config": dict(LORA),
            "training_config": training_config(settings, spec["run_dir"]),
        }
    )
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
    packing, checkpointing = TRL_CONFIGS[spec["config"]]
    examples = tokenized_examples(paths, settings)
    train_set = datasets.Dataset.from_dict(
        {
            "input_ids": [examples[i]["input_ids"] for i in range(len(examples))],
            "labels": [examples[i]["labels"] for i in range(len(examples))],
        }
    )
    args = SFTConfig(
        **training_config(settings, spec["run_dir"]),
        max_length=settings.max_length,
        packing=packing,
        gradient_checkpointing=checkpointing,  # TRL's default is on: set it either way
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
    )
    model = AutoModelForCausalLM.from_pretrained(
        paths["model"], dtype=torch.bfloat16, attn_implementation="sdpa"
    )
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
        load_before=load_before,
        load_after=os.getloadavg()[0],
        torch_threads=torch.get_num_threads(),
    )
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------
# Parity: the same batch through both sides
# --------------------------------------------------------------------------------------------


def parity_check(paths: dict[str, str], settings: BenchSettings) -> dict[str, Any]:
    """Loss and LoRA gradients of one packed batch: lorafit vs PEFT vs an fp32 reference.

    All three start from the same bf16 base weights and the same LoRA weights (``B`` random,
    not zero, so every gradient is non-trivial); dropout is off so the batch is deterministic.
    lorafit runs its layers, its packed attention and :func:`lorafit.loss.causal_lm_loss`
    under bf16 autocast (what its Trainer does); PEFT runs its layers, sdpa and the model's own
    loss under bf16 autocast (what TRL's Trainer does); the reference is PEFT's computation in
    fp32 without autocast. The check passes when the two losses differ by at most bf16's unit
    roundoff (2^-8) relative and lorafit's largest relative LoRA-gradient error against the
    reference is at most 1.5 times PEFT's. (The two attention paths round independently, so
    the one-number loss errors scatter either way by a factor of 2 or 3, and gradient errors,
    carried back through every layer, by about a quarter; lorafit.attention alone is at least as
    accurate as sdpa: tests/test_attention.py.)
    """
    import peft
    from transformers import AutoModelForCausalLM

    from lorafit.attention import use_packed_attention
    from lorafit.data import PackedCollator, pack
    from lorafit.inject import LoraConfig, apply_lora
    from lorafit.loss import causal_lm_loss

    examples = tokenized_examples(paths, settings)
    rows = pack(examples.lengths.tolist(), settings.max_length)[: settings.batch_size]
    tokenizer = bench_tokenizer(paths["model"])
    # lorafit trains packed rows with its per-example attention (lorafit.attention), which reads
    # the example boundaries; PEFT's model gets the same rows without them and runs sdpa.
    bounded = PackedCollator(tokenizer.pad_token_id, example_boundaries=True)(
        [[examples[j] for j in row] for row in rows]
    )
    batch = {k: v for k, v in bounded.items() if not k.startswith("cu_seq_lens")}
    config = {**LORA, "lora_dropout": 0.0}

    def load(dtype: torch.dtype) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.bfloat16)
        return model.to(dtype).train()

    ours = apply_lora(load(torch.bfloat16), LoraConfig.from_dict(config))
    if not use_packed_attention(ours):
        raise LorafitError("the bench model did not take lorafit's packed attention")
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        for module in ours.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.02)
    lora_weights = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}

    def peft_model(dtype: torch.dtype) -> torch.nn.Module:
        model = peft.get_peft_model(load(dtype), peft.LoraConfig(**config))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(lora_weights[_lorafit_name(name)])
        return model

    def run(model: torch.nn.Module, ours_loss: bool, autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = causal_lm_loss(model, bounded) if ours_loss else model(**batch, use_cache=False).loss
        loss.backward()
        grads = {_lorafit_name(n): p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads

    results = {
        "lorafit": run(ours, True, True),
        "peft": run(peft_model(torch.bfloat16), False, True),
        "fp32 reference": run(peft_model(torch.float32), False, False),
    }

    def distance(a: str, b: str) -> dict[str, float]:
        (la, ga), (lb, gb) = results[a], results[b]
        rel = [float((ga[k] - gb[k]).norm() / gb[k].norm().clamp_min(1e-30)) for k in gb]
        return {"loss_abs": abs(la - lb), "grad_rel_max": max(rel), "grad_rel_median": statistics.median(rel)}

    report = {
        "tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "loss": {name: value[0] for name, value in results.items()},
        "lorafit_vs_peft": distance("lorafit", "peft"),
        "lorafit_vs_fp32": distance("lorafit", "fp32 reference"),
        "peft_vs_fp32": distance("peft", "fp32 reference"),
    }
    report["passed"] = (
        report["lorafit_vs_peft"]["loss_abs"] <= 2**-8 * abs(report["loss"]["peft"])
        and report["lorafit_vs_fp32"]["grad_rel_max"] <= 1.5 * report["peft_vs_fp32"]["grad_rel_max"]
    )
    return report


def _lorafit_name(name: str) -> str:
    """lorafit's name of a PEFT LoRA parameter (``base_model.model.X.lora_A.default.weight``)."""
    return name.removeprefix("base_model.model.").replace(".default.weight", "")


# --------------------------------------------------------------------------------------------
# The ceiling: matrix-product rate / FLOPs per token
# --------------------------------------------------------------------------------------------


def flops_per_token(sizes: dict[str, int], lora_r: int, mean_context: float) -> float:
    """Forward + backward FLOPs per token of LoRA training, every token through the head.

    A frozen linear layer (in, out) costs ``2 in out`` forward and ``2 in out`` backward (the
    input gradient; no weight gradient). LoRA on it adds ``2 r (in + out)`` forward and twice
    that backward. Attention over ``c`` earlier tokens costs ``4 c hidden`` forward (scores and
    weighted sum) and twice that backward, per layer.
    """
    h, i, n = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"]
    kv = h * sizes["num_key_value_heads"] // sizes["num_attention_heads"]
    layer = [(h, h + 2 * kv), (h, h), (h, 2 * i), (i, h)]  # qkv, o, gate_up, down
    frozen = n * sum(a * b for a, b in layer) + h * sizes["vocab_size"]
    lora = n * sum(lora_r * (a + b) for a, b in layer)
    return 4 * frozen + 6 * lora + 12 * n * h * mean_context


def matmul_rate(sizes: dict[str, int], tokens: int, repeats: int = 5) -> float:
    """bf16 FLOP/s of the model's forward and input-gradient products at ``tokens`` rows."""
    h, i = sizes["hidden_size"], sizes["intermediate_size"]
    shapes = [(h, 3 * h), (h, h), (h, 2 * i), (i, h), (h, min(sizes["vocab_size"], 8192))]
    shapes += [(b, a) for a, b in shapes]  # backward: grad (N, out) @ W (out, in)
    flops, seconds = 0.0, 0.0
    for k, m in shapes:
        x = torch.randn(tokens, k, dtype=torch.bfloat16)
        w = torch.randn(m, k, dtype=torch.bfloat16)
        x @ w.t()  # warm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ w.t()
            times.append(time.perf_counter() - start)
        flops += 2 * tokens * k * m
        seconds += statistics.median(times)
    return flops / seconds


def ceiling(paths: dict[str, str], settings: BenchSettings) -> dict[str, float]:
    examples = tokenized_examples(paths, settings)
    lengths = examples.lengths.astype(float)
    mean_context = float((lengths * (lengths + 1) / 2).sum() / lengths.sum())  # causal, per example
    per_token = flops_per_token(settings.model_sizes, LORA["r"], mean_context)
    rate = matmul_rate(settings.model_sizes, settings.batch_size * settings.max_length)
    return {
        "matmul_flops_per_s": rate,
        "flops_per_token": per_token,
        "mean_context": mean_context,
        "tokens_per_s": rate / per_token,
        "label_token_share": float((examples.labels != -100).sum() / len(examples.labels)),
    }


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


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


def summarise(runs: list[dict], settings: BenchSettings) -> dict[str, Any]:
    """Medians per configuration and ratios against TRL's fastest and leanest configurations."""
    by_config: dict[str, list[dict]] = collections.defaultdict(list)
    for run in runs:
        by_config[f"{run['side']}:{run['config']}"].append(run)
    table = {}
    for key, group in by_config.items():
        steps = min(len(r["losses"]) for r in group)
        table[key] = {
            "side": group[0]["side"],
            "config": group[0]["config"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in group),
            "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in group],
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in group),
            "peak_rss_mb_runs": [round(r["peak_rss_mb"]) for r in group],
            "real_tokens_per_step": statistics.mean(t for r in group for t in r["step_tokens"]),
            # after warm-up: CPU seconds (all threads) and minor page faults of one step
            "cpu_s_per_step": statistics.median(
                x for r in group for x in r.get("step_cpu_seconds", [])[settings.warmup :]
            ),
            "faults_per_step": statistics.median(
                x for r in group for x in r.get("step_minor_faults", [])[settings.warmup :]
            ),
            "loss": [statistics.median(r["losses"][s] for r in group) for s in range(steps)],
        }
    ours = table[f"lorafit:{LORAFIT_CONFIG}"]
    trl = [row for row in table.values() if row["side"] == "trl"]
    fastest = max(trl, key=lambda row: row["tokens_per_s"])
    leanest = min(trl, key=lambda row: row["peak_rss_mb"])
    return {
        "configs": table,
        "fastest_trl": fastest["config"],
        "leanest_trl": leanest["config"],
        "speedup_vs_fastest_trl": ours["tokens_per_s"] / fastest["tokens_per_s"],
        "memory_vs_fastest_trl": ours["peak_rss_mb"] / fastest["peak_rss_mb"],
        "speedup_vs_leanest_trl": ours["tokens_per_s"] / leanest["tokens_per_s"],
        "memory_vs_leanest_trl": ours["peak_rss_mb"] / leanest["peak_rss_mb"],
        "loss_gap_vs_fastest_trl": _loss_gap(ours, fastest),
        # every TRL configuration: (tokens/s ratio, peak memory ratio, mean |loss gap| per step)
        "versus": {
            row["config"]: {
                "speedup": ours["tokens_per_s"] / row["tokens_per_s"],
                "memory": ours["peak_rss_mb"] / row["peak_rss_mb"],
                "loss_gap": _loss_gap(ours, row),
            }
            for row in trl
        },
    }


def _loss_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Mean absolute difference of two median loss curves, step by step."""
    return statistics.mean(abs(x - y) for x, y in zip(a["loss"], b["loss"], strict=False))


def format_report(report: dict[str, Any]) -> str:
    s, c, p = report["summary"], report["ceiling"], report["parity"]
    lines = [
        f"lorafit bench: {report['model']}; {report['settings_line']}",
        f"machine: {report['machine']}",
        "",
        f"{'side':8} {'configuration':22} {'tokens/s':>8} {'runs':>18} {'peak RSS MB':>11} "
        f"{'real tok/step':>13} {'CPU s/step':>10} {'faults/step':>11} {'loss first->last':>17}",
    ]
    for row in s["configs"].values():
        runs = ", ".join(f"{x:.0f}" for x in row["tokens_per_s_runs"])
        lines.append(
            f"{row['side']:8} {row['config']:22} {row['tokens_per_s']:8.0f} {runs:>18} "
            f"{row['peak_rss_mb']:11.0f} {row['real_tokens_per_step']:13.0f} {row['cpu_s_per_step']:10.1f} "
            f"{row['faults_per_step']:11.0f} {row['loss'][0]:8.3f}->{row['loss'][-1]:.3f}"
        )
    lines += [
        "",
        f"lorafit vs PEFT+TRL's fastest ({s['fastest_trl']}): {s['speedup_vs_fastest_trl']:.2f}x tokens/s, "
        f"{s['memory_vs_fastest_trl']:.2f}x peak memory; mean |loss gap| per step "
        f"{s['loss_gap_vs_fastest_trl']:.3f}",
        f"lorafit vs PEFT+TRL's leanest ({s['leanest_trl']}): {s['speedup_vs_leanest_trl']:.2f}x tokens/s, "
        f"{s['memory_vs_leanest_trl']:.2f}x peak memory",
    ]
    for config, v in s.get("versus", {}).items():
        lines.append(
            f"  vs {config}: {v['speedup']:.2f}x tokens/s, {v['memory']:.2f}x peak memory, "
            f"mean |loss gap| per step {v['loss_gap']:.3f}"
        )
    lines += [
        "",
        f"ceiling: bf16 matmul {c['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s / "
        f"{c['flops_per_token'] / 1e6:.0f} MFLOP per trained token = {c['tokens_per_s']:.0f} tokens/s; "
        "lorafit reaches "
        f"{100 * s['configs']['lorafit:' + LORAFIT_CONFIG]['tokens_per_s'] / c['tokens_per_s']:.0f}% of it "
        f"(it skips the head for the {100 * (1 - c['label_token_share']):.0f}% of tokens without a label)",
        f"parity on one batch of {p['tokens']} label tokens: loss lorafit {p['loss']['lorafit']:.5f}, "
        f"PEFT {p['loss']['peft']:.5f}, fp32 {p['loss']['fp32 reference']:.5f}; LoRA gradients, max relative "
        f"difference: lorafit-PEFT {p['lorafit_vs_peft']['grad_rel_max']:.4f}, lorafit-fp32 "
        f"{p['lorafit_vs_fp32']['grad_rel_max']:.4f}, PEFT-fp32 {p['peft_vs_fp32']['grad_rel_max']:.4f}: "
        + ("PASSED" if p["passed"] else "FAILED"),
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(report["summary"]["configs"].values())
    labels = [f"{r['side']}\n{r['config']}" for r in rows]
    colors = ["tab:green" if r["side"] == "lorafit" else "tab:gray" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=100)
    axes[0].bar(labels, [r["tokens_per_s"] for r in rows], color=colors)
    for x, r in enumerate(rows):
        axes[0].plot([x] * len(r["tokens_per_s_runs"]), r["tokens_per_s_runs"], "k.", ms=4)
    axes[0].axhline(report["ceiling"]["tokens_per_s"], color="tab:red", ls="--", lw=1, label="ceiling")
    axes[0].set_title("real tokens / s (median, dots: runs)")
    axes[0].legend()
    axes[1].bar(labels, [r["peak_rss_mb"] for r in rows], color=colors)
    axes[1].set_title("peak resident memory (MB)")
    for r in rows:
        axes[2].plot(range(1, len(r["loss"]) + 1), r["loss"], label=f"{r['side']} {r['config']}")
    axes[2].set_title("training loss (median over runs)")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_bench(out: Path, settings: BenchSettings, echo: Any = print) -> dict[str, Any]:
    """The whole benchmark; writes ``bench.json``, ``bench.png`` and ``bench.txt`` to ``out``."""
    unknown = [c for c in settings.trl_configs if c not in TRL_CONFIGS]
    if unknown:
        raise LorafitError(
            f"--trl: unknown configuration {unknown[0]!r}; expected any of {', '.join(TRL_CONFIGS)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    echo(f"preparing the bench model and data in {out / 'assets'}")
    paths = prepare_assets(out / "assets", settings)
    echo("parity check: one batch through lorafit, PEFT and an fp32 reference")
    parity = parity_check(paths, settings)
    echo("measuring the bf16 matmul rate")
    roof = ceiling(paths, settings)
    order = [("lorafit", LORAFIT_CONFIG)] + [("trl", c) for c in settings.trl_configs]
    runs = []
    for repeat in range(settings.repeats):
        for side, config in order if repeat % 2 == 0 else order[::-1]:
            echo(f"run {repeat + 1}/{settings.repeats}: {side} {config} (load {os.getloadavg()[0]:.1f})")
            run = _run_worker(out, side, config, repeat, paths, settings)
            echo(f"  {run['tokens_per_s']:.0f} tokens/s, peak RSS {run['peak_rss_mb']:.0f} MB")
            runs.append(run)
    sizes = settings.model_sizes
    report = {
        "model": (
            f"Phi-3 architecture, vocab {sizes['vocab_size']}, hidden {sizes['hidden_size']}, "
            f"{sizes['num_hidden_layers']} layers x {sizes['num_attention_heads']} heads, intermediate "
            f"{sizes['intermediate_size']}, bf16"
        ),
        "settings_line": (
            f"{settings.batch_size} rows x {settings.max_length} tokens, {settings.steps} steps "
            f"({settings.warmup} warm-up) x {settings.repeats} runs per configuration; LoRA r={LORA['r']} "
            f"alpha={LORA['lora_alpha']} dropout={LORA['lora_dropout']} all-linear"
        ),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "settings": dataclasses.asdict(settings),
        "parity": parity,
        "ceiling": roof,
        "summary": summarise(runs, settings),
        "runs": runs,
    }
    text = format_report(report)
    report["text"] = text
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.txt").write_text(text + "\n")
    plot(report, out / "bench.png")
    echo("")
    echo(text)
    echo(f"\nwritten: {out / 'bench.json'}, {out / 'bench.png'}, {out / 'bench.txt'}")
    return report
