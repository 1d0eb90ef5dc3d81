"""The training run, top to bottom: config -> run folder -> tokenizer -> model -> LoRA -> data
-> Trainer -> adapter.

``transformers.Trainer`` does the loop, so schedules, gradient accumulation, evaluation,
logging, resume and accelerate (DDP, FSDP, DeepSpeed) come from the library. lorafit's
``LorafitTrainer`` changes what a checkpoint holds (the PEFT-format adapter, never the base
model), writes each checkpoint atomically, and adds the run's files: ``metrics.jsonl``,
``loss.png``, ``samples.md``, ``skipped_records.jsonl``. ``lorafit.safety`` holds the pieces that
keep work safe (checks before training, signals, non-finite steps); ``train`` wires them in.

Resuming is exact: a run killed at any moment and resumed from its last checkpoint ends with the
same adapter, bit for bit on CPU, as one never interrupted. The Trainer restores the optimizer,
scheduler, every RNG and the data position; the packing is a pure function of the data; LoRA's
initial weights come from the run's seed; and the run's own counters and metrics rows are
restored from the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lorafit import data as lf_data
from lorafit import distributed as lf_dist
from lorafit import safety
from lorafit.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from lorafit.attention import PACKED_ATTENTION, use_packed_attention
from lorafit.config import DEMO_MODEL, RunConfig
from lorafit.distributed import is_main_process
from lorafit.errors import LorafitError, RunStopped
from lorafit.inject import apply_lora, trainable_summary
from lorafit.loss import causal_lm_loss, supports_fast_loss

RUN_CONFIG_NAME = "lorafit_run.yaml"
METRICS_NAME = "metrics.jsonl"
SAMPLES_NAME = "samples.md"
SKIPPED_NAME = "skipped_records.jsonl"
# What a run writes at the top of its folder: removed when overwrite_output_dir reuses one.
RUN_FILES = (METRICS_NAME, "loss.png", SAMPLES_NAME, SKIPPED_NAME, CONFIG_NAME, WEIGHTS_NAME, "tensorboard")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}


# --------------------------------------------------------------------------------------------
# 1. The run folder
# --------------------------------------------------------------------------------------------


def join_processes(cfg: RunConfig) -> None:
    """Under ``torchrun`` / ``accelerate launch``: join the process group before anything is
    decided, so that rank 0 can choose the run folder for all. Refuses FSDP where accelerate
    would silently ignore it (CPU)."""
    tc = cfg.training_config
    cpu = bool(tc.get("use_cpu")) or not _has_accelerator()
    if tc.get("fsdp") and cpu:
        refuse_cpu_fsdp()
    if tc.get("fsdp") and lf_dist.world_size() == 1:
        raise LorafitError(
            "training_config.fsdp shards the model over the processes of a launch, and this is a single "
            "process (accelerate would train unsharded): torchrun --nproc_per_node N -m lorafit train ..."
        )
    if ds := tc.get("deepspeed"):
        import importlib.util

        if isinstance(ds, str) and not Path(ds).is_file():
            raise LorafitError(f"training_config.deepspeed: the DeepSpeed config {ds} does not exist")
        if importlib.util.find_spec("deepspeed") is None:
            raise LorafitError(
                "training_config.deepspeed needs the deepspeed package (CUDA machines): pip install deepspeed"
            )
    if lf_dist.world_size() > 1 and isinstance(cfg.model.device_map, str):
        raise LorafitError(
            f"model.device_map: {cfg.model.device_map!r} spreads one model over every device, but under "
            f"torchrun each of the {lf_dist.world_size()} processes loads its own copy for its own device. "
            "Leave device_map null (DDP), or add --fsdp to shard the model over the processes."
        )
    lf_dist.init_distributed(
        cpu=cpu,
        backend=tc.get("ddp_backend"),
        timeout_s=int(tc.get("ddp_timeout") or 1800),
        deepspeed=bool(tc.get("deepspeed")),
    )


def refuse_cpu_fsdp() -> None:
    """FSDP asked for on CPU: refused, because accelerate would quietly run DDP instead."""
    import accelerate

    raise LorafitError(
        f"training_config.fsdp needs GPUs (or other accelerators): accelerate {accelerate.__version__} "
        "turns FSDP on only for CUDA/XPU/NPU/HPU-type devices, and on CPU it would silently run "
        "plain DDP with the whole model on every process. On CPU, drop --fsdp and launch with "
        "torchrun (DDP); to shard the model, run on GPUs."
    )


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
    ``overwrite_output_dir`` says what to do with it. A run folder resumes from its newest
    complete checkpoint; a ``checkpoint-N`` folder named directly must be complete.
    """
    tc = cfg.training_config
    out = tc.get("output_dir")
    if isinstance(resume, str):
        path = Path(resume)
        if not path.is_dir():
            raise LorafitError(f"--resume {resume}: no such run or checkpoint folder")
        if safety.checkpoint_step(path) is not None or (path / safety.TRAINER_STATE_NAME).exists():
            return path.parent, str(path)  # train() checks that it is complete and safe
        last = safety.last_checkpoint(path)
        if last is None:
            raise LorafitError(f"--resume {resume}: the folder holds no complete checkpoint-N/ to resume")
        return path, str(last)
    if resume:
        if not out:
            raise LorafitError(
                "--resume needs the run folder: --resume runs/NAME, or set training_config.output_dir"
            )
        last = safety.last_checkpoint(Path(out))
        if last is None:
            raise LorafitError(f"--resume: {out} holds no complete checkpoint-N/ to resume from")
        return Path(out), str(last)
    if not out:
        return new_run_dir(), None
    path = Path(out)
    if path.exists() and any(path.iterdir()) and not tc.get("overwrite_output_dir"):
        raise LorafitError(
            f"output folder {path} already holds files; lorafit never writes over a run. Use --resume to "
            "continue it, pick another training_config.output_dir, or set overwrite_output_dir: true"
        )
    return path, None


