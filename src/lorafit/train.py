"""The training run, top to bottom: config -> run folder -> tokenizer -> model -> LoRA -> data
-> Trainer -> adapter.

``transformers.Trainer`` does the loop, so schedules, gradient accumulation, evaluation,
logging, resume and accelerate (DDP, FSDP, DeepSpeed) come from the library. lorafit's
``LorafitTrainer`` changes what a checkpoint holds (the PEFT-format adapter, never the base
model) and adds the run's files: ``metrics.jsonl``, ``loss.png``, ``samples.md``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from lorafit import data as lf_data
from lorafit.adapter import load_adapter, save_adapter
from lorafit.config import DEMO_MODEL, RunConfig
from lorafit.errors import LorafitError
from lorafit.inject import apply_lora, trainable_summary
from lorafit.loss import causal_lm_loss, supports_fast_loss

RUN_CONFIG_NAME = "lorafit_run.yaml"
METRICS_NAME = "metrics.jsonl"
SAMPLES_NAME = "samples.md"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}


# --------------------------------------------------------------------------------------------
# 1. The run folder
# --------------------------------------------------------------------------------------------


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def new_run_dir(root: Path = Path("runs")) -> Path:
    """``runs/YYYYmmdd-HHMMSS`` (with ``-2``, ``-3`` ... if taken): never an old run's folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def resolve_run_dir(cfg: RunConfig, resume: str | bool | None) -> tuple[Path, str | None]:
    """The folder this run writes to and the checkpoint it resumes from (or None).

    An existing, non-empty ``output_dir`` is refused unless ``--resume`` or
    ``overwrite_output_dir`` says what to do with it.
    """
    tc = cfg.training_config
    out = tc.get("output_dir")
    if isinstance(resume, str):
        path = Path(resume)
        if not path.is_dir():
            raise LorafitError(f"--resume {resume}: no such run or checkpoint folder")
        if (path / "trainer_state.json").is_file():
            return path.parent, str(path)
        last = get_last_checkpoint(str(path))
        if last is None:
            raise LorafitError(f"--resume {resume}: the folder holds no checkpoint-N/ to resume from")
        return path, last
    if resume:
        if not out:
            raise LorafitError(
                "--resume needs the run folder: --resume runs/NAME, or set training_config.output_dir"
            )
        last = get_last_checkpoint(out) if Path(out).is_dir() else None
        if last is None:
            raise LorafitError(f"--resume: {out} holds no checkpoint-N/ to resume from")
        return Path(out), last
    if not out:
        return new_run_dir(), None
    path = Path(out)
    if path.exists() and any(path.iterdir()) and not tc.get("overwrite_output_dir"):
        raise LorafitError(
            f"output folder {path} already holds files; lorafit never writes over a run. Use --resume to "
            "continue it, pick another training_config.output_dir, or set overwrite_output_dir: true"
        )
    return path, None


# --------------------------------------------------------------------------------------------
# 2. Tokenizer and model
# --------------------------------------------------------------------------------------------


def _check_local_path(name: str, what: str) -> None:
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and Path(name).parent.exists()
    if looks_local and not Path(name).expanduser().exists():
        raise LorafitError(f"{what} folder {name} does not exist")


def load_tokenizer(cfg: RunConfig) -> Any:
    """The model's tokenizer (or ``tokenizer.name_or_path``), set up for training."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer.name_or_path or cfg.model.name_or_path
    if name == DEMO_MODEL:
        from lorafit.demo import load_demo_tokenizer

        tokenizer = load_demo_tokenizer()
    else:
        _check_local_path(name, "tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                name, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision
            )
        except (OSError, ValueError) as e:
            raise LorafitError(f"could not load the tokenizer {name}: {e}") from None
    if cfg.tokenizer.chat_template:
        tokenizer.chat_template = cfg.tokenizer.chat_template
    return lf_data.prepare_tokenizer(
        tokenizer,
        pad_token=cfg.tokenizer.pad_token,
        padding_side=cfg.tokenizer.padding_side,
        model_max_length=cfg.tokenizer.model_max_length,
    )


def stop_token_ids(tokenizer: Any) -> list[int]:
    """eos plus the chat template's end-of-turn token (``<|end|>`` for Phi-3) where it exists."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in ("<|end|>", "<|eot_id|>", "<|im_end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def load_model(cfg: RunConfig, tokenizer: Any) -> torch.nn.Module:
    """The base model in the configured dtype and attention implementation."""
    m = cfg.model
    dtype = DTYPES[m.torch_dtype]
    if m.name_or_path == DEMO_MODEL:
        from lorafit.demo import build_demo_model

        model = build_demo_model(
            dtype=torch.float32 if dtype == "auto" else dtype, attn_implementation=m.attn_implementation
        )
    else:
        from transformers import AutoModelForCausalLM

        _check_local_path(m.name_or_path, "model")
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "attn_implementation": m.attn_implementation,
            "trust_remote_code": m.trust_remote_code,
            "revision": m.revision,
        }
        if m.device_map is not None:
            kwargs["device_map"] = m.device_map
        if m.quantization:
            from lorafit.quant import bnb_config

            kwargs["quantization_config"] = bnb_config(m.quantization)
        try:
            model = AutoModelForCausalLM.from_pretrained(m.name_or_path, **kwargs)
        except (OSError, ValueError, ImportError) as e:
            raise LorafitError(f"could not load the model {m.name_or_path}: {e}") from None
    model.config.use_cache = m.use_cache
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = stop_token_ids(tokenizer)
        gen.pad_token_id = tokenizer.pad_token_id
    return model


