"""Streaming a 16-bit safetensors folder into a 4-bit model (lorafit.models.quant_load).

The reference is transformers' own quantization while loading (``from_pretrained`` with a
``BitsAndBytesConfig``): the streamed model must hold the same bits (NF4 codes, absmax, the double
quantization's state) and give the same logits exactly, for a single file, a sharded folder and a
model whose head is tied to its embedding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lorafit.config import build_config
from lorafit.errors import LorafitError
from lorafit.models.load import decide_precision, load_model
from lorafit.models.quant import QLORA_SETTINGS
from lorafit.models.quant_load import load_4bit, read_header

from tiny import tiny_phi3

bnb = pytest.importorskip("bitsandbytes")

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def reference(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(**QLORA_SETTINGS)
    )


def assert_same_model(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert sorted(ours_sd) == sorted(ref_sd)
    for key, value in ref_sd.items():
        assert ours_sd[key].dtype == value.dtype, key
        assert torch.equal(ours_sd[key], value), key
    for (name, a), (_, b) in zip(ours.named_modules(), ref.named_modules(), strict=True):
        assert type(a) is type(b), name
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, ref(input_ids=IDS).logits)


@pytest.mark.parametrize(
    ("shard", "tied"), [(None, False), ("20KB", False), (None, True)], ids=["one-file", "sharded", "tied"]
)
def test_streamed_4bit_model_is_transformers_quantization_bit_for_bit(tmp_path, shard, tied) -> None:
    folder = tmp_path / "tiny"
    kwargs = {"max_shard_size": shard} if shard else {}
    tiny_phi3(dtype=torch.bfloat16, hidden=64, tie_word_embeddings=tied).save_pretrained(folder, **kwargs)
    if shard:
        assert len(list(folder.glob("*.safetensors"))) > 2
    ours = load_4bit(folder, QLORA_SETTINGS, dtype=torch.bfloat16, attn_implementation="sdpa")
    assert ours is not None
    quantized = [m for m in ours.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 4 and all(m.weight.bnb_quantized for m in quantized)
    head = ours.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.bfloat16
    assert (head.weight is ours.get_input_embeddings().weight) == tied
    assert_same_model(ours, reference(folder))


def test_load_model_streams_a_local_folder_and_trains_on_it(tmp_path) -> None:
    folder = tmp_path / "tiny"
    tiny_phi3(dtype=torch.bfloat16, hidden=64).save_pretrained(folder)
    cfg = build_config(
        {
            "model": {"name_or_path": str(folder), "torch_dtype": "bfloat16", "quantization": QLORA_SETTINGS},
            "training_config": {"use_cpu": True},
        }
    )

    class Tok:
        eos_token_id, pad_token_id, chat_template = 2, 0, None

    precision = decide_precision(cfg.model, cfg.training_config, training=True)
    model = load_model(cfg.model, Tok(), precision, echo=lambda *_: None)
    assert not hasattr(model, "hf_quantizer") or model.hf_quantizer is None  # ours, not from_pretrained
    assert model.is_quantized and not any(p.requires_grad for p in model.parameters())
    ref = reference(folder)
    ref_weight = ref.model.layers[0].mlp.down_proj.weight
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, ref_weight)


def test_folders_it_does_not_read_fall_back_to_transformers(tmp_path) -> None:
    assert load_4bit(tmp_path, QLORA_SETTINGS, dtype=torch.bfloat16, attn_implementation="sdpa") is None
    folder = tmp_path / "renamed"
    tiny_phi3(dtype=torch.bfloat16, hidden=64).save_pretrained(folder)
    # a checkpoint whose names are not the model's (transformers renames some while loading)
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].decode().replace("model.norm.weight", "model.final_norm.gamma")
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + raw[8 + n :])
    assert load_4bit(folder, QLORA_SETTINGS, dtype=torch.bfloat16, attn_implementation="sdpa") is None


def test_a_truncated_or_inconsistent_checkpoint_names_the_file_and_tensor(tmp_path) -> None:
    folder = tmp_path / "tiny"
    tiny_phi3(dtype=torch.bfloat16, hidden=64).save_pretrained(folder)
    path = folder / "model.safetensors"
    header, start = read_header(path)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    path.write_bytes(path.read_bytes()[: start + header[last]["data_offsets"][1] - 2])
    with pytest.raises(
        LorafitError, match=rf"model\.safetensors: the file ends inside tensor {re.escape(last)}"
    ):
        load_4bit(folder, QLORA_SETTINGS, dtype=torch.bfloat16, attn_implementation="sdpa")
    n = int.from_bytes(path.read_bytes()[:8], "little")
    entries = json.loads(path.read_bytes()[8 : 8 + n])
    entries[last]["dtype"] = "F8_E5M2"
    body = json.dumps(entries).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(LorafitError, match=rf"tensor {re.escape(last)} has dtype 'F8_E5M2'"):
        load_4bit(folder, QLORA_SETTINGS, dtype=torch.bfloat16, attn_implementation="sdpa")


def _rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux /proc only")
def test_no_page_of_the_16bit_checkpoint_stays_resident(tmp_path) -> None:
    folder = tmp_path / "wide"
    tiny_phi3(dtype=torch.bfloat16, hidden=1024, layers=2).save_pretrained(folder)
    size = (folder / "model.safetensors").stat().st_size
    assert size > 40e6
    load_4bit(folder, QLORA_SETTINGS, dtype=torch.bfloat16, attn_implementation="sdpa")  # imports, caches
    before = _rss_file()
    model = load_4bit(folder, QLORA_SETTINGS, dtype=torch.bfloat16, attn_implementation="sdpa")
    # read, not mapped: the file's pages are the page cache's, none of them the process's
    assert _rss_file() - before < 0.05 * size
    assert model is not None
