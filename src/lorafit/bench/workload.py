"""The benchmark's inputs, made once under the output folder: the bench model (random weights from a
seed), its tokenizer, and a synthetic chat set tokenised by lorafit for both sides."""

from __future__ import annotations

import collections
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import torch

from lorafit.bench.settings import MODEL_SEED, BenchSettings
from lorafit.data import tokenize_conversation
from lorafit.demo import load_demo_tokenizer


def build_bench_model(sizes: dict[str, int]) -> torch.nn.Module:
    """The demo's Phi-3 configuration at ``sizes``, random weights from a fixed seed, in bf16."""
    from transformers import Phi3ForCausalLM

    from lorafit.demo import demo_config

    config = demo_config(vocab_size=sizes["vocab_size"])
    for key, value in sizes.items():
        setattr(config, key, value)
    config.initializer_range = sizes["hidden_size"] ** -0.5  # as demo_config: activations at unit scale
    # Phi-3-mini's 3.8 B parameters are drawn in bf16 (15 GB in fp32 would not fit beside the rest);
    # the small models in fp32 and rounded, as before, so their weights stay what they were.
    big = sizes["hidden_size"] * sizes["num_hidden_layers"] > 8192
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = Phi3ForCausalLM._from_config(
            config, attn_implementation="sdpa", dtype=torch.bfloat16 if big else torch.float32
        )
    return model.to(torch.bfloat16)


def synthetic_conversations(n: int, seed: int = 0, word_range: tuple[int, int] | None = None) -> list[dict]:
    """``n`` chat records: a system prompt, then one to three user/assistant turns.

    Text is drawn from the words of the demo conversations (so the demo tokenizer covers it),
    with their frequencies. Answers run from 2 to 160 words, log-uniformly: many short, some
    long, as in instruction data; with the chat template that makes 50 to 500 tokens. With
    ``word_range = (lo, hi)`` each record instead has one or two turns holding a total drawn
    uniformly from ``lo`` to ``hi`` words, most of them in the answers (long chats).
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
        if word_range is not None:
            total = rng.randint(*word_range)
            system = rng.randint(6, 40)
            turns = rng.choice([1, 2])
            messages = [{"role": "system", "content": text(system)}]
            for _ in range(turns):
                question = rng.randint(3, 40)
                answer = max(2, (total - system) // turns - question)
                messages.append({"role": "user", "content": text(question)})
                messages.append({"role": "assistant", "content": text(answer)})
            records.append({"messages": messages})
            continue
        messages = [{"role": "system", "content": text(rng.randint(6, 40))}]
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            messages.append({"role": "user", "content": text(rng.randint(3, 40))})
            answer = int(math.exp(rng.uniform(math.log(2), math.log(160))))
            messages.append({"role": "assistant", "content": text(answer)})
        records.append({"messages": messages})
    return records


def _words_for_tokens(settings: BenchSettings) -> tuple[int, int] | None:
    """The word range whose chats come to ``min_tokens``..``max_tokens`` with the chat template,
    from the demo tokenizer's tokens per word on this text (measured on a sample)."""
    if settings.min_tokens is None or settings.max_tokens is None:
        return None
    tokenizer = load_demo_tokenizer()
    sample = synthetic_conversations(8, settings.seed + 1, word_range=(400, 400))
    tokens = [
        len(tokenize_conversation(tokenizer, r["messages"], max_length=10**6)["input_ids"]) for r in sample
    ]
    per_word = sum(tokens) / (8 * 400)
    return int(settings.min_tokens / per_word) + 1, int(settings.max_tokens / per_word)


def model_dir(root: Path, settings: BenchSettings) -> Path:
    """Where the bench model lives: under ``root`` for the small ones; Phi-3-mini's 7.6 GB are
    written once under ``$LORAFIT_CACHE/bench`` and shared by every benchmark folder."""
    if settings.quick or settings.size == "small":
        return root / "model"
    from lorafit.data.build import _cache_root

    layers = settings.model_sizes["num_hidden_layers"]
    return _cache_root(None) / "bench" / f"{settings.size}-{layers}layers-seed{MODEL_SEED}"


def prepare_assets(root: Path, settings: BenchSettings) -> dict[str, str]:
    """Write the model (with the demo tokenizer, :func:`model_dir`) and the chat data under
    ``root``, once each."""
    words = _words_for_tokens(settings)
    folder = model_dir(root, settings)
    paths = {"model": str(folder), "train": str(root / "train.jsonl"), "cache": str(root / "cache")}
    model_spec = {"model": settings.model_sizes, "seed": MODEL_SEED}
    model_stamp = folder / "lorafit-bench-spec.json"
    if not (model_stamp.is_file() and json.loads(model_stamp.read_text()) == model_spec):
        build_bench_model(settings.model_sizes).save_pretrained(paths["model"])
        load_demo_tokenizer().save_pretrained(paths["model"])
        model_stamp.write_text(json.dumps(model_spec))  # last: a half-written model is rebuilt
    paths["parity_model"] = paths["model"]
    if settings.parity_layers is not None:  # a cut of the model's widths, small enough for three copies
        paths["parity_model"] = str(root / f"parity-model-{settings.parity_layers}layers")
        cut = {**settings.model_sizes, "num_hidden_layers": settings.parity_layers}
        cut_stamp = Path(paths["parity_model"]) / "lorafit-bench-spec.json"
        if not (cut_stamp.is_file() and json.loads(cut_stamp.read_text()) == {"model": cut}):
            build_bench_model(cut).save_pretrained(paths["parity_model"])
            load_demo_tokenizer().save_pretrained(paths["parity_model"])
            cut_stamp.write_text(json.dumps({"model": cut}))
    spec = {"conversations": settings.conversations, "seed": settings.seed, "words": words}
    stamp = root / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with open(paths["train"], "w", encoding="utf-8") as f:
        for record in synthetic_conversations(settings.conversations, settings.seed, words):
            f.write(json.dumps(record) + "\n")
    stamp.write_text(json.dumps(spec))
    return paths


def bench_tokenizer(model_dir: str) -> Any:
    """The saved tokenizer set up as lorafit sets it up for training (pad = unk, right padding)."""
    from transformers import AutoTokenizer

    from lorafit.data import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir), pad_token="unk")


def tokenized_examples(paths: dict[str, str], settings: BenchSettings, max_length: int | None = None) -> Any:
    """lorafit's tokenisation of the chat data (a ``TokenizedDataset``), used by both sides;
    examples longer than ``max_length`` (default: the rows') are cut."""
    from lorafit.data import build_datasets

    dataset, _, _ = build_datasets(
        bench_tokenizer(paths["model"]),
        train=paths["train"],
        max_length=max_length or settings.max_length,
        packing=False,
        cache_dir=paths["cache"],
        progress=False,
    )
    return dataset


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
