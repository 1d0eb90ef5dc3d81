"""The memory planner: its kept-activation term against what autograd really keeps, the choice of
layers to recompute, budgets, and how a run config's own keys win."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorafit.errors import LorafitError
from lorafit.training.memory import (
    GB,
    ModelShapes,
    StepSettings,
    Widths,
    choose,
    kept_per_token,
    parse_size,
    predict,
)

PHI3_MINI = ModelShapes(
    vocab=32064, hidden=3072, layers=32, heads=32, kv_heads=32, head_dim=96, intermediate=8192
)


def test_phi3_mini_keeps_what_the_lean_layers_document() -> None:
    # 68 KB per token and layer in bf16 (lorafit.models.lean; benchmarks/saved_activations.py measures 68.26)
    kept = kept_per_token(PHI3_MINI, Widths(), StepSettings(batch=1, length=2048))
    assert kept / 1024 == pytest.approx(68.26, abs=0.01)


@pytest.mark.parametrize("four_bit", [False, True])
def test_kept_term_is_what_autograd_keeps_on_a_tiny_model(four_bit) -> None:
    """Every tensor saved for backward in a forward of lorafit's stack (LoRA op, lean layers, packed
    attention, memory-light loss), counted once by storage, against the planner's kept term."""
    from transformers import Phi3ForCausalLM

    from lorafit.adapters import LoraConfig, apply_lora
    from lorafit.data import PackedCollator
    from lorafit.models.attention import use_packed_attention
    from lorafit.models.lean import use_lean_layers
    from lorafit.training.loss import causal_lm_loss

    from tiny import phi3_config

    config = phi3_config(vocab=256, hidden=64, layers=3)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).to(torch.bfloat16).train()
    if four_bit:
        pytest.importorskip("bitsandbytes")
        from lorafit.models.quant import prepare_kbit_model

        settings = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
        prepare_kbit_model(model, settings)
    apply_lora(
        model,
        LoraConfig.from_dict({"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"}),
    )
    assert use_packed_attention(model)
    use_lean_layers(model)
    rows = [
        [{"input_ids": list(range(3, 3 + n)), "labels": [-100] + list(range(4, 3 + n))} for n in (40, 24)]
    ] * 2
    batch = PackedCollator(0, example_boundaries=True)(rows)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        causal_lm_loss(model, batch)
    shapes = ModelShapes.from_config(config)
    settings = StepSettings(batch=2, length=64, rank=8)
    predicted = predict(shapes, Widths(four_bit=four_bit), settings, recomputed=0).terms["kept"]
    # the rest: RoPE's cos and sin, the label index, the example boundaries (tens of bytes a token)
    assert 0.97 * predicted <= sum(kept.values()) <= 1.10 * predicted, (predicted, sum(kept.values()))


def test_fewest_layers_recomputed_that_fit() -> None:
    precision, settings = Widths(), StepSettings(batch=1, length=2048)
    peaks = [predict(PHI3_MINI, precision, settings, k).peak for k in range(PHI3_MINI.layers + 1)]
    assert peaks == sorted(peaks, reverse=True)  # each layer recomputed keeps less
    budget = (peaks[10] + peaks[9]) // 2
    prediction, fits = choose(PHI3_MINI, precision, settings, budget)
    assert fits and prediction.recomputed == 10 and prediction.peak == peaks[10]
    prediction, fits = choose(PHI3_MINI, precision, settings, peaks[-1] - 1)
    assert not fits and prediction.recomputed == PHI3_MINI.layers


def test_four_bit_weights_and_bigger_rows_change_the_right_terms() -> None:
    settings = StepSettings(batch=1, length=2048)
    bf16 = predict(PHI3_MINI, Widths(), settings, 0)
    nf4 = predict(PHI3_MINI, Widths(four_bit=True), settings, 0)
    assert bf16.terms["weights"] / GB == pytest.approx(7.64, abs=0.01)  # 3.82 B parameters in bf16
    assert 2.0 < nf4.terms["weights"] / GB < 2.4  # the decoder at 4 bits, embedding and head in bf16
    double = predict(PHI3_MINI, Widths(), dataclasses.replace(settings, batch=2), 0)
    assert double.terms["kept"] == 2 * bf16.terms["kept"]
    assert double.terms["weights"] == bf16.terms["weights"]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("12GB", 12 * 10**9),
        ("12 GiB", 12 * 2**30),
        ("800MB", 8 * 10**8),
        ("1.5e9", 1_500_000_000),
        (4096, 4096),
    ],
)
def test_sizes_parse(text, size) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12 parsecs", "-3GB", "GB", ""])
def test_bad_sizes_name_the_field(text) -> None:
    with pytest.raises(LorafitError, match="training_config.max_memory"):
        parse_size(text)


