"""``train()``, top to bottom: config -> processes -> run folder -> tokenizer -> data -> model
-> LoRA -> Trainer -> adapter.

Each step is a named function; :func:`train` reads as the run does. Launched by torchrun or
accelerate launch, every process runs it: rank 0 picks the run folder and writes the files, the
others train their share of each batch.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import TrainerCallback, set_seed

from lorafit.adapters import apply_lora, trainable_summary
from lorafit.adapters.files import load_adapter, read_adapter_config
from lorafit.config import RunConfig
from lorafit.constants import DEMO_MODEL
from lorafit.data import build_datasets, dataset_fingerprint, held_out_records
from lorafit.data.build import load_tools
from lorafit.data.formats import Conversation, to_conversation
from lorafit.errors import LorafitError
from lorafit.inference.expect import expectations, held_out_report
from lorafit.inference.metrics import eval_conversations, generation_report, up_to_last_answer
from lorafit.models.attention import PACKED_ATTENTION, use_packed_attention
from lorafit.models.device import has_accelerator
from lorafit.models.gguf import gguf_base_name, is_gguf
from lorafit.models.lean import use_lean_layers, use_wide_linears
from lorafit.models.load import absolute_paths, decide_precision, load_model, load_tokenizer, prepare_base
from lorafit.models.precision import Precision
from lorafit.training import checkpoints, rundir
from lorafit.training import distributed as lf_dist
from lorafit.training.arguments import resolve_training_config, training_arguments
from lorafit.training.memory import plan_memory, spread
from lorafit.training.plan import describe_plan, plan_steps
from lorafit.training.preference import build_preference_trainer, load_preference_data, sample_pairs
from lorafit.training.tracking import check_report_to
from lorafit.training.trainer import build_trainer, run_trainer


def add_lora(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """LoRA as ``peft_config`` says, or the adapter ``model.adapter`` names (its config and weights:
    training continues it); the adapter records the base as the user named it (a GGUF file by its
    absolute path, not by the cache folder it was loaded from)."""
    if cfg.model.adapter:
        load_adapter(model, cfg.model.adapter)
    else:
        apply_lora(model, cfg.lora)
    name = cfg.model.name_or_path
    model.lora_config.base_model_name_or_path = gguf_base_name(name) if is_gguf(name) else name
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
        skip_bad_records=d.skip_bad_records,
        seed=seed,
        progress=PartialState().is_main_process,
        **d.row_settings(),
    )


def sample_prompts(cfg: RunConfig, stats: dict[str, Any], seed: int) -> list[Conversation]:
    """Up to ``data.eval_prompts`` eval conversations (each up to its last assistant turn, with
    its tools, as training renders it) to answer before and after training: from the eval data,
    the held-out records with ``eval_fraction``, else the training data."""
    train_src, eval_src = data_sources(cfg)
    n = cfg.data.eval_prompts
    tools = load_tools(cfg.data.tools)
    if eval_src or cfg.data.eval_split:
        source = eval_src or f"hf:{str(train_src)[3:].partition(':')[0]}:{cfg.data.eval_split}"
        return eval_conversations(source, stats["eval"]["format"], n, tools)
    if cfg.data.eval_fraction:
        held_out = held_out_records(train_src, cfg.data.eval_fraction, seed)
        return [c for c in (_conversation(r, stats["format"], tools) for r in held_out) if c][:n]
    return eval_conversations(train_src, stats["format"], n, tools)


def _conversation(record: Any, fmt: str, tools: list[dict] | None) -> Conversation | None:
    try:
        conversation = to_conversation(record, fmt, tools)
    except LorafitError:
        return None  # a bad record: building the data already stopped on it or reported it
    return Conversation(up_to_last_answer(conversation.messages), conversation.tools)


def checkpoint_some_layers(model: torch.nn.Module, amount: int | float | None) -> list[int]:
    """Recompute ``amount`` decoder layers (an int) or that share of them (a float < 1) in backward.

    The chosen layers are spread evenly and keep only their input (non-reentrant checkpointing);
    the others keep their activations, so a step costs ``amount / layers`` of a forward pass
    more than none checkpointed and saves that share of the activations. Returns the indices.
    """
    if not amount:
        return []
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise LorafitError(
            f"training_config.checkpoint_layers: {type(model).__name__} has no decoder layers that "
            "transformers can checkpoint; use gradient_checkpointing instead"
        )
    count = round(amount * len(layers)) if isinstance(amount, float) and amount < 1 else int(amount)
    if not 0 <= count <= len(layers):
        raise LorafitError(
            f"training_config.checkpoint_layers: {amount} is more than the model's {len(layers)} layers"
        )
    chosen = spread(count, len(layers))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in chosen
    return chosen


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
    check_report_to(cfg.training_config.get("report_to"))  # a tracker not installed: said before loading
    lf_dist.join_processes(cfg)
    processes = PartialState()  # this process among those of the launch (one without a launcher)
    main = processes.is_main_process
    echo = echo if main else _say_nothing
    run_dir, checkpoint = choose_run_dir(cfg, resume)
    if not has_accelerator():
        keep_freed_memory()
    seed = int(cfg.training_config.get("seed", 42))
    notes = list(cfg.notes)  # settings the config or this machine changes, said once with the others
    cfg = absolute_paths(cfg)
    if cfg.model.adapter:  # the run continues that adapter: its LoRA settings are the run's
        adapter = str(Path(cfg.model.adapter).resolve())  # lorafit_run.yaml then resumes from anywhere
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, adapter=adapter),
            peft_config=read_adapter_config(adapter).to_dict(),
        )
    # in which dtypes the run computes, decided once (loading, layers, arguments and planner read it)
    precision = decide_precision(cfg.model, cfg.training_config, training=True, dora=cfg.lora.use_dora)
    with processes.local_main_process_first():  # a GGUF base is converted once per machine
        prepare_base(cfg.model, cfg.tokenizer, precision, echo)
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer, precision, echo=echo)
    preference = cfg.method != "sft"
    train_set, eval_set, stats, fingerprint = (load_preference_data if preference else load_data)(
        cfg, tokenizer, seed, echo
    )
    cfg, plan = plan_steps(cfg, stats, processes.num_processes)
    if not preference and not cfg.data.packing and stats.get("packed_rows"):  # whole examples a step
        train_set, eval_set, stats, fingerprint = load_data(cfg, tokenizer, seed, _say_nothing)
    cfg = plan_memory(cfg, precision, echo)  # layers to recompute, decided before the model loads
    # LoRA's random A matrices from the run's seed: the same on every rank and in every launch,
    # not whatever the global RNG holds after startup (which differs with the launcher).
    set_seed(seed)
    model = add_lora(load_model(cfg.model, tokenizer, precision, echo=notes.append), cfg)
    if (cfg.data.packing or preference) and precision.on_cpu:  # preference batches are always packed rows
        use_packed_attention(model)  # attention within each packed example, not over whole rows
    use_lean_layers(model)  # norms and SiLU gates rebuilt in backward, not kept
    use_wide_linears(model, precision)  # widened: the layers LoRA leaves plain widen their products too
    echo(trainable_summary(model))
    cfg = settle_training_config(cfg, model, precision, has_eval=eval_set is not None, notes=notes)
    cfg = dataclasses.replace(cfg, precision=precision.record())  # lorafit_run.yaml's precision: section
    echo(describe_settings(cfg, notes))
    echo(describe_plan(plan, processes.num_processes))
    checkpoint_some_layers(model, cfg.training_config.get("checkpoint_layers"))
    if checkpoint is not None:
        checkpoints.check_same_data(Path(checkpoint), fingerprint, echo)
    if main:
        rundir.check_free_space(run_dir, rundir.checkpoint_bytes(model))

    with rundir.write_errors_reported(run_dir):
        if main:
            rundir.write_run_files(
                run_dir, cfg, tokenizer, stats, fresh=checkpoint is None, notes=notes, echo=echo
            )
        sft_chat = not preference and stats["format"] != "text"
        prompts = sample_prompts(cfg, stats, seed) if main and sft_chat else []
        rejected = None
        if main and preference and tokenizer.chat_template:  # answers are generated in chat form
            prompts, rejected = sample_pairs(cfg, seed)
        before = None
        if prompts and checkpoint is None:
            before = generation_report(model, tokenizer, prompts, echo=lambda s: echo(f"samples before: {s}"))
        args = training_arguments(cfg.training_config, run_dir)
        trainer = (build_preference_trainer if preference else build_trainer)(
            cfg, model, tokenizer, args, train_set, eval_set, fingerprint
        )
        for callback in callbacks or []:
            trainer.add_callback(callback)
        echo(f"training in {run_dir}" + (f", resuming from {checkpoint}" if checkpoint else ""))
        run_trainer(trainer, checkpoint)
        trainer.save_model(str(run_dir))  # on every rank: FSDP gathers the adapter from all of them
        if model.config._attn_implementation == PACKED_ATTENTION:
            model.set_attn_implementation("sdpa")  # the model goes back as loaded
        if main and prompts:
            after = write_samples_after(trainer, model, tokenizer, prompts, before, run_dir, echo, rejected)
            if after is not None and not preference:
                echo_held_out(cfg, stats, prompts, before, after, echo)
    return run_dir


def choose_run_dir(cfg: RunConfig, resume: str | bool | None) -> tuple[Path, str | None]:
    """The run folder (rank 0 decides for all) and the checkpoint to resume, both checked now."""
    run_dir, checkpoint = lf_dist.decide_on_main(lambda: rundir.resolve_run_dir(cfg, resume))
    if checkpoint is not None:
        checkpoints.check_checkpoint(Path(checkpoint))
    if PartialState().is_main_process:
        rundir.check_output_dir(run_dir)
    return run_dir, checkpoint


def load_data(cfg: RunConfig, tokenizer: Any, seed: int, echo: Any) -> tuple[Any, Any, dict, str]:
    """Train and eval rows (one process per machine tokenises, the rest read its cache), their
    stats, and the fingerprint of the training rows, checked to be the same on every rank."""
    with PartialState().local_main_process_first():  # the others then read its cache
        train_set, eval_set, stats = build_data(cfg, tokenizer, seed)
    fingerprints = [dataset_fingerprint(d) for d in (train_set, eval_set) if d is not None]
    lf_dist.check_same_on_all_ranks("/".join(fingerprints), "training rows")
    echo(describe_data(stats))
    return train_set, eval_set, stats, fingerprints[0]


def settle_training_config(
    cfg: RunConfig, model: torch.nn.Module, precision: Precision, *, has_eval: bool, notes: list[str]
) -> RunConfig:
    """``cfg`` with the training settings the run applies (lorafit's defaults filled in, the
    ``precision``'s autocast flags, this machine's other substitutions made and added to
    ``notes``): what ``lorafit_run.yaml`` records."""
    n_params = sum(p.numel() for p in model.parameters())
    resolved, more = resolve_training_config(
        cfg.training_config, precision, has_eval=has_eval, n_params=n_params
    )
    notes += more
    return dataclasses.replace(cfg, training_config=resolved)


def describe_settings(cfg: RunConfig, notes: list[str]) -> str:
    """The effective settings, one line per section, then what this machine changed."""
    lora = cfg.lora
    lines = [
        f"model: {cfg.model.name_or_path} ({cfg.model.torch_dtype}, {cfg.model.attn_implementation}"
        + (", 4-bit" if cfg.model.quantization else "")
        + ")",
        f"lora: r={lora.r} alpha={lora.lora_alpha} dropout={lora.lora_dropout} targets={lora.target_modules}"
        + (" dora" if lora.use_dora else ""),
        "training: " + ", ".join(f"{k}={v}" for k, v in cfg.training_config.items()),
    ]
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)


def write_samples_after(
    trainer: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[Conversation],
    before: tuple[dict, list[dict]] | None,
    run_dir: Path,
    echo: Any = print,
    rejected: list[str | None] | None = None,
) -> tuple[dict, list[dict]] | None:
    """``samples.md``: the eval prompts answered before and after training, with their scores
    (and, for a preference method, each prompt's ``rejected`` answer beside the chosen one).
    Returns the answers after training (None where this process could not run the model)."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # The weights are spread over the processes; rank 0 alone cannot run the model.
        after = None
        note = f"not run: the model is sharded; try lorafit chat --adapter {run_dir}"
    else:
        after = generation_report(model, tokenizer, prompts, echo=lambda s: echo(f"samples after: {s}"))
        note = ""
    rundir.write_samples(run_dir / rundir.SAMPLES_NAME, prompts, before, after, note=note, rejected=rejected)
    return after


def echo_held_out(
    cfg: RunConfig,
    stats: dict[str, Any],
    prompts: list[Conversation],
    before: tuple[dict, list[dict]] | None,
    after: tuple[dict, list[dict]],
    echo: Any,
) -> None:
    """Print the held-out questions answered before and after, right or wrong, where the eval
    records say what a right answer names (``expect``: the real-model demo's do)."""
    _, eval_src = data_sources(cfg)
    if not eval_src:
        return
    expects = expectations(eval_src, stats["eval"]["format"], len(prompts))
    answers_before = [row["answer"] for row in before[1]] if before else None
    report = held_out_report(prompts, answers_before, [row["answer"] for row in after[1]], expects)
    if report:
        echo(report)


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
