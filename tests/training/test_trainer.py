"""``LorafitTrainer``'s few private hooks into transformers' Trainer, checked against the installed
transformers so that a release that renames, re-signs or stops calling one fails here, loudly,
instead of quietly writing or loading the wrong checkpoint.

Each hook that stays says in ``lorafit/training/trainer.py`` which public route was tried and
why it fails. What a public route replaced is checked not to be overridden again. Whole runs
(kill, resume, Ctrl-C, disk full, rotation) are in ``test_run.py``; this file drives one
checkpoint through the real Trainer methods on a tiny model.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments

from lorafit.adapters import LoraConfig, apply_lora
from lorafit.adapters.files import read_adapter_weights
from lorafit.lora.variants import parameter_name
from lorafit.training import checkpoints
from lorafit.training.preference import PreferenceTrainer
from lorafit.training.trainer import LorafitTrainer

from tiny import tiny_llama

# The private Trainer methods LorafitTrainer overrides, with the parameters it overrides them with.
KEPT = {
    "_save_optimizer_and_scheduler": ["self", "output_dir"],
    "_save_checkpoint": ["self", "model", "trial"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
    "_load_best_model": ["self"],
}
# Private Trainer methods lorafit calls without overriding: the loss-only prediction_step of
# LorafitTrainer and PreferenceTrainer moves a batch to the device as Trainer's own does.
CALLED = {"_prepare_inputs": ["self", "inputs"]}
# Overridden once, now replaced by public routes: save_pretrained of the LoRA model (_save), the
# output_dir setting while a checkpoint is written (_get_output_dir), train_sampling_strategy
# (_get_train_sampler), Trainer.compute_loss's own rescaling (no private method).
REPLACED = ["_save", "_get_output_dir", "_get_train_sampler"]


@pytest.mark.parametrize("name", sorted(KEPT))
def test_each_private_override_matches_transformers_signature(name: str) -> None:
    theirs = list(inspect.signature(getattr(Trainer, name)).parameters)
    ours = list(inspect.signature(getattr(LorafitTrainer, name)).parameters)
    assert theirs == KEPT[name], f"transformers changed Trainer.{name}{theirs}: revisit LorafitTrainer.{name}"
    assert ours == KEPT[name]


@pytest.mark.parametrize("name", sorted(CALLED))
def test_each_private_method_called_matches_transformers_signature(name: str) -> None:
    theirs = list(inspect.signature(getattr(Trainer, name)).parameters)
    assert theirs == CALLED[name], f"transformers changed Trainer.{name}{theirs}: revisit its callers"


def test_only_the_listed_private_methods_are_overridden() -> None:
    for cls in (LorafitTrainer, PreferenceTrainer):
        private = {
            name
            for name, value in vars(cls).items()
            if name.startswith("_")
            and not name.startswith("__")
            and hasattr(Trainer, name)
            and callable(value)
        }
        assert private <= set(KEPT), f"{cls.__name__} overrides {sorted(private - set(KEPT))} of Trainer"
        assert not private & set(REPLACED)


def test_trainer_still_reaches_lorafit_through_the_kept_hooks() -> None:
    """Where Trainer calls each kept hook (and reads output_dir for the checkpoint's folder); if
    a release moves the call, the hook is dead code and the behaviour it carries is gone."""

    def source(name: str) -> str:
        return inspect.getsource(getattr(Trainer, name))

    assert "self._load_from_checkpoint(resume_from_checkpoint)" in source("train")
    assert "self._load_from_checkpoint(resume_from_checkpoint, self.model_wrapped)" in source(
        "_prepare_for_training"
    )
    assert "self._load_best_model()" in source("_finalize_training")
    assert "self._save_checkpoint(model, trial)" in source("_maybe_log_save_evaluate")
    # _save_checkpoint puts checkpoint-N under _get_output_dir, which is args.output_dir outside
    # hyperparameter search: lorafit points output_dir at the staging folder while it saves.
    assert "run_dir = self._get_output_dir(trial=trial)" in source("_save_checkpoint")
    assert "run_dir = self.args.output_dir" in source("_get_output_dir")
    # The reason _save_optimizer_and_scheduler is kept: under FSDP it writes the whole model too.
    assert "save_fsdp_model(" in source("_save_optimizer_and_scheduler")


@pytest.fixture
def trainer(tmp_path) -> LorafitTrainer:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, save_total_limit=1
    )
    trainer = LorafitTrainer(model=model, args=args, data_fingerprint="rows")
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    return trainer


def test_a_checkpoint_is_staged_then_holds_the_adapter_and_no_pickle(trainer, tmp_path) -> None:
    run = tmp_path / "run"
    for step in (2, 4):
        trainer.state.global_step = step
        trainer._save_checkpoint(trainer.model, trial=None)
        assert trainer.args.output_dir == str(run)  # back from the staging folder
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4"]  # save_total_limit, after the rename
    assert {p.name for p in (run / "checkpoint-4").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",  # written by the LoRA model's save_pretrained, through Trainer's _save
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "lorafit_state.json",
    }
    assert (
        json.loads((run / "checkpoint-4" / checkpoints.LORAFIT_STATE_NAME).read_text())["train_data"]
        == "rows"
    )
    trainer.save_model(str(tmp_path / "final"))  # the run's final save: the adapter alone
    assert {p.name for p in (tmp_path / "final").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }


def test_resume_loads_the_adapter_where_trainer_alone_cannot(trainer, tmp_path) -> None:
    trainer.real_tokens = 123
    trainer.state.global_step = 2
    trainer._save_checkpoint(trainer.model, trial=None)
    folder = str(tmp_path / "run" / "checkpoint-2")
    fresh = LorafitTrainer(
        model=apply_lora(tiny_llama(seed=1), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)),
        args=trainer.args,
    )
    # Trainer's own loader knows whole models and PEFT's PeftModel only: the reason for the override.
    # Should this stop raising, transformers loads such adapters itself and the override can go.
    with pytest.raises((ValueError, OSError)):
        Trainer._load_from_checkpoint(fresh, folder)
    saved = read_adapter_weights(folder)
    params = dict(fresh.model.named_parameters())

    def matches() -> bool:
        return all(torch.equal(params[parameter_name(key)], value) for key, value in saved.items())

    assert not matches()
    fresh._load_from_checkpoint(folder)
    assert matches() and fresh.real_tokens == 123
    with torch.no_grad():
        for key in saved:
            params[parameter_name(key)].zero_()
    fresh.state.best_model_checkpoint = folder
    with pytest.raises((ValueError, OSError)):  # as above, for load_best_model_at_end
        Trainer._load_best_model(fresh)
    fresh._load_best_model()  # the same loader, from state.best_model_checkpoint
    assert matches()


def test_kto_trains_on_the_examples_in_order(tmp_path) -> None:
    """KTO's KL rows pair each example with its neighbour in the batch (TRL's default order):
    the public train_sampling_strategy gives Trainer's sequential sampler."""
    model = apply_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    rows = [{"input_ids": [i]} for i in range(8)]
    settings = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    kto = PreferenceTrainer(
        model=model, args=args, train_dataset=rows, method="kto", settings=settings, reference=None
    )
    assert isinstance(kto._get_train_sampler(), SequentialSampler)
