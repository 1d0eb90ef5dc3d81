"""QLoRA on CPU: LoRA over a bitsandbytes 4-bit NF4 base, checked against a dequantized base and PEFT.

Tolerances (measured on the tiny Phi-3 below, written in each test):
- 4-bit model vs a plain reference computing with the dequantized weights: logits within 1e-2,
  LoRA gradients within 2% of their norm (the same weights; only kernel rounding differs).
- adapter trained on the 4-bit base, applied to the bf16 base: logits within 0.25 (NF4's
  quantization error of the base itself, not of the adapter).
- lorafit vs PEFT on the same 4-bit base: logits within 1e-5; the demo's in-memory quantization
  vs transformers' quantization while loading: within 1e-2.
"""

from __future__ import annotations

import copy
import os
import sys

import peft
import pytest
import torch

from lorafit.adapters import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter
from lorafit.errors import LorafitError
from lorafit.models.quant import QLORA_SETTINGS, dequantize_model, prepare_kbit_model

from tiny import tiny_phi3

pytest.importorskip("bitsandbytes")

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(2))
CFG = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


def qlora_model(seed: int = 0, **cfg) -> torch.nn.Module:
    model = tiny_phi3(seed=seed, dtype=torch.bfloat16, hidden=64)
    prepare_kbit_model(model, QLORA_SETTINGS)
    return apply_lora(model, LoraConfig(**{**CFG, **cfg}))


def out(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_base_is_4bit_and_frozen_and_lora_is_fp32() -> None:
    import bitsandbytes as bnb

    model = qlora_model()
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.weight is None
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert model.model.norm.weight.dtype == torch.float32  # k-bit preparation


class DequantizedLinear(torch.nn.Module):
    """What a 4-bit layer computes, written plainly: y = (x in bf16) @ dequant(W)^T, cast back."""

    def __init__(self, q: torch.nn.Module) -> None:
        import bitsandbytes as bnb

        super().__init__()
        self.w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).to(torch.bfloat16)
        self.b = q.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.w, self.b).to(x.dtype)


def test_gradients_match_a_plain_dequantized_reference_even_after_an_eval_forward() -> None:
    q = qlora_model(init_lora_weights=False)
    ref = copy.deepcopy(q)
    for module in ref.modules():
        if getattr(module, "base_layer", None) is not None:
            module.base_layer = DequantizedLinear(module.base_layer)
    q.eval()
    out(q)  # an eval-mode forward: bitsandbytes would repack for its backward-less CPU kernel
    for model in (q, ref):
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
    torch.testing.assert_close(out(q), out(ref), atol=1e-2, rtol=0)
    reference = dict(ref.named_parameters())
    for name, p in q.named_parameters():
        if p.requires_grad:
            err = (p.grad - reference[name].grad).norm() / reference[name].grad.norm()
            assert err < 0.02, (name, err.item())


def test_training_a_few_steps_lowers_the_loss() -> None:
    model = qlora_model()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.fixture
def tiny_folder(tmp_path):
    path = tmp_path / "tiny"
    tiny_phi3(dtype=torch.bfloat16, hidden=64).save_pretrained(path)
    return path


