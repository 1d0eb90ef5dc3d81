"""apply_lora, LoraConfig, merging and the trainable summary, checked against real PEFT."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from lorafit import lora
from lorafit.adapters import LoraConfig, apply_lora, find_targets, merge_lora, trainable_summary, unmerge_lora
from lorafit.errors import LorafitError

from test_config import PHI3_PEFT_CONFIG
from tiny import logits, phi3_config, tiny_llama, tiny_model, tiny_phi3

IDS = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def _peft_line(peft_model, capsys=None) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        peft_model.print_trainable_parameters()
    return buf.getvalue().strip()


def test_phi3_sample_peft_config_is_accepted_verbatim() -> None:
    cfg = LoraConfig.from_dict(PHI3_PEFT_CONFIG)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (16, 32, "all-linear")


def test_unknown_key_names_the_closest_valid_key() -> None:
    with pytest.raises(LorafitError, match="unknown key 'lora_alpah'.*did you mean 'lora_alpha'"):
        LoraConfig.from_dict({"r": 8, "lora_alpah": 16})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -2}, "r must be a positive integer"),
        ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
        ({"bias": "some"}, "bias must be one of none, all, lora_only"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights must be true, false or 'gaussian'"),
        ({"use_dora": 1}, "use_dora must be true or false"),
        ({"peft_type": "IA3"}, "lorafit reads LoRA adapters only"),
    ],
)
def test_impossible_values_are_refused(bad, message) -> None:
    with pytest.raises(LorafitError, match=message):
        LoraConfig.from_dict(bad)


def test_phi3_mini_all_linear_r16_count_on_meta_device() -> None:
    config = Phi3Config(
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    apply_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    assert trainable_summary(model) == (
        "trainable params: 25,165,824 || all params: 3,846,245,376 || trainable%: 0.6543"
    )


@pytest.mark.parametrize("build", [tiny_phi3, tiny_llama])
def test_summary_and_outputs_equal_peft(build) -> None:
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    ours = apply_lora(build(), LoraConfig(**cfg))
    ref = peft.get_peft_model(build(), peft.LoraConfig(**cfg))
    assert trainable_summary(ours) == _peft_line(ref)
    # Same names for the targeted layers, then copy PEFT's random A/B and compare outputs.
    ref_sd = peft.get_peft_model_state_dict(ref)
    with torch.no_grad():
        for key, value in ref_sd.items():
            path = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
            layer = ours.get_submodule(path)
            (layer.lora_A if ".lora_A." in key else layer.lora_B).copy_(value)
    torch.testing.assert_close(logits(ours, IDS), logits(ref, IDS), atol=1e-6, rtol=1e-5)


def test_weights_are_shared_not_copied_and_only_lora_trains() -> None:
    model = tiny_phi3()
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    apply_lora(model, LoraConfig(r=4, target_modules=["qkv_proj"]))
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, lora.Linear) and layer.weight is qkv
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.qkv_proj.lora_{ab}" for i in (0, 1) for ab in "AB"}
    # Fused qkv gets one pair over the whole layer, as PEFT does.
    assert layer.lora_B.shape == (qkv.shape[0], 4)


def test_all_linear_excludes_the_output_head() -> None:
    targets = find_targets(tiny_phi3(), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in targets and len(targets) == 8


def test_regex_exclude_layers_and_patterns() -> None:
    model = tiny_phi3()
    cfg = LoraConfig(
        target_modules=r".*\.(qkv|o)_proj",
        exclude_modules=["o_proj"],
        layers_to_transform=[1],
        rank_pattern={"qkv_proj": 2},
        alpha_pattern={"qkv_proj": 6},
    )
    assert find_targets(model, cfg) == ["model.layers.1.self_attn.qkv_proj"]
    apply_lora(model, cfg)
    layer = model.model.layers[1].self_attn.qkv_proj
    assert layer.r == 2 and layer.scaling == 3.0


def test_notebook_targets_that_do_not_exist_in_phi3_warn_with_real_names() -> None:
    model = tiny_phi3()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        apply_lora(
            model,
            LoraConfig(
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            ),
        )
    text = " ".join(str(x.message) for x in w)
    assert "q_proj" in text and "qkv_proj" in text and "gate_up_proj" in text


def test_targets_matching_nothing_are_an_error() -> None:
    with pytest.raises(LorafitError, match="matches no linear layer.*qkv_proj"):
        apply_lora(tiny_phi3(), LoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize(
    ("bias", "trained_biases"),
    [
        ("none", set()),
        ("lora_only", {"q_proj"}),  # the biases of the layers that got LoRA
        ("all", {"q_proj", "k_proj", "v_proj"}),
    ],
)
def test_modules_to_save_and_bias_modes(bias, trained_biases) -> None:
    config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], bias=bias)
    model = apply_lora(tiny_model("qwen2"), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable
    assert {n.rsplit(".", 2)[-2] for n in trainable if n.endswith(".bias")} == trained_biases
    assert {f"model.layers.{i}.self_attn.q_proj.lora_A" for i in range(2)} <= trainable
    assert not any(n.endswith("proj.weight") for n in trainable)


def test_gradient_checkpointing_with_frozen_embeddings() -> None:
    model = tiny_phi3()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)


def test_bf16_base_with_fp32_lora_matches_peft() -> None:
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ours = apply_lora(tiny_phi3(dtype=torch.bfloat16), LoraConfig(**cfg))
    ref = peft.get_peft_model(tiny_phi3(dtype=torch.bfloat16), peft.LoraConfig(**cfg))
    layer = ours.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        for key, value in peft.get_peft_model_state_dict(ref).items():
            path = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
            mod = ours.get_submodule(path)
            (mod.lora_A if ".lora_A." in key else mod.lora_B).copy_(value)
    torch.testing.assert_close(logits(ours, IDS), logits(ref, IDS), atol=0, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_merge_equals_adapter_and_unmerge_restores(dtype, atol) -> None:
    model = apply_lora(tiny_phi3(dtype=dtype), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    before = logits(model, IDS)
    w0 = model.model.layers[0].self_attn.qkv_proj.weight.clone()
    merge_lora(model)
    merge_lora(model)  # idempotent
    torch.testing.assert_close(logits(model, IDS), before, atol=atol, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(
        model.model.layers[0].self_attn.qkv_proj.weight,
        w0,
        atol=1e-6 if dtype == torch.float32 else 2e-2,
        rtol=1e-5,
    )


def test_merge_refuses_non_finite_and_changes_nothing() -> None:
    model = apply_lora(tiny_phi3(), LoraConfig(r=4))
    w0 = model.model.layers[0].self_attn.qkv_proj.weight.clone()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_B.fill_(float("inf"))
    with pytest.raises(LorafitError, match="not finite"):
        merge_lora(model)
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, w0)


def test_unload_leaves_plain_linear_layers(tmp_path) -> None:
    model = apply_lora(tiny_phi3(), LoraConfig(r=4, init_lora_weights=False))
    expected = logits(model, IDS)
    merge_lora(model, unload=True)
    assert not any(isinstance(m, lora.LoRALayer) for m in model.modules())
    model.save_pretrained(tmp_path)
    reloaded = Phi3ForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, IDS), expected, atol=1e-5, rtol=1e-5)


def test_phi3_config_helper_is_phi3() -> None:
    assert phi3_config().model_type == "phi3"


@pytest.mark.parametrize("checkpointing_first", [True, False])
def test_input_grad_hook_is_registered_once(checkpointing_first) -> None:
    model = tiny_phi3().train()
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": True}}
    if checkpointing_first:
        model.gradient_checkpointing_enable(**kwargs)
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    if not checkpointing_first:
        model.gradient_checkpointing_enable(**kwargs)  # what Trainer does after lorafit's apply_lora
    assert len(model.get_input_embeddings()._forward_hooks) == 1
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_checkpointing_replays_lora_dropout_under_autocast(monkeypatch) -> None:
    """Recomputed forward passes draw the same dropout masks (in parallel pieces too)."""
    monkeypatch.setattr(lora.ops, "_PARALLEL_MASK_MIN", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # the test suite runs one thread

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model = apply_lora(tiny_phi3(), LoraConfig(r=4, lora_dropout=0.3, init_lora_weights=False))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=IDS, labels=IDS, use_cache=False).loss
        loss.backward()
        return [p.grad for n, p in model.named_parameters() if "lora_" in n]

    plain, checkpointed = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed, strict=True))


def test_save_pretrained_writes_the_adapter_until_lora_is_unloaded(tmp_path) -> None:
    """As PEFT's PeftModel: save_pretrained of a LoRA model writes the adapter, which PEFT loads;
    the whole model only once the update is folded in and the LoRA layers are gone."""
    from transformers import AutoModelForCausalLM

    model = apply_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    expected = logits(model, IDS)
    merge_lora(model)  # merged in place, LoRA layers still there
    model.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    via_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(logits(via_peft, IDS), expected, atol=1e-5, rtol=0)
    copy.deepcopy(model).save_pretrained(tmp_path / "copied")  # the method survives a copy
    assert (tmp_path / "copied" / "adapter_model.safetensors").is_file()
    model.save_pretrained(tmp_path / "not-main", is_main_process=False)  # as Trainer's other ranks
    assert not (tmp_path / "not-main").exists()
    with pytest.raises(LorafitError, match=r"not max_shard_size.*merge_lora\(model, unload=True\)"):
        model.save_pretrained(tmp_path / "wrong", max_shard_size="1GB")
    with pytest.raises(LorafitError, match="stage3_gather_16bit_weights_on_model_save"):
        model.save_pretrained(tmp_path / "wrong", state_dict={})  # what ZeRO-3 hands over ungathered
    assert not (tmp_path / "wrong").exists()
    merge_lora(model, unload=True)
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, IDS), expected, atol=1e-5, rtol=0)
