"""PEFT-format adapters: lorafit -> PEFT / transformers, PEFT -> lorafit, and refusals."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafit.adapters import LoraConfig, apply_lora, load_adapter, read_adapter_config, save_adapter
from lorafit.errors import LorafitError

from tiny import logits, tiny_llama, tiny_phi3

IDS = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(1))
BUILDERS = {"phi3": tiny_phi3, "llama": tiny_llama}


def trained_lorafit(build, **cfg) -> torch.nn.Module:
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **cfg}
    return apply_lora(build(), LoraConfig(**cfg))


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_lorafit_adapter_loads_in_peft_and_transformers(arch, tmp_path) -> None:
    build = BUILDERS[arch]
    ours = trained_lorafit(build)
    expected = logits(ours, IDS)
    save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == f"tiny-{arch}"
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)

    via_peft = peft.PeftModel.from_pretrained(build(), tmp_path)
    torch.testing.assert_close(logits(via_peft, IDS), expected, atol=1e-6, rtol=1e-5)

    plain = build()
    plain.load_adapter(str(tmp_path))
    torch.testing.assert_close(logits(plain, IDS), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_peft_adapter_loads_in_lorafit(arch, tmp_path) -> None:
    build = BUILDERS[arch]
    ref = peft.get_peft_model(
        build(),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        ),
    )
    expected = logits(ref, IDS)
    ref.save_pretrained(tmp_path)
    ours = load_adapter(build(), tmp_path)
    torch.testing.assert_close(logits(ours, IDS), expected, atol=1e-6, rtol=1e-5)


def test_round_trip_with_bias_and_modules_to_save(tmp_path) -> None:
    ours = trained_lorafit(tiny_llama, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        ours.lm_head.weight.add_(0.01)
    expected = logits(ours, IDS)
    save_adapter(ours, tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(logits(load_adapter(tiny_llama(), tmp_path), IDS), expected)
    via_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(via_peft, IDS), expected, atol=1e-6, rtol=1e-5)


def test_adapter_for_another_base_model_is_refused_before_any_change(tmp_path) -> None:
    save_adapter(trained_lorafit(tiny_phi3, r=4), tmp_path)
    other = tiny_phi3(hidden=48)  # same names, other sizes
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LorafitError, match="another base model.*wrong shapes"):
        load_adapter(other, tmp_path)
    assert not hasattr(other, "lora_config")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(LorafitError, match="another base model.*unexpected keys.*qkv_proj"):
        load_adapter(tiny_llama(), tmp_path)  # Phi-3 names (qkv_proj ...) do not exist in Llama


def test_missing_and_unexpected_keys_are_named(tmp_path) -> None:
    save_adapter(trained_lorafit(tiny_phi3), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    dropped = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    del tensors[dropped]
    tensors["base_model.model.model.layers.9.mlp.down_proj.lora_B.weight"] = torch.zeros(1)
    save_file(tensors, str(path))
    with pytest.raises(LorafitError) as err:
        load_adapter(tiny_phi3(), tmp_path)
    assert "model.layers.1.mlp.down_proj.lora_B.weight" in str(err.value)
    assert "model.layers.9.mlp.down_proj.lora_B.weight" in str(err.value)


def test_pickled_adapter_is_refused(tmp_path) -> None:
    save_adapter(trained_lorafit(tiny_phi3), tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(LorafitError, match="pickle"):
        load_adapter(tiny_phi3(), tmp_path)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -4}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"lora_alpha": "big"}, "lora_alpha must be a positive number"),
        ({"lora_dropout": -1}, r"lora_dropout must be in \[0, 1\)"),
        ({"lora_dropout": 1.5}, r"lora_dropout must be in \[0, 1\)"),
        ({"peft_type": "PREFIX_TUNING"}, "lorafit reads LoRA adapters only"),
        ({"peft_type": "NO_SUCH_TYPE"}, "lorafit reads LoRA adapters only"),
        ({"lora_bias": True}, "a PEFT feature lorafit does not support"),
        ({"use_dora": "yes"}, "use_dora must be true or false"),
        ({"lora_alpah": 3}, "did you mean 'lora_alpha'"),
        ({"target_modules": "(qkv"}, "is not a valid regular expression"),
        ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of module names"),
        ({"rank_pattern": {"qkv_proj": 0}}, r"rank_pattern\['qkv_proj'\] must be a positive integer"),
        ({"layers_to_transform": "0"}, "layers_to_transform must be layer indices"),
    ],
)
def test_impossible_adapter_configs_are_refused(patch, message, tmp_path) -> None:
    save_adapter(trained_lorafit(tiny_phi3), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(patch)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LorafitError, match=message):
        read_adapter_config(tmp_path)


def test_truncated_adapter_weights_are_refused_before_the_model_changes(tmp_path) -> None:
    save_adapter(trained_lorafit(tiny_phi3), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    model = tiny_phi3()
    before = logits(model, IDS)
    with pytest.raises(LorafitError, match="is not a readable safetensors file"):
        load_adapter(model, tmp_path)
    assert not hasattr(model, "lora_config") and torch.equal(logits(model, IDS), before)


def test_broken_json_names_the_file(tmp_path) -> None:
    save_adapter(trained_lorafit(tiny_phi3), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LorafitError, match="adapter_config.json is not valid JSON"):
        load_adapter(tiny_phi3(), tmp_path)


def test_loading_into_a_model_that_already_has_lora(tmp_path) -> None:
    src = trained_lorafit(tiny_phi3)
    save_adapter(src, tmp_path)
    dst = apply_lora(tiny_phi3(), LoraConfig(r=4, lora_alpha=8))
    load_adapter(dst, tmp_path)
    torch.testing.assert_close(logits(dst, IDS), logits(src, IDS))