def prepare_run_dir(run_dir: Path, *, fresh: bool, echo: Any = print) -> None:
    """Create the run folder and clear what a kill during a save left there. A fresh run in a
    used folder (``overwrite_output_dir``) first removes the old run's checkpoints and files, so
    they are never mistaken for its own (by ``--resume``, by rotation, in ``metrics.jsonl``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    safety.remove_partial_checkpoints(run_dir)
    if not fresh:
        return
    old = [p for p in run_dir.iterdir() if p.name in RUN_FILES or safety.checkpoint_step(p) is not None]
    for path in old:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if old:
        echo(f"overwrite_output_dir: removed the previous run's {', '.join(sorted(p.name for p in old))}")


def check_same_data(checkpoint: Path, fingerprint: str, echo: Any = print) -> None:
    """Warn when the training rows differ from those the checkpoint was trained on."""
    own = checkpoint / safety.LORAFIT_STATE_NAME
    if not own.is_file():
        return
    saved = json.loads(own.read_text(encoding="utf-8")).get("train_data")
    if saved and saved != fingerprint:
        echo(
            f"warning: the training data differ from those {checkpoint} was trained on (an edited file, "
            "or other data settings); the resumed run continues, but not on the batches the interrupted "
            "run would have seen."
        )


# --------------------------------------------------------------------------------------------
# 2. Tokenizer and model
# --------------------------------------------------------------------------------------------


def _check_local_path(name: str, what: str) -> None:
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and Path(name).parent.exists()
    if looks_local and not Path(name).expanduser().exists():
        raise LorafitError(f"{what} folder {name} does not exist")


def _load_error(what: str, name: str, error: Exception) -> LorafitError:
    if "trust_remote_code" in str(error):
        return LorafitError(
            f"could not load the {what} {name}: it ships its own Python code (auto_map in its config), "
            "which lorafit never runs unless you set model.trust_remote_code: true; do that only for a "
            "source you trust, or use a model that transformers supports natively."
        )
    return LorafitError(f"could not load the {what} {name}: {' '.join(str(error).split())}")


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
            raise _load_error("tokenizer", name, e) from None
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
        if m.quantization:  # built in memory, so quantized here (hub models quantize while loading)
            from lorafit.quant import quantize_model

            quantize_model(model, m.quantization)
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
            raise _load_error("model", m.name_or_path, e) from None
    if m.quantization:
        from lorafit.quant import prepare_kbit_model

        prepare_kbit_model(model, m.quantization)
    model.config.use_cache = m.use_cache
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = stop_token_ids(tokenizer)
        gen.pad_token_id = tokenizer.pad_token_id
    return model


def add_lora(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    apply_lora(model, cfg.lora)
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
        skip_bad_records=d.skip_bad_records,
        seed=seed,
        progress=is_main_process(),
    )


def write_skipped_records(run_dir: Path, stats: dict[str, Any]) -> tuple[int, Path]:
    """``skipped_records.jsonl``: one line per record not trained on (split, where, reason)."""
    rows = [{"split": "train", **row} for row in stats["skipped"]]
    if stats.get("eval"):
        rows += [{"split": "eval", **row} for row in stats["eval"]["skipped"]]
    path = run_dir / SKIPPED_NAME
    safety.write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return len(rows), path


def write_run_files(
    run_dir: Path, cfg: RunConfig, tokenizer: Any, stats: dict[str, Any], *, fresh: bool, echo: Any = print
) -> None:
    """The run folder with the resolved config, the tokenizer and (``skip_bad_records``) the report."""
    prepare_run_dir(run_dir, fresh=fresh, echo=echo)
    (run_dir / RUN_CONFIG_NAME).write_text(cfg.to_yaml(), encoding="utf-8")
    tokenizer.save_pretrained(run_dir)
    if cfg.data.skip_bad_records:
        n, path = write_skipped_records(run_dir, stats)
        echo(f"skipped {n} records; each with its reason is in {path}" if n else "no record skipped")


def eval_conversations(cfg: RunConfig, n: int, stats: dict[str, Any]) -> list[list[dict]]:
    """Up to ``n`` chat prompts (a conversation up to its last assistant turn) for samples."""
    train_src, eval_src = data_sources(cfg)
    fmt = stats["eval"]["format"] if eval_src and stats.get("eval") else stats["format"]
    if n <= 0 or fmt == "text":
        return []
    out = []
    for record in lf_data.read_records(eval_src or train_src, bad=[]):
        try:
            messages = lf_data.to_messages(record, fmt)
        except LorafitError:
            continue  # a bad record: build_data already stopped on it or reported it
        last = max(i for i, msg in enumerate(messages) if msg["role"] == "assistant")
        out.append(messages[: last + 1])
        if len(out) == n:
            break
    return out


# --------------------------------------------------------------------------------------------
# 4. The Trainer and its callbacks
# --------------------------------------------------------------------------------------------


def training_arguments(cfg: RunConfig, run_dir: Path, has_eval: bool) -> TrainingArguments:
    """TrainingArguments from ``training_config`` with lorafit's defaults for keys not given."""
    tc = dict(cfg.training_config)
    tc.pop("overwrite_output_dir", None)
    tc.pop("save_safetensors", None)
    tc.pop("skip_nonfinite", None)
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
    if not has_eval and str(tc.get("eval_strategy", "no")) not in ("no", "IntervalStrategy.NO"):
        raise LorafitError(
            f"training_config.eval_strategy is {tc['eval_strategy']!r} but there is no eval data; set "
            "data.eval (a file), data.eval_fraction (e.g. 0.05), or training_config.eval_strategy: no"
        )
    if "report_to" not in tc:
        import importlib.util

        tc["report_to"] = ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
    if not _has_accelerator():
        tc.setdefault("use_cpu", True)  # so that bf16: true (the Phi-3 sample) means CPU bf16 autocast
    tc.setdefault("disable_tqdm", True)  # lorafit's own bar shows loss, lr and tokens/s
    tc.setdefault("dataloader_num_workers", 0)
    tc["remove_unused_columns"] = False  # our rows carry only model inputs
    tc["label_names"] = ["labels"]
    # Every LoRA parameter takes part in every forward, so DDP need not search the graph for
    # unused ones each step (Trainer's default turns that search on without checkpointing).
    tc.setdefault("ddp_find_unused_parameters", False)
    # Non-reentrant checkpointing: works under DDP and FSDP with frozen base weights, where the
    # reentrant kind needs inputs that require grad. transformers 5 renamed the key.
    for key in ("gradient_checkpointing", "activation_checkpointing"):
        if tc.get(key) and f"{key}_kwargs" not in tc:
            tc[f"{key}_kwargs"] = {"use_reentrant": False}
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
    """``Trainer`` whose checkpoints hold the PEFT-format adapter instead of the base model and
    appear whole or not at all, which counts real (non-pad) tokens for the tokens/s figure,
    which records whether each step's loss was finite (for ``safety.NonFiniteGuard``), and whose
    loss is :func:`lorafit.loss.causal_lm_loss` (the model's own loss, without full-vocabulary
    logits) wherever that applies.

    Under DDP every rank counts its own tokens and :meth:`tokens_seen` sums them. Under FSDP
    (and DeepSpeed ZeRO-3) Trainer gathers a full state dict on every rank before ``_save``;
    the adapter is taken from it, and resuming loads the adapter into the sharded parameters.

    ``training_args.bin`` is never written: it is a pickle, and nothing here reads it back.
    """

    def __init__(
        self, *args: Any, pad_token_id: int | None = None, data_fingerprint: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.pad_token_id = pad_token_id
        self.data_fingerprint = data_fingerprint
        self.real_tokens = 0
        self._loss_finite: torch.Tensor | None = None  # all micro-batch losses of this step finite
        self._staging: str | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001, ANN201
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss).all()  # stays on the device: no sync per micro-batch
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        return loss

    def take_loss_finite(self) -> bool:
        """Whether every loss since the last call was finite (True when none was computed)."""
        finite, self._loss_finite = self._loss_finite, None
        return finite is None or bool(finite)

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

    def tokens_seen(self) -> int:
        """Real tokens trained on so far by all processes together. A collective under
        DDP/FSDP: every rank must call it at the same point (Trainer logs on every rank)."""
        return lf_dist.all_reduce_sum(self.real_tokens, device=self.args.device)

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
        if state_dict is not None and not state_dict:
            raise LorafitError(
                "the sharded model handed over no weights to save. With DeepSpeed ZeRO-3 set "
                "zero_optimization.stage3_gather_16bit_weights_on_model_save: true in its config"
            )
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        # Without sharding, Trainer passes no state dict and the model's parameters are whole.
        save_adapter(model, output_dir, state_dict=state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Under FSDP, Trainer would also write the whole model (pytorch_model_fsdp.bin: every base
        # weight) into each checkpoint; the adapter is all a lorafit checkpoint needs.
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        plugin = self.accelerator.state.fsdp_plugin
        save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _get_output_dir(self, trial: Any) -> str:
        # While _save_checkpoint runs, Trainer writes checkpoint-N into the staging folder.
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, written into ``.partial-checkpoint-N/`` and renamed into place.

        A kill during the save leaves the previous checkpoints whole (the partial folder is
        cleared at the next start); a failed write (disk full) removes the partial folder and
        raises a ``LorafitError`` naming the last good checkpoint. Rotation (``save_total_limit``)
        runs after the rename, on complete checkpoints only.
        """
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{safety.PARTIAL}{name}"
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's RNG file is written
            if self.args.should_save:
                self._publish(staging / name, run_dir / name)
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, (OSError, RuntimeError, SafetensorError)):  # torch.save's write errors
                raise LorafitError(
                    f"saving {name} in {run_dir} failed ({e}); nothing of it was kept. "
                    + safety.resume_hint(run_dir)
                ) from e
            raise
        finally:
            self._staging = None
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            safety.rotate_checkpoints(run_dir, self.args.save_total_limit, [self.state.best_model_checkpoint])

    def _publish(self, staged: Path, final: Path) -> None:
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staged:
            self.state.best_model_checkpoint = str(final)  # the path it will have after the rename
            self.state.save_to_json(str(staged / safety.TRAINER_STATE_NAME))
        own = {"real_tokens": self.real_tokens, "train_data": self.data_fingerprint}
        (staged / safety.LORAFIT_STATE_NAME).write_text(json.dumps(own), encoding="utf-8")
        safety.publish_checkpoint(staged, final)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        if self.is_fsdp_enabled:
            lf_dist.load_adapter_sharded(model or self.model_wrapped, resume_from_checkpoint)
        else:
            load_adapter(model or self.model, resume_from_checkpoint)
        own = Path(resume_from_checkpoint) / safety.LORAFIT_STATE_NAME
        if own.is_file():
            self.real_tokens = int(json.loads(own.read_text(encoding="utf-8")).get("real_tokens", 0))

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint:
            self._load_from_checkpoint(self.state.best_model_checkpoint)


class RunFilesCallback(TrainerCallback):
    """``metrics.jsonl`` (one line per log and eval), ``loss.png``, and a progress bar with
    loss, learning rate and tokens/s. Writes on the main process only; token counts in
    ``metrics.jsonl`` are summed over all processes."""

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
        self.tokens0 = self.trainer.tokens_seen()  # every rank runs this callback: a collective is safe
        if state.is_world_process_zero and state.global_step > 0:
            self.history = metrics_up_to(self.run_dir / METRICS_NAME, state.global_step)
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def tokens_per_s(self, tokens: int) -> float:
        """Throughput since training began, given the tokens seen by all processes so far."""
        return (tokens - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            postfix = {k: v for k, v in self.last.items()}
            # Only rank 0 has a bar, so no collective here: its own count times the number of
            # processes estimates the total; metrics.jsonl holds the exact sum.
            postfix["tok/s"] = f"{self.tokens_per_s(self.trainer.real_tokens * args.world_size):.0f}"
            self.bar.set_postfix(postfix, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        if not logs:
            return
        # Trainer logs on every rank with the same keys, so every rank joins this sum.
        tokens = self.trainer.tokens_seen() if "loss" in logs else 0
        if not state.is_world_process_zero:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if "loss" in logs:
            row["tokens_per_s"] = round(self.tokens_per_s(tokens), 1)
            row["tokens_seen"] = tokens
            self.last = {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0):.2e}"}
        if "eval_loss" in logs:
            row["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            msg = (
                f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}, "
                f"perplexity {row['eval_perplexity']:.2f}"
            )
            self.write(msg)
        self.history.append(row)
        with open(self.run_dir / METRICS_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_evaluate(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.is_world_process_zero:
            plot_loss(self.history, self.run_dir / "loss.png")

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.close()
        if state.is_world_process_zero:
            plot_loss(self.history, self.run_dir / "loss.png")


def metrics_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` logged up to ``step``; the file is rewritten to hold just those.

    On resume from checkpoint-N the rows after N (logged by the interrupted run, and about to be
    logged again) and a last line cut short by a kill go, so the file reads as one run.
    """
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                rows.append(row)
    safety.write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


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


def build_trainer(
    cfg: RunConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    args: TrainingArguments,
    train_set: Any,
    eval_set: Any,
    fingerprint: str,
) -> LorafitTrainer:
    """The Trainer with lorafit's callbacks: run files, the non-finite guard, stop on signals."""
    with _quiet_transformers():
        trainer = LorafitTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=lf_data.collator_for(
                tokenizer,
                packing=cfg.data.packing,
                example_boundaries=model.config._attn_implementation == PACKED_ATTENTION,
            ),
            pad_token_id=tokenizer.pad_token_id,
            data_fingerprint=fingerprint,
        )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    run_dir = Path(args.output_dir)
    files = RunFilesCallback(run_dir, trainer)
    trainer.add_callback(files)
    skip = bool(cfg.training_config.get("skip_nonfinite"))
    trainer.add_callback(safety.NonFiniteGuard(trainer, run_dir, skip=skip, echo=files.write))
    trainer.add_callback(safety.StopOnSignal(echo=files.write))
    return trainer


def run_trainer(trainer: LorafitTrainer, checkpoint: str | None) -> None:
    """``trainer.train`` with SIGINT/SIGTERM turned into a stop after the step (``RunStopped``)."""
    callbacks = trainer.callback_handler.callbacks
    files = next(cb for cb in callbacks if isinstance(cb, RunFilesCallback))
    stop = next(cb for cb in callbacks if isinstance(cb, safety.StopOnSignal))
    try:
        with stop.installed():
            trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        files.close()  # an error message then starts on a line of its own
    state = trainer.state
    if stop.received is not None and state.global_step < state.max_steps:
        raise RunStopped(
            f"stopped by {signal.Signals(stop.received).name} after step {state.global_step} of "
            f"{state.max_steps}. " + safety.resume_hint(Path(trainer.args.output_dir)),
            exit_code=128 + stop.received,
        )


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
    join_processes(cfg)
    if not is_main_process():
        echo = _say_nothing
    run_dir, checkpoint = lf_dist.decide_on_main(lambda: resolve_run_dir(cfg, resume))
    if checkpoint is not None:
        safety.check_checkpoint(Path(checkpoint))
    if is_main_process():
        safety.check_output_dir(run_dir)
    keep_freed_memory()
    seed = int(cfg.training_config.get("seed", 42))
    tokenizer = load_tokenizer(cfg)
    with lf_dist.main_process_first():  # one process per machine tokenises; the rest read its cache
        train_set, eval_set, stats = build_data(cfg, tokenizer, seed)
    fingerprints = [lf_data.dataset_fingerprint(d) for d in (train_set, eval_set) if d is not None]
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
        check_same_data(Path(checkpoint), fingerprint, echo)

    if is_main_process():
        safety.check_free_space(run_dir, safety.checkpoint_bytes(model))

    with safety.write_errors_reported(run_dir):
        if is_main_process():
            write_run_files(run_dir, cfg, tokenizer, stats, fresh=checkpoint is None, echo=echo)
        prompts = eval_conversations(cfg, cfg.data.eval_prompts, stats) if is_main_process() else []
        before = answer_prompts(model, tokenizer, prompts) if prompts and checkpoint is None else []
        trainer = build_trainer(cfg, model, tokenizer, args, train_set, eval_set, fingerprint)
        for callback in callbacks or []:
            trainer.add_callback(callback)
        echo(f"training in {run_dir}" + (f", resuming from {checkpoint}" if checkpoint else ""))
        run_trainer(trainer, checkpoint)
        trainer.save_model(str(run_dir))  # on every rank: FSDP gathers the adapter from all of them
        if model.config._attn_implementation == PACKED_ATTENTION:
            model.set_attn_implementation("sdpa")  # the model goes back as loaded
        if is_main_process() and prompts:
            if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
                # The weights are spread over the processes; rank 0 alone cannot run the model.
                after = [f"(not run: the model is sharded; try lorafit chat --adapter {run_dir})"] * len(
                    prompts
                )
            else:
                after = answer_prompts(model, tokenizer, prompts)
            write_samples(
                run_dir / SAMPLES_NAME, prompts, before or ["(not run: resumed)"] * len(after), after
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
