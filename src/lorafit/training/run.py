"""``train()``, top to bottom: config -> processes -> run folder -> tokenizer -> data -> model
-> LoRA -> Trainer -> adapter.

Each step is a named function; :func:`train` reads as the run does. Launched by torchrun or
accelerate launch, every process runs it: rank 0 picks the run folder and writes the files, the
others train their share of each batch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed

from lorafit.adapters import apply_lora, trainable_summary
from lorafit.config import RunConfig
from lorafit.constants import DEMO_MODEL
from lorafit.data import build_datasets, dataset_fingerprint, read_records, to_messages
from lorafit.errors import LorafitError
from lorafit.inference.generate import answer_prompts
from lorafit.models.attention import PACKED_ATTENTION, use_packed_attention
from lorafit.models.load import load_model, load_tokenizer
from lorafit.training import checkpoints, rundir
from lorafit.training import distributed as lf_dist
from lorafit.training.arguments import training_arguments
from lorafit.training.trainer import build_trainer, run_trainer


def add_lora(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    apply_lora(model, cfg.lora)
    model.lora_config.base_model_name_or_path = cfg.model.name_or_path
    return model


def data_sources(cfg: RunConfig) -> tuple[str, str | None]:
    """The train and eval sources; the demo model without ``data.train`` means the demo data."""
    d = cfg.data
    if d.train is not None:
        return d.train, d.eval
    if cfg.model.name_or_path == DEMO_MODEL:
        from lorafit.demo import eval_file, train_file

        no_other_eval = d.eval is None and d.eval_split is None and d.eval_fraction is None
        return str(train_file()), (str(eval_file()) if no_other_eval else d.eval)
    raise LorafitError("data.train is required: a JSONL/JSON/CSV/Parquet file, a folder, or hf:NAME[:SPLIT]")


def build_data(cfg: RunConfig, tokenizer: Any, seed: int) -> tuple[Any, Any, dict]:
    train_src, eval_src = data_sources(cfg)
    d = cfg.data
    return build_datasets(
        tokenizer,
        train=train_src,
        eval=eval_src,
        eval_split=d.eval_split,
        eval_fraction=d.eval_fraction,
        format=d.format,
        max_length=d.max_length,
        packing=d.packing,
        assistant_only_loss=d.assistant_only_loss,
        overlong=d.overlong,
        skip_bad_records=d.skip_bad_records,
        seed=seed,
        progress=lf_dist.is_main_process(),
    )


def eval_conversations(cfg: RunConfig, n: int, stats: dict[str, Any]) -> list[list[dict]]:
    """Up to ``n`` chat prompts (a conversation up to its last assistant turn) for samples."""
    train_src, eval_src = data_sources(cfg)
    fmt = stats["eval"]["format"] if eval_src and stats.get("eval") else stats["format"]
    if n <= 0 or fmt == "text":
        return []
    out = []
    for record in read_records(eval_src or train_src, bad=[]):
        try:
            messages = to_messages(record, fmt)
        except LorafitError:
            continue  # a bad record: build_data already stopped on it or reported it
        last = max(i for i, msg in enumerate(messages) if msg["role"] == "assistant")
        out.append(messages[: last + 1])
        if len(out) == n:
            break
    return out


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the kernel.

    A training step frees and re-allocates the same activations every time. glibc's defaults
    serve blocks above a (dynamic) threshold with fresh mmap()s and trim the heap top once
    enough is free, so a step can page-fault its activations in again: tens of thousands of
    faults, up to 5% of a CPU step. Fixing the mmap threshold at its maximum (32 MiB) and
    never trimming keeps the process at its peak, which it reaches every step anyway. Linux
    with glibc only; returns whether the settings took.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def train(
    cfg: RunConfig,
    *,
    resume: str | bool | None = None,
    echo: Any = print,
    callbacks: list[TrainerCallback] | None = None,
) -> Path:
    """Fine-tune with LoRA as ``cfg`` says; returns the run folder holding the adapter.

    Raises ``LorafitError`` for bad input (before training where it can be known: the
    checkpoint to resume, the output folder and its free space, the data), for a non-finite
    step and for a failed write; ``RunStopped`` when SIGINT/SIGTERM stopped the run after a
    checkpoint. ``callbacks`` are added to the Trainer after lorafit's own.

    Launched by torchrun or accelerate launch, every process runs this: rank 0 picks the run
    folder and writes the files, the others train their share of each batch.
    """
    lf_dist.join_processes(cfg)
    if not lf_dist.is_main_process():
        echo = _say_nothing
    run_dir, checkpoint = lf_dist.decide_on_main(lambda: rundir.resolve_run_dir(cfg, resume))
    if checkpoint is not None:
        checkpoints.check_checkpoint(Path(checkpoint))
    if lf_dist.is_main_process():
        rundir.check_output_dir(run_dir)
    keep_freed_memory()
    seed = int(cfg.training_config.get("seed", 42))
    tokenizer = load_tokenizer(cfg)
    with lf_dist.main_process_first():  # one process per machine tokenises; the rest read its cache
        train_set, eval_set, stats = build_data(cfg, tokenizer, seed)
    fingerprints = [dataset_fingerprint(d) for d in (train_set, eval_set) if d is not None]
    lf_dist.check_same_on_all_ranks("/".join(fingerprints), "training rows")
    echo(describe_data(stats))
    args = training_arguments(cfg, run_dir, has_eval=eval_set is not None)
    # LoRA's random A matrices from the run's seed: the same on every rank and in every launch,
    # not whatever the global RNG holds after startup (which differs with the launcher).
    set_seed(seed)
    model = add_lora(load_model(cfg, tokenizer), cfg)
    if cfg.data.packing:  # attention within each packed example (sdpa models), not over whole rows
        use_packed_attention(model)
    echo(trainable_summary(model))
    fingerprint = fingerprints[0]  # the training rows, kept in checkpoints to check resumes
    if checkpoint is not None:
        checkpoints.check_same_data(Path(checkpoint), fingerprint, echo)

    if lf_dist.is_main_process():
        rundir.check_free_space(run_dir, rundir.checkpoint_bytes(model))

    with rundir.write_errors_reported(run_dir):
        if lf_dist.is_main_process():
            rundir.write_run_files(run_dir, cfg, tokenizer, stats, fresh=checkpoint is None, echo=echo)
        prompts = eval_conversations(cfg, cfg.data.eval_prompts, stats) if lf_dist.is_main_process() else []
        before = answer_prompts(model, tokenizer, prompts) if prompts and checkpoint is None else []
        trainer = build_trainer(cfg, model, tokenizer, args, train_set, eval_set, fingerprint)
        for callback in callbacks or []:
            trainer.add_callback(callback)
        echo(f"training in {run_dir}" + (f", resuming from {checkpoint}" if checkpoint else ""))
        run_trainer(trainer, checkpoint)
        trainer.save_model(str(run_dir))  # on every rank: FSDP gathers the adapter from all of them
        if model.config._attn_implementation == PACKED_ATTENTION:
            model.set_attn_implementation("sdpa")  # the model goes back as loaded
        if lf_dist.is_main_process() and prompts:
            if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
                # The weights are spread over the processes; rank 0 alone cannot run the model.
                after = [f"(not run: the model is sharded; try lorafit chat --adapter {run_dir})"] * len(
                    prompts
                )
            else:
                after = answer_prompts(model, tokenizer, prompts)
            rundir.write_samples(
                run_dir / rundir.SAMPLES_NAME, prompts, before or ["(not run: resumed)"] * len(after), after
            )
    return run_dir


def _say_nothing(*args: Any, **kwargs: Any) -> None:
    """``echo`` on ranks other than 0: one copy of each message is enough."""


def describe_data(stats: dict[str, Any]) -> str:
    parts = [
        f"data: {stats.get('records', 0)} records ({stats.get('format')}) -> "
        f"{stats.get('examples', 0)} examples",
        f"{stats.get('tokens', 0):,} tokens ({stats.get('label_tokens', 0):,} trained)",
    ]
    if stats.get("packed_rows"):
        parts.append(
            f"{stats['packed_rows']} packed rows, {100 * stats.get('packing_efficiency', 0):.1f}% full"
        )
    if stats.get("bad_records"):
        parts.append(f"skipped {stats['bad_records']} bad records")
    dropped = stats.get("dropped_too_long", 0) + stats.get("dropped_no_assistant", 0)
    if dropped or stats.get("truncated"):
        parts.append(
            f"dropped {stats.get('dropped_too_long', 0)} too long and {stats.get('dropped_no_assistant', 0)} "
            f"without assistant tokens, truncated {stats.get('truncated', 0)}"
        )
    ev = stats.get("eval")
    if ev:
        parts.append(f"eval: {ev.get('examples', 0)} examples")
    return "; ".join(parts)
