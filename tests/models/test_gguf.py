"""GGUF files as base models (lorafit.models.gguf), on the real SmolLM2-135M-Instruct GGUF file.

The file is read by transformers' GGUF loader and by gguf-py, the references; the adapter is read
by PEFT. The error tests need no model: they cut the real file, or write tiny GGUF files with
gguf-py's own writer. Everything else shares one conversion per session (``smollm2_session``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafit.data import PackedCollator, PaddedCollator, build_datasets, pack, tokenize_conversation
from lorafit.errors import LorafitError
from lorafit.models.gguf import (
    SOURCE_NAME,
    gguf_base_name,
    gguf_cache_dir,
    is_gguf,
    load_gguf,
    read_gguf_header,
)

from real_models import requires_smollm2, smollm2_gguf

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "smollm2"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IGNORE = -100


def read_jsonl(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]


def write_tiny_gguf(path: Path, architecture: str) -> Path:
    """A well-formed GGUF file (gguf-py's writer) with one small tensor, of any architecture."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_nothing_written(cache: Path) -> None:
    written = sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []
    assert written == [], f"files left in the cache after an error: {written}"


# --------------------------------------------------------------------------------------------
# The header walk and the errors (no model loaded)
# --------------------------------------------------------------------------------------------


@requires_smollm2
def test_header_agrees_with_gguf_reader() -> None:
    import gguf

    path = smollm2_gguf()
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    assert header.architecture == "llama" == reader.fields["general.architecture"].contents()
    assert header.version == 3
    assert header.tensor_count == len(reader.tensors) == 272
    assert header.n_elements == sum(int(t.n_elements) for t in reader.tensors)
    # the last tensor's data ends exactly at the end of a complete file
    assert header.data_end == max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert header.data_end == path.stat().st_size


def test_missing_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(LorafitError, match=r"GGUF file .*nope\.gguf does not exist.*hub id"):
        load_gguf(tmp_path / "nope.gguf", cache_dir=cache)
    assert_nothing_written(cache)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text('{"architectures": ["LlamaForCausalLM"]}')
    cache = tmp_path / "cache"
    with pytest.raises(LorafitError, match=r"model\.gguf is not a GGUF file: it starts with b'\{\"ar'"):
        load_gguf(fake, cache_dir=cache)
    with pytest.raises(LorafitError, match="is a folder, not a GGUF file"):
        load_gguf(tmp_path, cache_dir=cache)
    assert_nothing_written(cache)


@requires_smollm2
@pytest.mark.parametrize(
    "keep, message",
    [
        # cut inside the tensor data: the header is whole, so the shortfall is exact
        (60_000_000, r"is truncated: it is 60,000,000 bytes, but .* runs to 98,362,432 bytes \(38,362,432"),
        # cut inside the vocabulary's merges (metadata entry 27 of 33)
        (1_000_000, r"truncated or corrupt: .* \(1,000,000 bytes\) while reading metadata entry 27 of 33 "),
        (3, r"truncated or corrupt: .* \(3 bytes\) while reading its magic bytes"),
    ],
)
def test_truncated_file(tmp_path: Path, keep: int, message: str) -> None:
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf(), "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(keep))
    cache = tmp_path / "cache"
    with pytest.raises(LorafitError, match=message):
        load_gguf(cut, cache_dir=cache)
    assert_nothing_written(cache)


def test_corrupt_header(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    raw = bytearray(path.read_bytes())
    # the value type of the first metadata entry (after magic, version, 2 counts, key length, key)
    key_len = int.from_bytes(raw[24:32], "little")
    raw[32 + key_len : 36 + key_len] = (77).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(LorafitError, match=r"is corrupt: metadata entry 1 of .* holds value type 77"):
        read_gguf_header(path)


def test_architecture_transformers_cannot_load(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "mamba2.gguf", "mamba2")
    assert read_gguf_header(path).architecture == "mamba2"  # a sound file: transformers refuses it
    cache = tmp_path / "cache"
    with pytest.raises(LorafitError, match=r"holds a 'mamba2' model, which transformers .* cannot load") as e:
        load_gguf(path, cache_dir=cache)
    assert "llama" in str(e.value) and "qwen2" in str(e.value)  # the architectures it does load
    assert_nothing_written(cache)


def test_is_gguf_and_base_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = tmp_path / "sha256-0123abcd"  # how Ollama names its model blobs
    write_tiny_gguf(blob, "llama")
    assert is_gguf(blob) and is_gguf(tmp_path / "missing.GGUF")  # a missing .gguf: the GGUF error
    assert not is_gguf(tmp_path) and not is_gguf("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "notes.txt").write_text("GGU")
    assert not is_gguf(tmp_path / "notes.txt")
    monkeypatch.chdir(tmp_path)
    assert gguf_base_name("sha256-0123abcd") == str(blob.resolve())


def test_cache_key_follows_the_file(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    first = gguf_cache_dir(path, dtype=torch.bfloat16, cache_dir=tmp_path)
    assert first.parent == tmp_path / "gguf" and first.name.startswith("tiny-bfloat16-")
    assert gguf_cache_dir(path, dtype="bfloat16", cache_dir=tmp_path) == first
    assert gguf_cache_dir(path, dtype=torch.float32, cache_dir=tmp_path) != first
    assert gguf_cache_dir(path, dtype="auto", cache_dir=tmp_path) == gguf_cache_dir(
        path, dtype=torch.float32, cache_dir=tmp_path
    )
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: a new key
    assert gguf_cache_dir(path, dtype=torch.bfloat16, cache_dir=tmp_path) != first
    with pytest.raises(LorafitError, match="model.torch_dtype takes bfloat16, float16, float32 or auto"):
        gguf_cache_dir(path, dtype=torch.int8, cache_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# The real model (one conversion per session)
# --------------------------------------------------------------------------------------------


@requires_smollm2
def test_cache_folder_is_a_plain_transformers_folder(smollm2_session) -> None:
    s = smollm2_session
    folder = gguf_cache_dir(s.gguf, dtype=torch.bfloat16, cache_dir=s.cache_dir)
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        SOURCE_NAME,
    } <= names
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left
    source = json.loads((folder / SOURCE_NAME).read_text())
    assert source["gguf_file"] == str(s.gguf) and source["architecture"] == "llama"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    # the second load came from safetensors, far faster than the conversion
    print(f"load times: first (conversion) {s.seconds['first']:.1f} s, cached {s.seconds['cached']:.1f} s")
    assert s.seconds["cached"] < s.seconds["first"] / 3, s.seconds


@requires_smollm2
def test_weights_are_dense_in_the_requested_dtype(smollm2_session) -> None:
    for model in (smollm2_session.from_gguf, smollm2_session.model):
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 30 * 7 + 1  # q k v o gate up down per layer, and the head
        assert all(type(m) is torch.nn.Linear for m in linears)  # no packed GGUF layers
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert getattr(model, "hf_quantizer", None) is None
    cached = smollm2_session.model.state_dict()
    for name, tensor in smollm2_session.from_gguf.state_dict().items():
        assert torch.equal(tensor, cached[name]), name


@requires_smollm2
def test_gguf_and_cache_generate_the_same_greedy_tokens(smollm2_session) -> None:
    s = smollm2_session
    assert s.tokenizer.chat_template == s.gguf_tokenizer.chat_template
    assert SMOLLM2_SYSTEM in s.tokenizer.chat_template  # the template came from the file
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompts = [
        tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        for tok in (s.gguf_tokenizer, s.tokenizer)
    ]
    assert torch.equal(prompts[0]["input_ids"], prompts[1]["input_ids"])
    outputs = [
        model.generate(**prompts[0], max_new_tokens=12, do_sample=False)[
            0, prompts[0]["input_ids"].shape[1] :
        ]
        for model in (s.from_gguf, s.model)
    ]
    assert torch.equal(outputs[0], outputs[1])
    # and the conversion is right, not merely the same twice: a real answer, ended by <|im_end|>
    answer = s.tokenizer.decode(outputs[0])
    assert "Paris" in answer and "<|im_end|>" in answer, answer


@requires_smollm2
def test_train_loads_a_gguf_base_and_records_the_file(smollm2_session, monkeypatch) -> None:
    from lorafit.config import build_config
    from lorafit.models import load_model, load_tokenizer
    from lorafit.models.load import decide_precision
    from lorafit.training.run import add_lora

    monkeypatch.setenv("LORAFIT_CACHE", str(smollm2_session.cache_dir))  # the session's conversion
    cfg = build_config(
        {
            "model": {"name_or_path": str(smollm2_session.gguf)},
            "peft_config": {"r": 4, "target_modules": ["q_proj"]},
        }
    )
    precision = decide_precision(cfg.model, cfg.training_config)
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer, precision)
    assert tokenizer.chat_template == smollm2_session.tokenizer.chat_template
    model = add_lora(load_model(cfg.model, tokenizer, precision), cfg)
    assert model.lora_config.base_model_name_or_path == str(smollm2_session.gguf)
    assert model.dtype == precision.load_dtype and type(model).__name__ == "LlamaForCausalLM"


# --------------------------------------------------------------------------------------------
# Assistant-only labels and packing on SmolLM2's real ChatML template
# --------------------------------------------------------------------------------------------


def label_runs(example: dict) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive label positions."""
    runs, start = [], None
    labels = list(example["labels"]) + [IGNORE]
    for i, label in enumerate(labels):
        if label != IGNORE and start is None:
            start = i
        if label == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


@requires_smollm2
@pytest.mark.parametrize("with_system", [False, True])
def test_labels_are_exactly_the_answers_and_im_end(smollm2_session, with_system: bool) -> None:
    tok = smollm2_session.tokenizer
    answers = ["It costs 89 euros.", "Odessa Marlowe-Finch founded it in 2011."]
    messages = [
        {"role": "user", "content": "How much does the Quillmoor K7 cost?"},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "Who founded Brindlewick Instruments, and when?"},
        {"role": "assistant", "content": answers[1]},
    ]
    if with_system:
        messages.insert(0, {"role": "system", "content": "Answer in one sentence."})
    example = tokenize_conversation(tok, messages, max_length=512)
    ids = list(example["input_ids"])
    labels = list(example["labels"])
    assert all(label in (IGNORE, ids[i]) for i, label in enumerate(labels))  # a label is its own token
    text = tok.decode(ids)
    # SmolLM2's template injects its own system prompt when the conversation has none
    assert (SMOLLM2_SYSTEM in text) is not with_system and ("Answer in one sentence." in text) is with_system
    runs = label_runs(example)
    assert [tok.decode(ids[a:b]) for a, b in runs] == [a + "<|im_end|>" for a in answers]
    for a, b in runs:
        assert tok.decode(ids[:a]).endswith("<|im_start|>assistant\n")  # the header is masked
        assert tok.decode(ids[b : b + 1]) == "\n"  # the newline after <|im_end|> is not a label
    # no token more: each answer's own tokens plus one <|im_end|>
    n_labels = sum(label != IGNORE for label in labels)
    assert n_labels == sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    # every system, user and header token is masked
    masked = tok.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE])
    assert "How much does the Quillmoor K7 cost?" in masked and "<|im_start|>system" in masked


@requires_smollm2
def test_packed_rows_hold_each_example_once_with_its_labels(smollm2_session, tmp_path: Path) -> None:
    tok = smollm2_session.tokenizer
    train, _, stats = build_datasets(
        tok, train=EXAMPLES / "train.jsonl", max_length=256, packing=True, cache_dir=tmp_path, progress=False
    )
    conversations = read_jsonl(EXAMPLES / "train.jsonl")
    singles = [tokenize_conversation(tok, c, max_length=256) for c in conversations]
    assert stats["examples"] == len(conversations) == len(singles)
    assert train.rows == pack([len(s["input_ids"]) for s in singles], 256)
    assert sorted(i for row in train.rows for i in row) == list(range(len(singles)))
    assert len(train.rows) < len(singles) / 3  # rows hold several examples each
    batch = PackedCollator(tok.pad_token_id)([train[i] for i in range(len(train))])
    for b, row in enumerate(train.rows):
        offset = 0
        for i in row:
            n = len(singles[i]["input_ids"])
            span = slice(offset, offset + n)
            assert batch["input_ids"][b, span].tolist() == list(singles[i]["input_ids"])
            assert batch["position_ids"][b, span].tolist() == list(range(n))  # restart per example
            labels = batch["labels"][b, span].tolist()
            # as alone, except the first label (-100 anyway: it is the system header)
            assert labels[0] == IGNORE and labels[1:] == list(singles[i]["labels"])[1:]
            answer = conversations[i][-1]["content"]
            assert tok.decode([t for t in labels if t != IGNORE]) == answer + "<|im_end|>"
            offset += n
        assert (batch["labels"][b, offset:] == IGNORE).all()  # padding


@requires_smollm2
@pytest.mark.parametrize("attention", ["sdpa", "lorafit_packed"])
def test_a_packed_row_scores_like_its_examples_alone(smollm2_session, smollm2_fp32, attention: str) -> None:
    from lorafit.models.attention import use_packed_attention

    tok = smollm2_session.tokenizer
    conversations = read_jsonl(EXAMPLES / "train.jsonl")[:3]
    singles = [tokenize_conversation(tok, c, max_length=256) for c in conversations]
    model = smollm2_fp32
    if attention == "lorafit_packed":
        assert use_packed_attention(model)
    try:
        row = PackedCollator(tok.pad_token_id, example_boundaries=attention == "lorafit_packed")([singles])
        with torch.no_grad():
            packed = model(**{k: v for k, v in row.items() if k != "labels"}, use_cache=False).logits[0]
            offset, worst = 0, 0.0
            for s in singles:
                alone = model(input_ids=torch.tensor([list(s["input_ids"])]), use_cache=False).logits[0]
                n = alone.shape[0]
                worst = max(worst, (packed[offset : offset + n] - alone).abs().max().item())
                offset += n
    finally:
        model.set_attn_implementation("sdpa")
    print(f"{attention}: max |packed - alone| logit difference {worst:.2e}")  # shown with pytest -rP
    # an example that saw its neighbour would differ by whole logits; fp32 rounding is ~1e-4
    assert worst < 2e-3, worst


# --------------------------------------------------------------------------------------------
# LoRA on SmolLM2: it learns, and PEFT reads its adapter
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_session):
    """The dense bf16 weights in fp32: this CPU has no bf16 matmul units, so fp32 runs ~9x faster."""
    return smollm2_session.fresh_model().float()


def eval_loss(model: torch.nn.Module, examples: list[dict], pad_id: int) -> float:
    """Mean cross-entropy over all label tokens of ``examples`` (one padded batch)."""
    batch = PaddedCollator(pad_id)(examples)
    with torch.no_grad():
        return model(**batch, use_cache=False).loss.item()


@pytest.fixture(scope="module")
def trained(smollm2_session, tmp_path_factory):
    """LoRA r=8 on all linear layers of SmolLM2 (fp32), 4 steps on one phrasing of each of 5 facts.

    Held out: the 10 other phrasings of those questions in examples/smollm2/eval.jsonl, whose
    reference answers state the trained facts. 5 facts and 4 full-batch steps keep it to ~300
    tokens a step. Returns the model, the held-out losses before and after, and the adapter folder.
    """
    from lorafit.adapters import LoraConfig, apply_lora, save_adapter
    from lorafit.training.loss import causal_lm_loss

    tok = smollm2_session.tokenizer
    held_out = read_jsonl(EXAMPLES / "eval.jsonl")
    facts = [c[-1]["content"] for c in held_out][:5]
    held_out = [c for c in held_out if c[-1]["content"] in facts]
    train = [c for c in read_jsonl(EXAMPLES / "train.jsonl") if c[-1]["content"] in facts]
    assert len(train) == 5 and len(held_out) == 10
    train = [tokenize_conversation(tok, c, max_length=256) for c in train]
    held_out = [tokenize_conversation(tok, c, max_length=256) for c in held_out]
    torch.manual_seed(0)
    model = smollm2_session.fresh_model().float()
    before = eval_loss(model, held_out, tok.pad_token_id)
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    rows = PackedCollator(tok.pad_token_id)(
        [[train[i] for i in row] for row in pack([len(e["input_ids"]) for e in train], 256)]
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0
    )
    model.train()
    for _ in range(4):
        causal_lm_loss(model, rows).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = eval_loss(model, held_out, tok.pad_token_id)
    folder = save_adapter(model, tmp_path_factory.mktemp("smollm2-adapter"))
    return model, before, after, folder


@requires_smollm2
def test_lora_lowers_held_out_loss(trained) -> None:
    _, before, after, _ = trained
    print(f"held-out loss {before:.3f} -> {after:.3f}")  # shown with pytest -rP
    # The untouched model scores the invented facts at 2.8 nats a token (measured: 2.79 -> 0.64);
    # fitting one phrasing of each fact must carry over to the other phrasings of its question.
    # A LoRA that learned nothing leaves the loss where it was; noise raises it.
    assert after < 0.5 * before, (before, after)


@requires_smollm2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_loads_in_peft_with_equal_logits(trained, smollm2_session, dtype: torch.dtype) -> None:
    import peft

    from lorafit.adapters import load_adapter

    _, _, _, folder = trained
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    ours = load_adapter(smollm2_session.fresh_model().to(dtype), folder).eval()
    via_peft = peft.PeftModel.from_pretrained(smollm2_session.fresh_model().to(dtype), folder).eval()
    messages = read_jsonl(EXAMPLES / "eval.jsonl")[0][:1]
    ids = smollm2_session.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        logits = ours(input_ids=ids).logits.float()
        peft_logits = via_peft(input_ids=ids).logits.float()
        with via_peft.disable_adapter():
            base_logits = via_peft(input_ids=ids).logits.float()
    diff = (logits - peft_logits).abs().max().item()
    print(f"{dtype}: max |lorafit - PEFT| logit difference {diff:.2e}")  # shown with pytest -rP
    # measured 0 in both dtypes here; bf16 leaves room for kernels that sum in another order
    assert diff < (1e-4 if dtype == torch.float32 else 0.1), diff
    assert torch.equal(logits.argmax(-1), peft_logits.argmax(-1))
    # and it is the trained adapter, not a no-op: the base alone differs by whole logits
    assert (base_logits - logits).abs().max().item() > 1.0
