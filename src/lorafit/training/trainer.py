"""``LorafitTrainer``: transformers' Trainer with lorafit's checkpoints, token counts and loss.

``transformers.Trainer`` does the loop, so schedules, gradient accumulation, evaluation,
logging, resume and accelerate (DDP, FSDP, DeepSpeed) come from the library. This subclass
changes what a checkpoint holds (the PEFT-format adapter, never the base model), writes each
checkpoint atomically, counts real tokens and computes the loss without full-vocabulary logits.

Resuming is exact: a run killed at any moment and resumed from its last checkpoint ends with the
same adapter, bit for bit on CPU, as one never interrupted. The Trainer restores the optimizer,
scheduler, every RNG and the data position; the packing is a pure function of the data; LoRA's
initial weights come from the run's seed; and the run's own counters and metrics rows are
restored from the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lorafit.adapters.files import load_adapter, load_adapter_sharded
from lorafit.config import RunConfig
from lorafit.data import collator_for
from lorafit.errors import LorafitError, RunStopped
from lorafit.models.attention import PACKED_ATTENTION
from lorafit.training import checkpoints
from lorafit.training.callbacks import NonFiniteGuard, PauseAtStep, RunFilesCallback, StopOnSignal
from lorafit.training.loss import causal_lm_loss, supports_fast_loss
from lorafit.training.tracking import ConfigToTrackers


class LorafitTrainer(Trainer):
    """``Trainer`` whose checkpoints hold the PEFT-format adapter instead of the base model and
    appear whole or not at all, which counts real (non-pad) tokens for the tokens/s figure,
    which records whether each step's loss was finite (for ``NonFiniteGuard``), and whose
    loss is :func:`lorafit.training.loss.causal_lm_loss` (the model's own loss, without full-vocabulary
    logits) wherever that applies.

    Trainer's own ``save_model`` writes the adapter: the LoRA model's ``save_pretrained`` does,
    as a ``PeftModel``'s does. Under DDP every rank counts its own tokens and :meth:`tokens_seen`
    sums them. Under FSDP (and DeepSpeed ZeRO-3) Trainer gathers a full state dict on every rank
    and hands it to ``save_pretrained``, which takes the adapter from it; resuming loads the
    adapter into the sharded parameters.

    ``training_args.bin`` never reaches a checkpoint: it is a pickle, and nothing here reads it back.
    """

    def __init__(
        self, *args: Any, pad_token_id: int | None = None, data_fingerprint: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.pad_token_id = pad_token_id
        self.data_fingerprint = data_fingerprint
        # Real tokens trained on by this process, kept on the device: adding a batch's count never
        # waits for the device; reading ``real_tokens`` (logging, checkpoints) does.
        self._tokens: torch.Tensor | int = 0
        self._loss_finite: torch.Tensor | None = None  # all micro-batch losses of this step finite

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss).all()  # stays on the device: no sync per micro-batch
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        return loss

    def take_loss_finite(self) -> bool:
        """Whether every loss since the last call was finite (True when none was computed)."""
        finite, self._loss_finite = self._loss_finite, None
        return finite is None or bool(finite)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            if mask is not None:
                self._tokens = self._tokens + mask.sum()
            elif self.pad_token_id is not None:
                self._tokens = self._tokens + (ids != self.pad_token_id).sum()
            else:
                self._tokens = self._tokens + ids.numel()
        if return_outputs or not self._fast_loss_applies(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)

        def loss_only(**batch: Any) -> dict[str, torch.Tensor]:
            n = batch.pop("num_items_in_batch", None)  # added by Trainer (model_accepts_loss_kwargs)
            return {"loss": causal_lm_loss(model, batch, n, unwrapped=unwrapped)}

        # Trainer.compute_loss calls ``model(**inputs)`` and then rescales the loss it returns as
        # it would the model's own (``average_tokens_across_devices``); handed ``loss_only`` as the
        # model, it applies its own rescaling to this loss, and no copy of it lives here.
        return super().compute_loss(loss_only, inputs, False, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation without metrics needs the loss only: take it without the logits. (One
        # batch's loss over its own label tokens, as Trainer's num_items_in_batch makes it.)
        if not (prediction_loss_only and self._fast_loss_applies(inputs)):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    @property
    def real_tokens(self) -> int:
        """Real (non-pad) tokens this process has trained on (a host sync on accelerators)."""
        return int(self._tokens)

    @real_tokens.setter
    def real_tokens(self, value: int) -> None:
        self._tokens = value

    def tokens_seen(self) -> int:
        """Real tokens trained on so far by all processes together. A collective under
        DDP/FSDP: every rank must call it at the same point (Trainer logs on every rank)."""
        mine = torch.tensor([self.real_tokens], dtype=torch.int64, device=self.args.device)
        return int(self.accelerator.reduce(mine, reduction="sum").item())

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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's ``save_model`` (the model's ``save_pretrained`` writes the adapter: see
        :func:`lorafit.adapters.inject.apply_lora`), without ``training_args.bin``: Trainer pickles
        its arguments there, and nothing here reads it back."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            (Path(output_dir or self.args.output_dir) / TRAINING_ARGS_NAME).unlink(missing_ok=True)

    # Private override, kept: under FSDP, Trainer's version also writes the whole model
    # (pytorch_model_fsdp.bin: every base weight) into each checkpoint, and no TrainingArguments
    # setting leaves the model out but keeps the optimizer (save_only_model drops the optimizer).
    # Deleting the file in a callback would still write gigabytes per checkpoint.
    # tests/training/test_trainer.py checks the signature and that Trainer still writes the FSDP model.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        plugin = self.accelerator.state.fsdp_plugin
        save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    # Private override, kept: a checkpoint must appear whole or not at all, and rotation must run
    # after it is complete. The public route, a callback, only hears of a save afterwards
    # (``on_save``), when Trainer has already written into checkpoint-N and rotated; no event comes
    # before it (with ``save_strategy: best`` the decision to save is taken after every callback
    # of the step). tests/training/test_trainer.py checks the signature.
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, written into ``.partial-checkpoint-N/`` and renamed into place.

        A kill during the save leaves the previous checkpoints whole (the partial folder is
        cleared at the next start); a failed write (disk full) removes the partial folder and
        raises a ``LorafitError`` naming the last good checkpoint. Rotation (``save_total_limit``)
        runs after the rename, on complete checkpoints only.
        """
        run_dir = Path(self.args.output_dir)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{checkpoints.PARTIAL}{name}"
        try:
            # Trainer writes checkpoint-N into its output_dir: the staging folder, while it saves.
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(run_dir)
            self.accelerator.wait_for_everyone()  # every rank's RNG file is written
            if self.args.should_save:
                self._publish(staging / name, run_dir / name)
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, (OSError, RuntimeError, SafetensorError)):  # torch.save's write errors
                raise LorafitError(
                    f"saving {name} in {run_dir} failed ({e}); nothing of it was kept. "
                    + checkpoints.resume_hint(run_dir)
                ) from e
            raise
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            checkpoints.rotate_checkpoints(
                run_dir, self.args.save_total_limit, [self.state.best_model_checkpoint]
            )

    def _publish(self, staged: Path, final: Path) -> None:
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staged:
            self.state.best_model_checkpoint = str(final)  # the path it will have after the rename
            self.state.save_to_json(str(staged / checkpoints.TRAINER_STATE_NAME))
        own = {"real_tokens": self.real_tokens, "train_data": self.data_fingerprint}
        (staged / checkpoints.LORAFIT_STATE_NAME).write_text(json.dumps(own), encoding="utf-8")
        checkpoints.publish_checkpoint(staged, final)

    # Private override, kept: Trainer loads weights from a checkpoint only as a whole model or as
    # a PEFT ``PeftModel``'s adapter (``model.load_adapter``, for models that are PeftModels); a
    # lorafit model is neither, and ``train(resume_from_checkpoint=...)`` always calls this, so
    # there is no public route in. tests/training/test_trainer.py checks the signature.
    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        if self.is_fsdp_enabled:
            load_adapter_sharded(model or self.model_wrapped, resume_from_checkpoint)
        else:
            load_adapter(model or self.model, resume_from_checkpoint)
        own = Path(resume_from_checkpoint) / checkpoints.LORAFIT_STATE_NAME
        if own.is_file():
            self.real_tokens = int(json.loads(own.read_text(encoding="utf-8")).get("real_tokens", 0))

    # Private override, kept for the reason above: Trainer's loads a best checkpoint's adapter only
    # into a PeftModel, and for a lorafit model looks for model.safetensors and fails. The public
    # route, load_best_model_at_end off for Trainer and the adapter loaded in on_train_end, would
    # repeat TrainingArguments' checks of that setting (matching save and eval steps, the metric).
    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint:
            self._load_from_checkpoint(self.state.best_model_checkpoint)


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
            data_collator=collator_for(
                tokenizer,
                packing=cfg.data.packing,
                example_boundaries=model.config._attn_implementation == PACKED_ATTENTION,
            ),
            pad_token_id=tokenizer.pad_token_id,
            data_fingerprint=fingerprint,
        )
    add_run_callbacks(trainer, cfg)
    return trainer


