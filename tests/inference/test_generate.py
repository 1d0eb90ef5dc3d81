"""Batched greedy answers equal one-by-one answers, each stopping at its own end of turn."""

from __future__ import annotations

import pytest
import torch

from lorafit.adapters import LoraConfig, apply_lora
from lorafit.inference.generate import _batches, generate, generate_batch
from lorafit.inference.metrics import eval_conversations, generation_report, score_answer
from lorafit.models.attention import use_packed_attention
from lorafit.models.lean import use_lean_layers
from lorafit.models.load import stop_token_ids

from chat_data import TOOL_CHAT, TOOLS, with_template, write_jsonl
from real_models import requires_smollm2

WORDS = "the cat sat on a mat while my dog ran after some birds in our old garden today".split()


def conversations(n: int) -> list[list[dict]]:
    """``n`` conversations of different lengths and shapes (a system turn, an earlier exchange)."""
    out = []
    for i in range(n):
        question = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(2 + 3 * i))
        conversation = [{"role": "user", "content": question}]
        if i % 3 == 1:
            conversation = [{"role": "system", "content": "answer briefly"}, *conversation]
        if i % 3 == 2:
            conversation = [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi, what is it"},
                *conversation,
            ]
        out.append(conversation)
    return out


def stopping_model(tokenizer, make_tiny_phi3, scale: float = 2.0):
    """A tiny random Phi-3 whose stop tokens' head rows are scaled up, so that its greedy answers
    stop after different numbers of tokens (a random model alone rarely picks a stop token)."""
    model = make_tiny_phi3(len(tokenizer))
    with torch.no_grad():
        for token in stop_token_ids(tokenizer):
            model.lm_head.weight[token] *= scale
    return model


@pytest.mark.parametrize("family", ["phi3", "chatml"])
def test_batched_answers_equal_one_by_one_and_stop_at_their_own_end(family, make_tokenizer, make_tiny_phi3):
    tokenizer = make_tokenizer(family)
    model = stopping_model(tokenizer, make_tiny_phi3)
    asked = conversations(7)
    one_by_one = [generate(model, tokenizer, c, max_new_tokens=20) for c in asked]
    # 3 rows a batch: three batches, the prompts regrouped by length and put back in order
    answers, stats = generate_batch(model, tokenizer, asked, max_new_tokens=20, batch_rows=3)
    assert answers == one_by_one
    # the premise: rows stopped at different steps, some before the limit, one at least at it
    assert len(set(stats.lengths)) > 1 and min(stats.lengths) < 20 and max(stats.lengths) == 20
    assert stats.answers == 7 and stats.tokens == sum(stats.lengths) and stats.seconds > 0
    assert "7 answers" in stats.describe() and "tokens/s" in stats.describe()


def test_batched_answers_through_lorafits_training_patches(phi3_tokenizer, make_tiny_phi3) -> None:
    """The model as training leaves it (LoRA in train mode, packed attention, lean layers) answers
    a batch as it answers each prompt alone, and goes back to train mode."""
    model = stopping_model(phi3_tokenizer, make_tiny_phi3)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter, not the zero update
    assert use_packed_attention(model)
    assert use_lean_layers(model) > 0
    model.train()
    asked = conversations(5)
    one_by_one = [generate(model, phi3_tokenizer, c, max_new_tokens=16) for c in asked]
    assert model.training
    answers, _ = generate_batch(model, phi3_tokenizer, asked, max_new_tokens=16)
    assert model.training
    assert answers == one_by_one


def test_batches_hold_similar_lengths_within_the_row_and_token_limits() -> None:
    prompts = [[0] * n for n in (5, 50, 7, 48, 6, 200)]
    batches = _batches(prompts, max_new_tokens=10, rows=2, tokens=130)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert batches[0] == [5]  # 200 + 10 tokens: alone, over the limit
    assert batches[1] == [1, 3]  # the two near 50: 2 * (50 + 10) <= 130
    assert all(len(b) <= 2 for b in batches)
    for batch in batches[1:]:
        assert len(batch) * (max(len(prompts[i]) for i in batch) + 10) <= 130


def test_generation_report_says_how_fast(phi3_tokenizer, make_tiny_phi3) -> None:
    model = stopping_model(phi3_tokenizer, make_tiny_phi3)
    asked = [[*c, {"role": "assistant", "content": "the cat"}] for c in conversations(3)]
    said: list[str] = []
    summary, rows = generation_report(model, phi3_tokenizer, asked, max_new_tokens=8, echo=said.append)
    assert [r["answer"] for r in rows] == [
        generate(model, phi3_tokenizer, c[:-1], max_new_tokens=8) for c in asked
    ]
    assert len(said) == 1 and said[0].startswith("3 answers, ") and said[0].endswith(" tokens/s)")


def test_eval_prompts_are_rendered_with_their_tools_and_calls_are_the_reference(
    tmp_path, make_tokenizer, make_tiny_phi3
) -> None:
    # Qwen2.5's published template writes the tool schemas into the system turn
    tokenizer = with_template(make_tokenizer("chatml"), "Qwen-Qwen2.5-7B-Instruct.jinja")
    model = stopping_model(tokenizer, make_tiny_phi3)
    clock = {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    }
    # a record that ends at the call (file-wide tools), and one with its own tools ending at the answer
    path = write_jsonl(
        tmp_path / "eval.jsonl", [{"messages": TOOL_CHAT[:3]}, {"messages": TOOL_CHAT, "tools": TOOLS}]
    )
    conversations = eval_conversations(path, "messages", tools=[clock])
    assert [c.tools for c in conversations] == [[clock], TOOLS]
    summary, rows = generation_report(model, tokenizer, conversations, max_new_tokens=8)
    with_tools = [generate(model, tokenizer, c.messages[:-1], 8, tools=c.tools) for c in conversations]
    without = [generate(model, tokenizer, c.messages[:-1], 8) for c in conversations]
    assert [r["answer"] for r in rows] == with_tools and with_tools != without  # the tools were rendered
    assert [r["reference"] for r in rows] == [
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "It is 18 C and sunny in Paris.",
    ]
    assert [r["prompt"] for r in rows] == ["What is the weather in Paris?"] * 2
    # an answer that writes the call inside the template's markers contains the reference
    assert (
        score_answer(
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            rows[0]["reference"],
        )["contains"]
        == 1.0
    )


@requires_smollm2
def test_smollm2_batched_answers_equal_one_by_one(smollm2_session) -> None:
    """The real model, in float32 (what lorafit runs it in on a CPU without bf16 products), on
    the example's held-out questions: the same greedy answers batched as one by one."""
    from pathlib import Path

    model = smollm2_session.fresh_model().float()
    tokenizer = smollm2_session.tokenizer
    eval_file = Path(__file__).resolve().parents[2] / "examples" / "smollm2" / "eval.jsonl"
    asked = [c.messages[:-1] for c in eval_conversations(eval_file, "messages", limit=8)]
    one_by_one = [generate(model, tokenizer, c, max_new_tokens=24) for c in asked]
    answers, stats = generate_batch(model, tokenizer, asked, max_new_tokens=24)
    assert answers == one_by_one
    assert all(answers) and stats.tokens > 8