def _precision(cfg):
    """The precision of a LoRA training run of ``cfg`` on this machine, as ``train`` decides it."""
    from lorafit.models.load import decide_precision

    return decide_precision(cfg.model, cfg.training_config, training=True, dora=cfg.lora.use_dora)


def _demo(training: dict) -> tuple:
    from lorafit.config import build_config
    from lorafit.demo import load_demo_tokenizer

    return build_config({"training_config": training}), load_demo_tokenizer()


def test_the_planner_sets_checkpoint_layers_and_says_so_in_one_line() -> None:
    from lorafit.training.memory import plan_memory

    lines: list[str] = []
    cfg, tokenizer = _demo({"max_memory": "64GB"})
    planned = plan_memory(cfg, _precision(cfg), echo=lines.append)
    assert planned.training_config["checkpoint_layers"] == 0  # the demo fits without recomputing
    assert len(lines) == 1 and lines[0].startswith("memory: peak ") and "0 of 4 layers recomputed" in lines[0]


def test_a_budget_between_the_choices_recomputes_some_layers() -> None:
    from lorafit.models.load import model_config
    from lorafit.training.memory import plan_memory, plan_run

    cfg, tokenizer = _demo({"per_device_train_batch_size": 64})
    config = model_config(cfg.model)
    none = plan_run(
        cfg, config, _precision(cfg), available=10**12
    ).prediction  # the process measured now, as plan_memory does
    all_cfg, _ = _demo({"checkpoint_layers": 4, "per_device_train_batch_size": 64})
    every = plan_run(all_cfg, config, _precision(all_cfg), available=10**12).prediction
    cfg, _ = _demo({"per_device_train_batch_size": 64, "max_memory": (none.peak + every.peak) // 2})
    planned = plan_memory(cfg, _precision(cfg), echo=lambda line: None)
    assert 1 <= planned.training_config["checkpoint_layers"] < 4


def test_the_users_own_checkpointing_wins() -> None:
    from lorafit.training.memory import plan_memory

    for keys in ({"checkpoint_layers": 2}, {"gradient_checkpointing": False}):
        lines: list[str] = []
        cfg, tokenizer = _demo({**keys, "max_memory": "64GB"})
        assert plan_memory(cfg, _precision(cfg), echo=lines.append).training_config == cfg.training_config
        recomputed = keys.get("checkpoint_layers", 0)
        assert f"{recomputed} of 4 layers recomputed" in lines[0] and "as training_config says" in lines[0]


def test_a_step_that_cannot_fit_is_refused_before_loading_with_what_would_fit() -> None:
    from lorafit.models.load import model_config
    from lorafit.training.memory import plan_memory, plan_run

    cfg, tokenizer = _demo({"per_device_train_batch_size": 64})
    process = plan_run(cfg, model_config(cfg.model), _precision(cfg)).prediction.terms["process"]
    all_recomputed = plan_run(
        cfg, model_config(cfg.model), _precision(cfg), process=process, available=10**12
    )
    cfg, _ = _demo({"per_device_train_batch_size": 64, "max_memory": process + 10**7})
    with pytest.raises(LorafitError, match=r"does not fit even with every layer recomputed.*--qlora") as e:
        plan_memory(cfg, _precision(cfg), echo=lambda line: None)
    assert "training_config.max_memory" in str(e.value)
    assert all_recomputed.prediction.peak > process + 10**7


def test_checkpoint_layers_zero_turns_the_large_model_default_off() -> None:
    from lorafit.training.arguments import resolve_training_config

    cpu = _precision(_demo({})[0])
    tc, _ = resolve_training_config({"checkpoint_layers": 0}, cpu, has_eval=False, n_params=4 * 10**9)
    assert not tc.get("activation_checkpointing", tc.get("gradient_checkpointing"))
    tc, _ = resolve_training_config({}, cpu, has_eval=False, n_params=4 * 10**9)
    assert tc.get("activation_checkpointing", tc.get("gradient_checkpointing"))  # no plan: the old rule


def test_without_a_budget_of_the_users_a_step_that_may_not_fit_warns_and_recomputes_every_layer(
    monkeypatch,
) -> None:
    import lorafit.training.memory as memory

    cfg, tokenizer = _demo({"per_device_train_batch_size": 64})
    monkeypatch.setattr(memory, "available_memory", lambda: 10**6)  # a machine with 1 MB free
    lines: list[str] = []
    planned = memory.plan_memory(cfg, _precision(cfg), echo=lines.append)
    assert planned.training_config["checkpoint_layers"] == 4
    assert lines[0].startswith("warning: memory: peak") and "Going on with every layer recomputed" in lines[0]
