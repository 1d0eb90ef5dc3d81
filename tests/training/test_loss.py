"""lorafit.loss against the model's own loss: same value, same LoRA gradients, in the Trainer too.

fp32 compares with atol 1e-6 (the two sum the same terms in a different order). Under bf16
autocast both paths round at different points, so there the check is that lorafit's loss is
as close to an fp64 computation of the batch as the model's own bf16 loss is.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import lorafit.training.loss as lf_loss
import lorafit.training.trainer as lf_trainer
from lorafit.adapters import LoraConfig, apply_lora
from lorafit.training.loss import causal_lm_loss, supports_fast_loss
from lorafit.training.trainer import LorafitTrainer

from tiny import tiny_llama, tiny_phi3

VOCAB = 128


def lora_model(build=tiny_phi3, dtype: torch.dtype = torch.float32, **lora) -> torch.nn.Module:
    model = apply_lora(build(dtype=dtype), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    return model.train()


def batch(seed: int = 0, packed: bool = False) -> dict[str, torch.Tensor]:
    """Three rows with prompt spans (-100), one row padded; or two packed rows with position_ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 24), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100  # prompts
    labels[1, 15:] = -100  # padding
    if not packed:
        return {"input_ids": ids, "labels": labels}
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(3, 1)
    labels[:, 10:13] = -100  # the second example's prompt, its first label included
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def loss_and_grads(model, inputs, fast: bool, num_items=None, autocast: bool = False):
    model.zero_grad()
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if fast:
            loss = causal_lm_loss(model, inputs, num_items)
        else:
            loss = model(**inputs, use_cache=False, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("build", [tiny_phi3, tiny_llama])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("num_items", [None, torch.tensor(50)])
def test_fp32_loss_and_grads_equal_the_models_own(build, packed, num_items) -> None:
    model = lora_model(build)
    inputs = batch(packed=packed)
    ref_loss, ref_grads = loss_and_grads(model, inputs, fast=False, num_items=num_items)
    loss, grads = loss_and_grads(model, inputs, fast=True, num_items=num_items)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_tiles_add_up_to_the_whole(monkeypatch) -> None:
    model = lora_model()
    inputs = batch()
    whole = loss_and_grads(model, inputs, fast=True)
    monkeypatch.setattr(lf_loss, "TILE_LOGITS", 5 * VOCAB)  # 5 rows a tile: 10 tiles, the last short
    tiled = loss_and_grads(model, inputs, fast=True)
    torch.testing.assert_close(tiled[0], whole[0], atol=1e-6, rtol=1e-6)
    for name in whole[1]:
        torch.testing.assert_close(tiled[1][name], whole[1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: most softmax terms underflow in fp32
def test_head_cross_entropy_equals_torch_cross_entropy(scale) -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = (torch.randn(37, 16, generator=gen) * scale).requires_grad_()
    weight, bias = torch.randn(50, 16, generator=gen), torch.randn(50, generator=gen)
    targets = torch.randint(0, 50, (37,), generator=gen)
    ours = lf_loss.head_cross_entropy_sum(hidden, weight, bias, targets)
    (ours_grad,) = torch.autograd.grad(ours, hidden)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, targets, reduction="sum")
    (plain_grad,) = torch.autograd.grad(plain, hidden)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, plain, atol=1e-6 * scale, rtol=1e-6)
    torch.testing.assert_close(ours_grad, plain_grad, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_is_as_accurate_as_the_models_own_loss() -> None:
    """Against fp64, over four batches: the loss and the largest relative LoRA-gradient error per
    batch, on average no worse than the model's own loss (one batch alone scatters by +-15%: the
    two paths round independently)."""
    model = lora_model(dtype=torch.bfloat16)
    reference = lora_model(dtype=torch.bfloat16).double()  # same weights (same seeds), fp64
    ours, theirs = [], []
    for seed in range(4):
        inputs = batch(seed)
        ref_loss, ref_grads = loss_and_grads(reference, inputs, fast=False)
        plain_loss, plain_grads = loss_and_grads(model, inputs, fast=False, autocast=True)
        loss, grads = loss_and_grads(model, inputs, fast=True, autocast=True)

        def err(g: dict, ref_grads: dict = ref_grads) -> float:
            return max(float((g[n].double() - ref_grads[n]).norm() / ref_grads[n].norm()) for n in ref_grads)

        assert loss.dtype == torch.float32
        assert abs(loss - ref_loss) <= 1.1 * abs(plain_loss - ref_loss) + 1e-3
        ours.append(err(grads))
        theirs.append(err(plain_grads))
    assert sum(ours) <= 1.02 * sum(theirs)


def test_a_batch_without_labels_gives_zero_gradients() -> None:
    model = lora_model()
    inputs = batch()
    inputs["labels"][:] = -100
    loss, grads = loss_and_grads(model, inputs, fast=True, num_items=torch.tensor(4))
    assert loss == 0 and all(not g.any() for g in grads.values())


def test_no_grad_forward_keeps_nothing_for_backward() -> None:
    model = lora_model()
    with torch.no_grad():
        loss = causal_lm_loss(model, batch())
    ref = model(**batch(), use_cache=False).loss
    torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=1e-6)
    assert not loss.requires_grad


def test_supported_models() -> None:
    assert supports_fast_loss(lora_model())
    assert supports_fast_loss(lora_model(tiny_llama))
    # a trainable head, a head with LoRA, logit soft-capping: the model's own loss
    assert not supports_fast_loss(lora_model(modules_to_save=["lm_head"]))
    assert not supports_fast_loss(lora_model(target_modules=["lm_head", "qkv_proj"]))
    model = lora_model()
    model.config.final_logit_softcapping = 30.0
    assert not supports_fast_loss(model)
    assert not supports_fast_loss(torch.nn.Linear(2, 2))


def _trainer(tmp_path, model, cls=LorafitTrainer, **kwargs) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        learning_rate=1e-2,
        max_steps=2,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        label_names=["labels"],
        save_strategy="no",
        **kwargs,
    )
    rows = [{k: v[i] for k, v in batch(seed=s, packed=True).items()} for s in range(4) for i in range(3)]
    extra = {"pad_token_id": 0} if cls is LorafitTrainer else {}
    return cls(model=model, args=args, train_dataset=rows, **extra)


