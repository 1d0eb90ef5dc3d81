"""Preference losses against the real TRL 1.16: same loss, logged metrics and LoRA gradients.

Each test builds a tiny Phi-3 with a random LoRA (PEFT for TRL, lorafit's layers for lorafit,
the same weights), lets TRL's own trainer tokenise four records and collate them into its
padded batch, hands lorafit the same sequences (packed into one row, no padding), and compares
TRL's ``compute_loss`` with lorafit's in fp32: loss and metrics within 1e-5, gradients too.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from lorafit.adapters import LoraConfig, apply_lora
from lorafit.data.preference import PreferenceCollator
from lorafit.models.attention import use_packed_attention
from lorafit.training.preference import PreferenceTrainer, Reference

from tiny import phi3_config

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
PAIRS = [
    {"prompt": "What is two plus two?", "chosen": "Two plus two is four.", "rejected": "It is five."},
    {
        "prompt": "Write a haiku about the sea.",
        "chosen": "Waves fold into foam, salt wind.",
        "rejected": "No.",
    },
    {
        "prompt": "Translate to French: good morning.",
        "chosen": "Bonjour.",
        "rejected": "Good morning in French.",
    },
    {
        "prompt": "Explain LoRA.",
        "chosen": "Low rank adapters train small matrices A and B.",
        "rejected": "LoRA?",
    },
]


def base_model(tokenizer, seed: int = 0):
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed)
    return Phi3ForCausalLM(phi3_config(vocab=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).float()


def peft_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".default.weight", "")


def models(tokenizer, seed: int = 0):
    """(PEFT model for TRL, lorafit model) with the same random LoRA weights, in train mode."""
    base = base_model(tokenizer, seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **LORA))
    ours = apply_lora(base, LoraConfig(**LORA))
    copy_lora(theirs, ours)
    return theirs.train(), ours.train()


def copy_lora(theirs, ours) -> None:
    weights = {peft_name(n): p for n, p in theirs.named_parameters() if ".default." in n}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(weights[name])


def nudge(theirs, ours, seed: int = 1) -> None:
    """Move both adapters away from where they started, the same way (as a few steps would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".default." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    copy_lora(theirs, ours)


def trl_models(tokenizer, reference: str):
    """(model and kwargs for a TRL trainer, lorafit model). Reference "base": a fresh adapter (TRL:
    peft_config; lorafit: LoRA off). "start": continuing from an adapter (TRL: a PeftModel,
    copied as its "ref" adapter; lorafit: the adapter's starting tensors)."""
    if reference == "start":
        theirs, ours = models(tokenizer)
        return theirs, {}, ours
    ours = apply_lora(base_model(tokenizer), LoraConfig(**LORA)).train()
    return base_model(tokenizer), {"peft_config": peft.LoraConfig(init_lora_weights=False, **LORA)}, ours


def lorafit_reference(theirs, ours, reference: str, seed: int = 1) -> Reference:
    """lorafit's reference matching TRL's, after TRL built its model; both adapters then equal."""
    if reference == "start":
        ours_reference = Reference.snapshot(ours)
        nudge(theirs, ours, seed)
        return ours_reference
    copy_lora(theirs, ours)
    return Reference(ours)


def grads(model) -> dict[str, torch.Tensor]:
    return {peft_name(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def lorafit_step(
    ours, tokenizer, tmp_path, method, settings, examples, packed_attention=False, reference=None
):
    if packed_attention:
        assert use_packed_attention(ours)
    trainer = PreferenceTrainer(
        model=ours,
        args=TrainingArguments(output_dir=str(tmp_path / "ours"), use_cpu=True, report_to="none"),
        method=method,
        settings=settings,
        reference=reference or (Reference(ours) if method in ("dpo", "kto") else None),
    )
    batch = PreferenceCollator(tokenizer.pad_token_id, example_boundaries=packed_attention)(examples)
    ours.zero_grad()
    loss, metrics = trainer.preference_loss(ours, batch)
    loss.backward()
    return loss.detach(), metrics, grads(ours)


def sequences(input_ids, keep, labels):
    """(ids, labels) lists of each row's real tokens."""
    out = []
    for row_ids, row_keep, row_labels in zip(input_ids, keep, labels, strict=True):
        k = row_keep.bool()
        out.append((row_ids[k].tolist(), row_labels[k].tolist()))
    return out


def compare(loss, metrics, ours_grads, trl_loss, trl_metrics, trl_grads) -> None:
    torch.testing.assert_close(loss.float(), trl_loss.detach().float(), atol=1e-5, rtol=1e-5)
    for key, value in trl_metrics.items():
        assert key in metrics, key
        assert metrics[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key
    assert ours_grads.keys() == trl_grads.keys()
    for name in trl_grads:
        torch.testing.assert_close(ours_grads[name], trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)


DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.mark.parametrize(
    "loss_type,label_smoothing,loss_weights",
    [
        ("sigmoid", 0.0, None),
        ("ipo", 0.0, None),
        ("hinge", 0.0, None),
        ("robust", 0.1, None),
        (["sigmoid", "sft"], 0.0, [1.0, 0.7]),  # RPO: DPO plus the chosen answers' NLL
    ],
)
@pytest.mark.parametrize("packed_attention", [False, True])
@pytest.mark.parametrize("reference", ["base", "start"])
def test_dpo_equals_trl(
    chatml_tokenizer, tmp_path, loss_type, label_smoothing, loss_weights, packed_attention, reference
) -> None:
    from trl import DPOConfig, DPOTrainer

    tokenizer = chatml_tokenizer
    theirs, kwargs, ours = trl_models(tokenizer, reference)
    records = [
        {
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in PAIRS
    ]
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.2,
        loss_type=loss_type if isinstance(loss_type, list) else [loss_type],
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
    )
    trl = DPOTrainer(
        model=theirs,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        **kwargs,
    )
    theirs = trl.model
    ours_reference = lorafit_reference(theirs, ours, reference)
    batch = trl.data_collator([trl.train_dataset[i] for i in range(len(records))])
    trl.model.train()
    trl.model.zero_grad()
    trl_loss = trl.compute_loss(trl.model, batch)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trl._metrics["train"].items() if k in DPO_METRICS}

    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    seqs = sequences(ids, mask, ids.masked_fill(completion == 0, -100))
    n = len(records)
    examples = [
        {
            "chosen_input_ids": seqs[i][0],
            "chosen_labels": seqs[i][1],
            "rejected_input_ids": seqs[n + i][0],
            "rejected_labels": seqs[n + i][1],
        }
        for i in range(n)
    ]
    settings = {
        "beta": 0.2,
        "loss_type": loss_type,
        "loss_weights": loss_weights,
        "label_smoothing": label_smoothing,
    }
    loss, metrics, ours_grads = lorafit_step(
        ours, tokenizer, tmp_path, "dpo", settings, examples, packed_attention, ours_reference
    )
    compare(loss, metrics, ours_grads, trl_loss, trl_metrics, grads(theirs))


def _cpo_like(trainer_cls, config_cls, tokenizer, tmp_path, theirs, **config):
    args = config_cls(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=256,
        **config,
    )
    trl = trainer_cls(
        model=theirs, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer
    )
    batch = trl.data_collator([trl.train_dataset[i] for i in range(len(PAIRS))])
    trl.model.train()
    trl.model.zero_grad()
    loss = trl.compute_loss(trl.model, batch)
    loss.backward()
    metrics = {k.removeprefix("train_"): v[-1] for k, v in trl._stored_metrics["train"].items()}
    chosen = sequences(batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
    rejected = sequences(
        batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["rejected_labels"]
    )
    examples = [
        {"chosen_input_ids": c[0], "chosen_labels": c[1], "rejected_input_ids": r[0], "rejected_labels": r[1]}
        for c, r in zip(chosen, rejected, strict=True)
    ]
    return loss, metrics, examples


ORPO_METRICS = (*DPO_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen")


def test_orpo_equals_trl(phi3_tokenizer, tmp_path) -> None:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    theirs, ours = models(phi3_tokenizer)
    trl_loss, trl_metrics, examples = _cpo_like(
        ORPOTrainer, ORPOConfig, phi3_tokenizer, tmp_path, theirs, beta=0.3
    )
    loss, metrics, ours_grads = lorafit_step(ours, phi3_tokenizer, tmp_path, "orpo", {"beta": 0.3}, examples)
    compare(loss, metrics, ours_grads, trl_loss, {k: trl_metrics[k] for k in ORPO_METRICS}, grads(theirs))


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_equals_trl_cpo(phi3_tokenizer, tmp_path, cpo_alpha) -> None:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    theirs, ours = models(phi3_tokenizer)
    config = dict(beta=2.0, loss_type="simpo", simpo_gamma=0.7, cpo_alpha=cpo_alpha, label_smoothing=0.05)
    trl_loss, trl_metrics, examples = _cpo_like(
        CPOTrainer, CPOConfig, phi3_tokenizer, tmp_path, theirs, **config
    )
    settings = {k: v for k, v in config.items() if k != "loss_type"}
    loss, metrics, ours_grads = lorafit_step(ours, phi3_tokenizer, tmp_path, "simpo", settings, examples)
    compare(
        loss,
        metrics,
        ours_grads,
        trl_loss,
        {k: trl_metrics[k] for k in (*DPO_METRICS, "nll_loss")},
        grads(theirs),
    )


@pytest.mark.parametrize("reference", ["base", "start"])
def test_kto_equals_trl(chatml_tokenizer, tmp_path, reference) -> None:
    from trl import KTOConfig, KTOTrainer

    tokenizer = chatml_tokenizer
    theirs, kwargs, ours = trl_models(tokenizer, reference)
    records = [
        {
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "completion": [{"role": "assistant", "content": p[key]}],
            "label": key == "chosen",
        }
        for p, key in zip(PAIRS, ("chosen", "rejected", "chosen", "chosen"), strict=True)
    ]
    args = KTOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.3,
        desirable_weight=1.5,
        undesirable_weight=0.7,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        per_device_train_batch_size=len(records),
    )
    trl = KTOTrainer(
        model=theirs,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        **kwargs,
    )
    theirs = trl.model
    ours_reference = lorafit_reference(theirs, ours, reference, seed=2)  # seed 2: a KL estimate above 0
    batch = trl.data_collator([trl.train_dataset[i] for i in range(len(records))])
    trl.model.train()
    trl.model.zero_grad()
    trl_loss = trl.compute_loss(trl.model, batch)
    trl_loss.backward()
    wanted = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
    trl_metrics = {k: v[-1] for k, v in trl._metrics["train"].items() if k in wanted}

    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    seqs = sequences(ids, mask, ids.masked_fill(completion == 0, -100))
    examples = []
    for (seq_ids, seq_labels), label in zip(seqs, batch["label"].tolist(), strict=True):
        start = next(i for i, x in enumerate(seq_labels) if x != -100)
        examples.append(
            {"input_ids": seq_ids, "labels": seq_labels, "prompt_length": start, "label": bool(label)}
        )
    settings = {"beta": 0.3, "desirable_weight": 1.5, "undesirable_weight": 0.7}
    loss, metrics, ours_grads = lorafit_step(
        ours, tokenizer, tmp_path, "kto", settings, examples, False, ours_reference
    )
    compare(loss, metrics, ours_grads, trl_loss, trl_metrics, grads(theirs))
    if reference == "start":
        assert metrics["kl"] > 0  # the KL estimate took part, not clamped away
