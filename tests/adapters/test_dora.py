"""DoRA (``use_dora: true``) against PEFT's DoRA: outputs, gradients, adapter files, merging, QLoRA.

Both sides get the same weights: PEFT initialises a DoRA model (B random, so the magnitude starts
as the norms of W0 + s B A), saves it, and lorafit loads that adapter; or lorafit trains one and
PEFT loads it. Tolerances, measured on the tiny models below:
- fp32: logits and gradients equal PEFT's within 1e-6 (the same ops in the same order);
- bf16 base, fp32 LoRA, no autocast: logits equal PEFT's exactly;
- bf16 autocast: within bf16 rounding (2^-8 relative, as the plain path);
- merge in fp32: merged logits equal the unmerged layer's within 1e-5, unmerge restores W0 to 1e-6;
- 4-bit base: lorafit's and PEFT's logits on the same quantized model within 1e-5.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

from lorafit import lora
from lorafit.adapters import LoraConfig, apply_lora, load_adapter, merge_lora, save_adapter, unmerge_lora
from lorafit.errors import LorafitError

from tiny import logits, tiny_llama, tiny_phi3

IDS = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(1))
LABELS = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(2))
BUILDERS = {"phi3": tiny_phi3, "llama": tiny_llama}


def peft_dora(build, dropout: float = 0.0, **kw) -> peft.PeftModel:
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules="all-linear",
        init_lora_weights=False,
        use_dora=True,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(build(**kw), config)


def lorafit_from(reference: peft.PeftModel, build, folder, **kw) -> torch.nn.Module:
    reference.save_pretrained(folder)
    return load_adapter(build(**kw), folder)


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            # PEFT: "<path>.lora_A.default.weight", "<path>.lora_magnitude_vector.default.weight"
            key = name.replace("base_model.model.", "").replace(".default.weight", "").replace(".default", "")
            out[key] = p.grad
    return out


def step(model: torch.nn.Module) -> torch.Tensor:
    loss = model(input_ids=IDS, labels=LABELS).loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_outputs_and_gradients_equal_peft_in_fp32(arch, dropout, tmp_path) -> None:
    build = BUILDERS[arch]
    torch.manual_seed(0)
    ref = peft_dora(build, dropout)
    ours = lorafit_from(ref, build, tmp_path)
    for layer in (m for m in ours.modules() if isinstance(m, lora.Linear)):
        assert layer.use_dora and layer.lora_magnitude_vector.requires_grad
        assert getattr(layer.lora_dropout, "p", 0.0) == dropout  # from the adapter's config
    ref.train(), ours.train()
    torch.manual_seed(5)
    loss_ref = step(ref)
    torch.manual_seed(5)  # same masks: both draw nn.Dropout's, layer by layer in the same order
    loss_ours = step(ours)
    torch.testing.assert_close(loss_ours, loss_ref, atol=1e-6, rtol=0)
    theirs, mine = lora_grads(ref), lora_grads(ours)
    assert set(mine) == set(theirs) and any(".lora_magnitude_vector" in k for k in mine)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-6, rtol=1e-5, msg=key)
    ref.eval(), ours.eval()
    torch.testing.assert_close(logits(ours, IDS), logits(ref, IDS), atol=1e-6, rtol=1e-5)


def test_bf16_base_equals_peft_exactly_and_autocast_within_bf16_rounding(tmp_path) -> None:
    ref = peft_dora(tiny_llama, dtype=torch.bfloat16)
    ours = lorafit_from(ref, tiny_llama, tmp_path, dtype=torch.bfloat16)
    assert all(
        layer.lora_magnitude_vector.dtype == torch.float32
        for layer in ours.modules()
        if isinstance(layer, lora.Linear)
    )
    torch.testing.assert_close(logits(ours, IDS), logits(ref, IDS), atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = logits(ref, IDS), logits(ours, IDS)
    torch.testing.assert_close(got, expected, atol=2**-8 * expected.abs().max().item(), rtol=0)


def test_lorafit_trained_dora_adapter_loads_in_peft_and_back(tmp_path) -> None:
    model = apply_lora(tiny_phi3(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    before = logits(model, IDS)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        step(model)
        optimizer.step()
    model.eval()
    expected = logits(model, IDS)
    assert (expected - before).abs().max() > 1e-2  # it trained: A, B and the magnitudes moved
    save_adapter(model, tmp_path / "ours")
    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    magnitudes = [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == len([k for k in keys if k.endswith(".lora_A.weight")]) > 0
    assert keys[magnitudes[0]].shape == (
        keys[magnitudes[0].replace("lora_magnitude_vector", "lora_B.weight")].shape[0],
    )

    via_peft = peft.PeftModel.from_pretrained(tiny_phi3(), tmp_path / "ours")
    assert via_peft.peft_config["default"].use_dora
    torch.testing.assert_close(logits(via_peft, IDS), expected, atol=1e-6, rtol=1e-5)
    via_peft.save_pretrained(tmp_path / "peft")
    back = load_adapter(tiny_phi3(), tmp_path / "peft")
    torch.testing.assert_close(logits(back, IDS), expected, atol=1e-6, rtol=1e-5)


def test_merge_is_exact_in_fp32_and_unmerge_restores_the_base(tmp_path) -> None:
    ours = lorafit_from(peft_dora(tiny_llama), tiny_llama, tmp_path)
    base = {n: p.detach().clone() for n, p in ours.named_parameters() if n.endswith(".weight")}
    expected = logits(ours, IDS)
    merge_lora(ours)
    torch.testing.assert_close(logits(ours, IDS), expected, atol=1e-5, rtol=0)
    # a merged DoRA layer still saves W0: the update is never carried twice
    saved = ours.state_dict()
    for name, w0 in base.items():
        torch.testing.assert_close(saved[name], w0, atol=1e-6, rtol=0)
    unmerge_lora(ours)
    for name, p in ours.named_parameters():
        if name in base:
            torch.testing.assert_close(p.detach(), base[name], atol=1e-6, rtol=0)
    plain = merge_lora(copy.deepcopy(ours), unload=True)
    assert not any(isinstance(m, lora.Linear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, IDS), expected, atol=1e-5, rtol=0)


def test_dora_adapter_into_plain_lora_layers_is_refused(tmp_path) -> None:
    peft_dora(tiny_phi3).save_pretrained(tmp_path)
    plain = apply_lora(tiny_phi3(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with pytest.raises(LorafitError, match="is DoRA but this model carries plain LoRA layers"):
        load_adapter(plain, tmp_path)


def test_dora_over_a_4bit_base_equals_peft(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorafit.models.quant import QLORA_SETTINGS, prepare_kbit_model

    tiny_phi3(dtype=torch.bfloat16, hidden=64).save_pretrained(tmp_path / "base")

    def base_4bit() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(**QLORA_SETTINGS)
        )
        return prepare_kbit_model(model, QLORA_SETTINGS)

    ours = apply_lora(
        base_4bit(),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False),
    )
    layer = next(m for m in ours.modules() if isinstance(m, lora.Linear))
    assert layer.base_layer is not None and layer.lora_magnitude_vector.dtype == torch.float32
    expected = logits(ours, IDS)
    save_adapter(ours, tmp_path / "adapter")
    via_peft = peft.PeftModel.from_pretrained(base_4bit(), tmp_path / "adapter")
    torch.testing.assert_close(logits(via_peft, IDS), expected, atol=1e-5, rtol=0)
    # gradients reach A, B and the magnitudes through the 4-bit base
    ours.train()
    step(ours)
    assert all(
        layer.lora_magnitude_vector.grad is not None
        for layer in ours.modules()
        if isinstance(layer, lora.Linear)
    )