def test_trainer_compute_loss_equals_the_default(tmp_path) -> None:
    model = lora_model()
    trainer = _trainer(tmp_path, model)
    inputs = batch(packed=True)
    for num_items in (None, torch.tensor(40)):
        ours = trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
        default = Trainer.compute_loss(trainer, model, dict(inputs), num_items_in_batch=num_items)
        torch.testing.assert_close(ours, default, atol=1e-6, rtol=1e-6)
    model.eval()
    loss, logits, _ = trainer.prediction_step(model, dict(inputs), prediction_loss_only=True)
    default = Trainer.prediction_step(trainer, model, dict(inputs), prediction_loss_only=True)[0]
    assert logits is None
    torch.testing.assert_close(loss, default, atol=1e-6, rtol=1e-6)
    # predictions (logits) asked for: the model's own forward
    loss, logits, labels = trainer.prediction_step(model, dict(inputs), prediction_loss_only=False)
    assert logits.shape == (*inputs["input_ids"].shape, VOCAB)
    torch.testing.assert_close(loss, default, atol=1e-6, rtol=1e-6)


def test_training_with_gradient_accumulation_matches_the_default_trainer(tmp_path, monkeypatch) -> None:
    """Two optimizer steps of two accumulated batches each: same LoRA weights afterwards."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return causal_lm_loss(*args, **kwargs)

    monkeypatch.setattr(lf_trainer, "causal_lm_loss", counted)
    ours, plain = lora_model(), lora_model()
    _trainer(tmp_path / "a", ours, gradient_accumulation_steps=2).train()
    assert len(calls) == 4  # the fast path ran for every micro-batch
    _trainer(tmp_path / "b", plain, cls=Trainer, gradient_accumulation_steps=2).train()
    trained = dict(plain.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trained[name], atol=1e-6, rtol=1e-5, msg=name)