def add_run_callbacks(trainer: LorafitTrainer, cfg: RunConfig) -> None:
    """lorafit's callbacks in place of transformers' printing ones, for every method's trainer:
    run files, the non-finite guard, stop on signals, the config to the trackers, and the pause
    at a step that tests ask for (``LORAFIT_PAUSE_AT_STEP``)."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    run_dir = Path(trainer.args.output_dir)
    files = RunFilesCallback(run_dir, trainer)
    # First: its on_log adds tokens/s to the logs, which the trackers (report_to) then receive.
    trainer.callback_handler.callbacks.insert(0, files)
    skip = bool(cfg.training_config.get("skip_nonfinite"))
    trainer.add_callback(NonFiniteGuard(trainer, run_dir, skip=skip, echo=files.write))
    trainer.add_callback(StopOnSignal(echo=files.write))
    trainer.add_callback(ConfigToTrackers(cfg.to_dict(), cfg.to_yaml(), trainer.callback_handler.callbacks))
    pause = PauseAtStep.from_environment()
    if pause is not None:
        trainer.add_callback(pause)


def run_trainer(trainer: LorafitTrainer, checkpoint: str | None) -> None:
    """``trainer.train`` with SIGINT/SIGTERM turned into a stop after the step (``RunStopped``)."""
    callbacks = trainer.callback_handler.callbacks
    files = next(cb for cb in callbacks if isinstance(cb, RunFilesCallback))
    stop = next(cb for cb in callbacks if isinstance(cb, StopOnSignal))
    try:
        with stop.installed():
            trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        files.close()  # an error message then starts on a line of its own
    state = trainer.state
    if stop.received is not None and state.global_step < state.max_steps:
        raise RunStopped(
            f"stopped by {signal.Signals(stop.received).name} after step {state.global_step} of "
            f"{state.max_steps}. " + checkpoints.resume_hint(Path(trainer.args.output_dir)),
            exit_code=128 + stop.received,
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