def add_lora(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    lora_config = cfg.lora
    if m_quant := cfg.model.quantization:
        from lorafit.quant import prepare_kbit_model

        prepare_kbit_model(model, m_quant)
    apply_lora(model, lora_config)
    model.lora_config.base_model_name_or_path = cfg.model.name_or_path
    return model


# --------------------------------------------------------------------------------------------
# 3. Data
# --------------------------------------------------------------------------------------------


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
    return lf_data.build_datasets(
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
        seed=seed,
        progress=is_main_process(),
    )


def eval_conversations(cfg: RunConfig, n: int) -> list[list[dict]]:
    """Up to ``n`` chat prompts (a conversation up to its last assistant turn) for samples."""
    if n <= 0:
        return []
    train_src, eval_src = data_sources(cfg)
    source = eval_src or train_src
    records = lf_data.read_records(source)
    fmt = cfg.data.format if cfg.data.format != "auto" else lf_data.detect_format(records)
    if fmt == "text":
        return []
    out = []
    for record in records[:n]:
        messages = lf_data.to_messages(record, fmt)
        last = max(i for i, msg in enumerate(messages) if msg["role"] == "assistant")
        out.append(messages[: last + 1])
    return out


# --------------------------------------------------------------------------------------------
# 4. The Trainer and its callbacks
# --------------------------------------------------------------------------------------------


def training_arguments(cfg: RunConfig, run_dir: Path, has_eval: bool) -> TrainingArguments:
    """TrainingArguments from ``training_config`` with lorafit's defaults for keys not given."""
    tc = dict(cfg.training_config)
    tc.pop("overwrite_output_dir", None)
    tc.pop("save_safetensors", None)
    logging_dir = tc.pop("logging_dir", None)
    if "warmup_ratio" in tc:
        ratio = tc.pop("warmup_ratio")
        tc.setdefault("warmup_steps", float(ratio or 0))
    # TensorBoard events go to run_dir/tensorboard unless logging_dir says otherwise.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(logging_dir or run_dir / "tensorboard")
    tc["output_dir"] = str(run_dir)
    tc.setdefault("logging_steps", 10)
    tc.setdefault("save_strategy", "steps")
    tc.setdefault("save_steps", 0.25)
    if has_eval and "eval_strategy" not in tc and tc.get("do_eval", True) is not False:
        tc.setdefault("eval_strategy", "steps")
        tc.setdefault("eval_steps", 0.25)
    if "report_to" not in tc:
        import importlib.util

        tc["report_to"] = ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
    if not _has_accelerator():
        tc.setdefault("use_cpu", True)  # so that bf16: true (the Phi-3 sample) means CPU bf16 autocast
    tc.setdefault("disable_tqdm", True)  # lorafit's own bar shows loss, lr and tokens/s
    tc.setdefault("dataloader_num_workers", 0)
    tc["remove_unused_columns"] = False  # our rows carry only model inputs
    tc["label_names"] = ["labels"]
    if tc.get("gradient_checkpointing") and "gradient_checkpointing_kwargs" not in tc:
        tc["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    try:
        return TrainingArguments(**tc)
    except (ValueError, TypeError) as e:
        raise LorafitError(f"training_config: {e}") from None


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


class LorafitTrainer(Trainer):
    """``Trainer`` whose checkpoints hold the PEFT-format adapter instead of the base model,
    which counts real (non-pad) tokens for the tokens/s figure, and whose loss is
    :func:`lorafit.loss.causal_lm_loss` (the model's own loss, without full-vocabulary logits)
    wherever that applies."""

    def __init__(self, *args: Any, pad_token_id: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pad_token_id = pad_token_id
        self.real_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        if model.training:
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            if mask is not None:
                self.real_tokens += int(mask.sum())
            elif self.pad_token_id is not None:
                self.real_tokens += int((ids != self.pad_token_id).sum())
            else:
                self.real_tokens += ids.numel()
        if return_outputs or not self._fast_loss_applies(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        loss = causal_lm_loss(model, inputs, num_items_in_batch, unwrapped=unwrapped)
        # as Trainer.compute_loss does for a loss normalised by num_items_in_batch
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            n_gpu = self.args.n_gpu
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if n_gpu <= 1 else n_gpu)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: ANN001, ANN201
        # Evaluation without metrics needs the loss only: take it without the logits. (One
        # batch's loss over its own label tokens, as Trainer's num_items_in_batch makes it.)
        if not (prediction_loss_only and self._fast_loss_applies(inputs)):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _fast_loss_applies(self, inputs: dict) -> bool:
        # Trainer scales a loss for gradient accumulation as it would the model's own only when
        # the model takes num_items_in_batch (model_accepts_loss_kwargs); keep to that case.
        return (
            "labels" in inputs
            and self.model_accepts_loss_kwargs
            and self.label_smoother is None
            and self.compute_loss_func is None
            and supports_fast_loss(self.accelerator.unwrap_model(self.model))
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_adapter(model, output_dir)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        load_adapter(model or self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint:
            load_adapter(self.model, self.state.best_model_checkpoint)


class RunFilesCallback(TrainerCallback):
    """``metrics.jsonl`` (one line per log and eval), ``loss.png``, and a progress bar with
    loss, learning rate and tokens/s. Writes on the main process only."""

    def __init__(self, run_dir: Path, trainer: LorafitTrainer) -> None:
        self.run_dir = run_dir
        self.trainer = trainer
        self.bar: tqdm | None = None
        self.history: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.tokens0 = 0
        self.last: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.t0 = time.perf_counter()
        self.tokens0 = self.trainer.real_tokens
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    def tokens_per_s(self) -> float:
        return (self.trainer.real_tokens - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            postfix = {k: v for k, v in self.last.items()}
            postfix["tok/s"] = f"{self.tokens_per_s():.0f}"
            self.bar.set_postfix(postfix, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if "loss" in logs:
            row["tokens_per_s"] = round(self.tokens_per_s(), 1)
            row["tokens_seen"] = self.trainer.real_tokens
            self.last = {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0):.2e}"}
        if "eval_loss" in logs:
            row["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            msg = (
                f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}, "
                f"perplexity {row['eval_perplexity']:.2f}"
            )
            (self.bar.write if self.bar else print)(msg)
        self.history.append(row)
        with open(self.run_dir / METRICS_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_evaluate(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.is_world_process_zero:
            plot_loss(self.history, self.run_dir / "loss.png")

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if state.is_world_process_zero:
            plot_loss(self.history, self.run_dir / "loss.png")


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    """Train and eval loss against step."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if not train and not evals:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# 5. Samples before and after
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    messages: list[dict],
    max_new_tokens: int = 64,
    streamer: Any = None,
) -> str:
    """Greedy answer to a conversation ending with a user turn, stopping at end-of-turn."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    input_ids = ids["input_ids"].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            streamer=streamer,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def answer_prompts(model: torch.nn.Module, tokenizer: Any, conversations: list[list[dict]]) -> list[str]:
    return [generate(model, tokenizer, conv[:-1]) for conv in conversations]


def write_samples(path: Path, conversations: list[list[dict]], before: list[str], after: list[str]) -> None:
    lines = ["# Eval prompts: before and after training", ""]
    for i, (conv, b, a) in enumerate(zip(conversations, before, after, strict=True), 1):
        prompt = conv[-2]["content"] if len(conv) > 1 else ""
        lines += [
            f"## {i}. {prompt}",
            "",
            f"**reference:** {conv[-1]['content']}",
            "",
            f"**before:** {b}",
            "",
            f"**after:** {a}",
            "",
        ]
    path.write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


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
    callbacks: Sequence[TrainerCallback] = (),
) -> Path:
    """Fine-tune with LoRA as ``cfg`` says; returns the run folder holding the adapter.

    ``callbacks`` are added to the Trainer's (``lorafit bench`` times steps with one)."""
    run_dir, checkpoint = resolve_run_dir(cfg, resume)
    keep_freed_memory()
    seed = int(cfg.training_config.get("seed", 42))
    tokenizer = load_tokenizer(cfg)
    train_set, eval_set, stats = build_data(cfg, tokenizer, seed)
    echo(describe_data(stats))
    model = add_lora(load_model(cfg, tokenizer), cfg)
    echo(trainable_summary(model))
    args = training_arguments(cfg, run_dir, has_eval=eval_set is not None)

    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_CONFIG_NAME).write_text(cfg.to_yaml(), encoding="utf-8")
        tokenizer.save_pretrained(run_dir)

    prompts = eval_conversations(cfg, cfg.data.eval_prompts) if is_main_process() else []
    before = answer_prompts(model, tokenizer, prompts) if prompts and checkpoint is None else []

    with _quiet_transformers():
        trainer = LorafitTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=lf_data.collator_for(tokenizer, packing=cfg.data.packing),
            pad_token_id=tokenizer.pad_token_id,
        )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    files = RunFilesCallback(run_dir, trainer)
    trainer.add_callback(files)
    for callback in callbacks:
        trainer.add_callback(callback)
    echo(f"training in {run_dir}" + (f", resuming from {checkpoint}" if checkpoint else ""))
    trainer.train(resume_from_checkpoint=checkpoint)

    if is_main_process():
        save_adapter(model, run_dir, base_model_name_or_path=cfg.model.name_or_path)
        if prompts:
            after = answer_prompts(model, tokenizer, prompts)
            write_samples(
                run_dir / SAMPLES_NAME, prompts, before or ["(not run: resumed)"] * len(after), after
            )
    return run_dir


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