def test_adapter_round_trips_through_peft_on_a_4bit_model(tiny_folder, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def hub_style_4bit():  # quantized by transformers while loading, then lorafit's k-bit preparation
        base = AutoModelForCausalLM.from_pretrained(
            tiny_folder, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(**QLORA_SETTINGS)
        )
        return prepare_kbit_model(base, QLORA_SETTINGS)

    ours = qlora_model(init_lora_weights=False)
    save_adapter(ours, tmp_path / "adapter")
    expected = out(load_adapter(hub_style_4bit(), tmp_path / "adapter"))
    # Quantizing in memory (the demo) and while loading (a hub model) give the same 4-bit model.
    torch.testing.assert_close(out(ours), expected, atol=1e-2, rtol=0)
    via_peft = peft.PeftModel.from_pretrained(hub_style_4bit(), tmp_path / "adapter")
    torch.testing.assert_close(out(via_peft), expected, atol=1e-5, rtol=0)
    # ... and PEFT's adapter on the 4-bit base loads back into lorafit's 4-bit model.
    via_peft.save_pretrained(tmp_path / "peft")
    back = load_adapter(hub_style_4bit(), tmp_path / "peft")
    torch.testing.assert_close(out(back), expected, atol=0, rtol=0)


def test_adapter_moves_between_4bit_and_bf16_bases(tmp_path) -> None:
    q = qlora_model(init_lora_weights=False)
    save_adapter(q, tmp_path)
    on_bf16 = load_adapter(tiny_phi3(dtype=torch.bfloat16, hidden=64), tmp_path)
    diff = (out(on_bf16) - out(q)).abs().max().item()
    assert diff < 0.25, diff
    save_adapter(on_bf16, tmp_path / "back")
    again = load_adapter(
        prepare_kbit_model(tiny_phi3(dtype=torch.bfloat16, hidden=64), QLORA_SETTINGS), tmp_path / "back"
    )
    torch.testing.assert_close(out(again), out(q), atol=0, rtol=0)


def test_merge_dequantizes_then_writes_a_16bit_model(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    q = qlora_model(init_lora_weights=False)
    expected = out(q)
    dequantize_model(q)
    merge_lora(q, unload=True)
    assert q.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    q.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not hasattr(plain.config, "quantization_config")
    assert (out(plain) - expected).abs().max().item() < 0.1


def test_merging_into_a_4bit_weight_is_refused() -> None:
    with pytest.raises(RuntimeError, match="dequantize"):
        merge_lora(qlora_model(init_lora_weights=False))


def test_missing_bitsandbytes_names_the_extra(monkeypatch) -> None:
    from lorafit.models.quant import require_bitsandbytes

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what a machine without it imports
    with pytest.raises(LorafitError, match=r"lorafit\[qlora\]"):
        require_bitsandbytes()


@pytest.mark.parametrize(
    "bad,msg",
    [
        ({"load_in_8bit": True}, "unknown key 'load_in_8bit'"),
        ({"load_in_4bit": False}, "load_in_4bit: true"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "nf4 or fp4"),
    ],
)
def test_bad_quantization_settings(bad, msg) -> None:
    from lorafit.models.quant import check_settings

    with pytest.raises(LorafitError, match=msg):
        check_settings(bad)


def test_cli_qlora_trains_the_demo_and_merges(tmp_path, monkeypatch, capsys) -> None:
    from lorafit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    fast = [
        "--training_config.max_steps",
        "3",
        "--training_config.per_device_train_batch_size",
        "2",
        "--training_config.report_to",
        "none",
        "--data.max_length",
        "128",
        "--data.eval_prompts",
        "1",
        "--training_config.eval_steps",
        "3",
        "--training_config.output_dir",
        "run",
    ]
    assert main(["train", "--qlora", *fast]) == 0
    adapter = tmp_path / "run"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert "load_in_4bit" in (adapter / "lorafit_run.yaml").read_text()
    capsys.readouterr()
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert os.path.isfile(tmp_path / "merged" / "model.safetensors")
    # merged into the demo's original 16-bit weights, not their NF4 rounding, and said so
    assert "the adapter goes onto the original 16-bit weights of lorafit-demo" in capsys.readouterr().out
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "gguf" / "model.gguf")]) == 0
    assert "original 16-bit weights" in capsys.readouterr().out
    assert (tmp_path / "gguf" / "model.gguf").stat().st_size > 0 and (
        tmp_path / "gguf" / "Modelfile"
    ).is_file()


def test_transformers_still_accepts_a_quantized_model_by_the_flag_lorafit_sets() -> None:
    """lorafit marks its QLoRA model ``_hf_peft_config_loaded`` (models/quant.py: no public route
    exists) because transformers' Trainer refuses a quantized model without it. If a release
    stops reading the flag, this fails and says where to look."""
    from types import SimpleNamespace

    from transformers.trainer_utils import validate_quantization_for_training

    quantizer = SimpleNamespace(is_trainable=True, quantization_config=SimpleNamespace(quant_method="bnb"))
    base = SimpleNamespace(is_quantized=True, hf_quantizer=quantizer, _hf_peft_config_loaded=False)
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(base)
    validate_quantization_for_training(SimpleNamespace(**{**vars(base), "_hf_peft_config_loaded": True}))
