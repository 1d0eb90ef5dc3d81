"""Tool calls, reasoning traces and per-turn control, on published chat templates.

The templates are the models' own (tests/fixtures/templates, from llama.cpp's tree); the
tokenizers are the tiny ones of conftest.py with that family's special tokens. Every mask is
checked by decoding the labelled tokens.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken

from lorafit.data import IGNORE_INDEX, build_datasets, tokenize_conversation
from lorafit.data.formats import to_conversation, to_messages
from lorafit.data.read import Record
from lorafit.data.template import PromptMismatch, TemplateCannotRender, _encode_conversations
from lorafit.errors import LorafitError

from chat_data import TOOL_CALL, TOOL_CHAT, TOOLS, labelled_runs, with_template, write_jsonl


def decoded_runs(tokenizer, example) -> list[str]:
    return [tokenizer.decode(run) for run in labelled_runs(example)]


def text_of(tokenizer, ids, labels, trained: bool) -> str:
    """The text of the labelled (or of the unlabelled) tokens."""
    return tokenizer.decode(
        [t for t, lab in zip(ids, labels, strict=True) if (lab != IGNORE_INDEX) == trained]
    )


def tool_record(**extra) -> Record:
    return Record({"messages": TOOL_CHAT, "tools": TOOLS, **extra}, "tools.jsonl line 1")


def test_qwen25_trains_the_call_and_the_answer_not_tools_or_results(make_tokenizer):
    tokenizer = with_template(make_tokenizer("chatml"), "Qwen-Qwen2.5-7B-Instruct.jinja")
    conversation = to_conversation(tool_record(), "messages")
    example = tokenize_conversation(tokenizer, conversation, max_length=4096)

    # the tokens are the template's own rendering with tools= (arguments parsed: tojson prints an object)
    rendered = tokenizer.apply_chat_template(conversation.messages, tools=TOOLS, tokenize=False)
    assert example["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert '"arguments": {"city": "Paris"}' in rendered
    assert decoded_runs(tokenizer, example) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18 C and sunny in Paris.<|im_end|>",
    ]
    context = text_of(tokenizer, example["input_ids"], example["labels"], False)
    assert "The weather in a city now." in context  # tool definitions: context
    assert "18 C and sunny" in context and "What is the weather" in context  # result, user: context


def test_llama31_renders_tools_in_the_first_user_turn(make_tokenizer):
    tokenizer = with_template(make_tokenizer("llama3"), "meta-llama-Llama-3.1-8B-Instruct.jinja")
    example = tokenize_conversation(tokenizer, to_conversation(tool_record(), "messages"), max_length=4096)
    assert decoded_runs(tokenizer, example) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 18 C and sunny in Paris.<|eot_id|>",
    ]


def test_llama31_refuses_two_calls_in_one_turn(make_tokenizer):
    tokenizer = with_template(make_tokenizer("llama3"), "meta-llama-Llama-3.2-3B-Instruct.jinja")
    chat = [dict(m) for m in TOOL_CHAT]
    chat[2]["tool_calls"] = [TOOL_CALL, TOOL_CALL]
    chat.insert(4, dict(chat[3]))
    conversation = to_conversation(Record({"messages": chat, "tools": TOOLS}, "t.jsonl line 3"), "messages")
    with pytest.raises(LorafitError, match="t.jsonl line 3: .*only supports single tool-calls"):
        tokenize_conversation(tokenizer, conversation, max_length=4096, where="t.jsonl line 3")


def test_sharegpt_function_call_and_observation_read_as_llama_factory_writes_them(make_tokenizer):
    record = Record(
        {
            "conversations": [
                {"from": "human", "value": "What is the weather in Paris?"},
                {
                    "from": "function_call",
                    "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
                },
                {"from": "observation", "value": "18 C and sunny"},
                {"from": "gpt", "value": "It is 18 C and sunny in Paris."},
            ],
            "system": "Be brief.",
            "tools": json.dumps(TOOLS),  # LLaMA-Factory stores the list as a JSON string
        },
        "lf.json record 1",
    )
    tokenizer = with_template(make_tokenizer("chatml"), "Qwen-Qwen2.5-7B-Instruct.jinja")
    sharegpt = tokenize_conversation(tokenizer, to_conversation(record, "sharegpt"), max_length=4096)
    openai = tokenize_conversation(tokenizer, to_conversation(tool_record(), "messages"), max_length=4096)
    assert sharegpt == openai  # the tool message's id and name are not rendered by Qwen2.5


def test_template_that_cannot_render_tools_is_refused_with_ways_out(tmp_path, make_tokenizer):
    tokenizer = with_template(make_tokenizer("phi3"), "microsoft-Phi-3.5-mini-instruct.jinja")
    with pytest.raises(
        TemplateCannotRender, match="does not render the tool definition 'get_weather'.*Ways out"
    ):
        tokenize_conversation(tokenizer, to_conversation(tool_record(), "messages"), max_length=4096)
    # not a bad record to skip: every tool record would train on conversations without its tools
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": TOOL_CHAT, "tools": TOOLS}] * 3)
    with pytest.raises(TemplateCannotRender, match=r"t\.jsonl line 1: "):
        build_datasets(tokenizer, train=path, skip_bad_records=True, cache_dir=tmp_path / "c", progress=False)


def test_hermes_renders_a_last_tool_result_differently_a_prompt_mismatch(make_tokenizer):
    # Hermes 3 closes the last tool result without the newline it puts inside a conversation, so
    # the prompt served after a tool result is not what training saw before the answer.
    tokenizer = with_template(make_tokenizer("chatml"), "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja")
    with pytest.raises(PromptMismatch, match="before assistant turn 4 .*never gets when served"):
        tokenize_conversation(tokenizer, to_conversation(tool_record(), "messages"), max_length=4096)
    # the call before the result is located, the answer after it is not
    calls_only = to_conversation(Record({"messages": TOOL_CHAT[:3], "tools": TOOLS}, "r"), "messages")
    example = tokenize_conversation(tokenizer, calls_only, max_length=4096)
    assert decoded_runs(tokenizer, example) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    ]


def test_gemma2_rejects_a_system_turn(make_tokenizer):
    tokenizer = with_template(make_tokenizer("chatml"), "google-gemma-2-2b-it.jinja")
    with pytest.raises(LorafitError, match="g.jsonl line 2: .*failed on this conversation \\(System role"):
        tokenize_conversation(
            tokenizer,
            to_messages(Record({"messages": TOOL_CHAT[:2] + [TOOL_CHAT[4]]}, "g.jsonl line 2"), "messages"),
            max_length=512,
            where="g.jsonl line 2",
        )


REASONING_CHAT = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "reasoning_content": "Two and two make four.", "content": "Four."},
    {"role": "user", "content": "And three plus five?"},
    {"role": "assistant", "reasoning_content": "Three and five make eight.", "content": "Eight."},
]


@pytest.mark.parametrize(
    ("reasoning", "expected"),
    [
        # Qwen3 drops the reasoning of turns before the last user turn: only its answer is there
        ("train", ["Four.<|im_end|>", "<think>\nThree and five make eight.\n</think>\n\nEight.<|im_end|>"]),
        ("drop", ["Four.<|im_end|>", "<think>\n\n</think>\n\nEight.<|im_end|>"]),
    ],
)
def test_qwen3_reasoning_as_its_template_renders_it(make_tokenizer, reasoning, expected):
    tokenizer = with_template(make_tokenizer("chatml"), "Qwen-Qwen3-0.6B.jinja")
    messages = to_messages(Record({"messages": REASONING_CHAT}, "r"), "messages")
    example = tokenize_conversation(tokenizer, messages, max_length=4096, reasoning=reasoning)
    assert decoded_runs(tokenizer, example) == expected
    rendered = tokenizer.apply_chat_template(
        [
            m if reasoning == "train" else {k: v for k, v in m.items() if k != "reasoning_content"}
            for m in messages
        ],
        tokenize=False,
    )
    assert example["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_qwen3_mask_keeps_the_trace_as_context_and_reports_dropped_traces(make_tokenizer):
    tokenizer = with_template(make_tokenizer("chatml"), "Qwen-Qwen3-0.6B.jinja")
    messages = to_messages(Record({"messages": REASONING_CHAT}, "r"), "messages")
    ids, labels, turns = _encode_conversations(
        tokenizer, [messages], ["r"], True, reasoning="mask", details=True
    )[0]
    trained = text_of(tokenizer, ids, labels, True)
    assert "Eight.<|im_end|>" in trained and "</think>" in trained and "<think>" in trained
    assert "make eight" not in trained and "make eight" in tokenizer.decode(ids)
    assert [(t.index, t.trace, t.trace_rendered, t.stopped) for t in turns] == [
        (1, True, False, True),  # the template dropped this trace
        (3, True, True, True),
    ]


@pytest.mark.parametrize(
    ("reasoning", "trained", "untrained"),
    [("train", "<think>Sum them.</think> Four.<|im_end|>", None), ("mask", "Four.<|im_end|>", "Sum them.")],
)
def test_inline_think_block_on_a_template_without_reasoning(chatml_tokenizer, reasoning, trained, untrained):
    messages = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "<think>Sum them.</think> Four."},
    ]
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=512, reasoning=reasoning)
    text = text_of(chatml_tokenizer, example["input_ids"], example["labels"], True)
    assert text.endswith(trained)
    if untrained:
        assert untrained not in text and untrained in chatml_tokenizer.decode(example["input_ids"])
    dropped = tokenize_conversation(chatml_tokenizer, messages, max_length=512, reasoning="drop")
    assert decoded_runs(chatml_tokenizer, dropped) == ["Four.<|im_end|>"]


def test_reasoning_content_is_written_inline_for_a_template_that_does_not_read_it(chatml_tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "thinking": "Greet."},
    ]
    example = tokenize_conversation(
        chatml_tokenizer, to_messages({"messages": messages}, "messages"), max_length=512
    )
    assert decoded_runs(chatml_tokenizer, example) == ["<think>\nGreet.\n</think>\n\nHello.<|im_end|>"]


def test_deepseek_r1_distill_serves_a_think_prompt_it_never_trains_after(make_tokenizer):
    # The R1-distill template strips every trace from the answers it renders, but its generation
    # prompt opens a <think> block: the served prompt is not the prefix training sees.
    tokenizer = make_tokenizer("chatml")
    tokens = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token = tokens[0], tokens[1]
    with_template(tokenizer, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja")
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>Greet.</think>Hello."},
    ]
    with pytest.raises(PromptMismatch, match=r"before assistant turn 1 .*served .*<think>.*, trained "):
        tokenize_conversation(tokenizer, messages, max_length=512)
    example = tokenize_conversation(tokenizer, messages, max_length=512, assistant_only_loss=False)
    assert "Greet" not in tokenizer.decode(example["input_ids"])  # the template drops the trace


def test_per_turn_train_false_weight_zero_and_train_on_last(chatml_tokenizer):
    chat = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Five.", "train": False},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Four.", "weight": 1},
        {"role": "user", "content": "And three plus five?"},
        {"role": "assistant", "content": "Eight."},
    ]
    messages = to_messages({"messages": chat}, "messages")
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=512)
    assert decoded_runs(chatml_tokenizer, example) == ["Four.<|im_end|>", "Eight.<|im_end|>"]
    chat[3]["weight"] = 0
    messages = to_messages({"messages": chat}, "messages")
    assert decoded_runs(
        chatml_tokenizer, tokenize_conversation(chatml_tokenizer, messages, max_length=512)
    ) == ["Eight.<|im_end|>"]
    last = tokenize_conversation(chatml_tokenizer, CHAT_ALL_TRAINED, max_length=512, train_on="last")
    assert decoded_runs(chatml_tokenizer, last) == ["Eight.<|im_end|>"]


CHAT_ALL_TRAINED = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus five?"},
    {"role": "assistant", "content": "Eight."},
]


def test_train_on_last_trains_the_last_exchange_calls_and_answer(make_tokenizer):
    tokenizer = with_template(make_tokenizer("chatml"), "Qwen-Qwen2.5-7B-Instruct.jinja")
    chat = [CHAT_ALL_TRAINED[0], CHAT_ALL_TRAINED[1], *TOOL_CHAT[1:]]
    conversation = to_conversation(Record({"messages": chat, "tools": TOOLS}, "r"), "messages")
    runs = decoded_runs(
        tokenizer, tokenize_conversation(tokenizer, conversation, max_length=4096, train_on="last")
    )
    assert len(runs) == 2 and runs[0].startswith("<tool_call>") and runs[1].startswith("It is 18 C")


@pytest.mark.parametrize(
    ("turns", "match"),
    [
        (
            [{"role": "user", "content": "x", "tool_calls": [TOOL_CALL]}],
            r"messages\[0\] is a 'user' turn with tool_calls",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
            ],
            r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is a string that is not JSON",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "tool", "content": "y"},
                {"role": "assistant", "content": "z"},
            ],
            r"turn 1 is 'tool', expected 'assistant'",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [TOOL_CALL]},
                {"role": "tool", "content": "y"},
            ],
            "ends with a tool result with no assistant reply",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0.5}],
            r"messages\[1\]\.weight is 0\.5",
        ),
        (
            [{"role": "user", "content": "x", "train": True}, {"role": "assistant", "content": "y"}],
            "only assistant turns are trained",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
            r"messages\[1\]\.content is an empty turn",
        ),
    ],
)
def test_bad_tool_and_turn_fields_name_record_and_field(turns, match):
    with pytest.raises(LorafitError, match="b.jsonl line 7: .*" + match):
        to_messages(Record({"messages": turns}, "b.jsonl line 7"), "messages")


def test_build_uses_file_tools_and_keys_its_cache_on_the_turn_settings(
    tmp_path, make_tokenizer, lorafit_cache
):
    tokenizer = with_template(make_tokenizer("chatml"), "Qwen-Qwen3-0.6B.jinja")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": TOOL_CHAT}, {"messages": REASONING_CHAT}])
    common = {"train": path, "tools": str(tools), "packing": False, "progress": False}
    _, _, trained = build_datasets(tokenizer, **common)
    _, _, masked = build_datasets(tokenizer, **common, reasoning="mask")
    assert not masked["cache_hit"] and trained["tokens"] == masked["tokens"]
    assert masked["label_tokens"] < trained["label_tokens"]
    _, _, again = build_datasets(tokenizer, **common, reasoning="mask")
    assert again["cache_hit"] and again["label_tokens"] == masked["label_tokens"]
    dataset, _, without = build_datasets(tokenizer, **{**common, "tools": None})
    assert without["tokens"] < trained["tokens"]  # the file's tools are rendered into the system turn


def test_packing_and_fingerprint_follow_the_turns_trained(tmp_path, chatml_tokenizer, lorafit_cache):
    from lorafit.data import dataset_fingerprint

    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT_ALL_TRAINED}] * 3)
    every, _, every_stats = build_datasets(chatml_tokenizer, train=path, max_length=128, progress=False)
    last, _, last_stats = build_datasets(
        chatml_tokenizer, train=path, max_length=128, progress=False, train_on="last"
    )
    # the same tokens in the same packed rows, fewer labels: another dataset for --resume's check
    assert every.rows == last.rows and every_stats["tokens"] == last_stats["tokens"]
    assert last_stats["label_tokens"] < every_stats["label_tokens"]
    assert dataset_fingerprint(every) != dataset_fingerprint(last)


def test_a_template_that_renders_tool_definitions_but_not_calls_is_refused(chatml_tokenizer):
    # the call's name is in the tool definitions, so only a rendering without the call can tell
    chatml_tokenizer.chat_template = (
        "{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    conversation = to_conversation(tool_record(), "messages")
    with pytest.raises(TemplateCannotRender, match=r"does not render the tool calls \(turn 2\)"):
        tokenize_conversation(chatml_tokenizer, conversation, max_length=4096)


def test_a_model_trained_on_these_labels_stops_after_its_call_and_after_its_answer(make_tokenizer):
    # A tiny Qwen2 learns one tool conversation from its labels alone; greedy generation from the
    # served prompts (the template's own, with tools=) must end each turn with <|im_end|>, where
    # lorafit's chat and export stop, long before max_new_tokens.
    import torch
    import transformers

    from lorafit.inference import generate
    from lorafit.models import stop_token_ids

    tokenizer = with_template(make_tokenizer("chatml"), "Qwen-Qwen2.5-7B-Instruct.jinja")
    conversation = to_conversation(tool_record(), "messages")
    example = tokenize_conversation(tokenizer, conversation, max_length=4096)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    model = transformers.Qwen2ForCausalLM(config)
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    stops = stop_token_ids(tokenizer)
    for turns, expected in (
        (2, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'),
        (4, "It is 18 C and sunny in Paris.<|im_end|>"),
    ):
        prompt = tokenizer.apply_chat_template(
            conversation.messages[:turns],
            tools=TOOLS,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        out = model.generate(
            **prompt,
            max_new_tokens=200,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
        answer = out[0, prompt["input_ids"].shape[1] :].tolist()
        assert answer[-1] in stops and len(answer) < 200
        assert tokenizer.decode(answer) == expected
    # lorafit chat's generate offers the same tools (lorafit chat --tools, or the run's data.tools)
    reply = generate(model, tokenizer, conversation.messages[:2], max_new_tokens=200, tools=TOOLS)
    assert reply == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


MISTRAL_CALL = {
    "id": "a1b2c3d4e",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}
MISTRAL_CHAT = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi! Ask me about the weather."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [MISTRAL_CALL]},
    {"role": "tool", "tool_call_id": "a1b2c3d4e", "name": "get_weather", "content": "18 C and sunny"},
    {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
]


def test_mistral_puts_tools_in_the_last_user_turn_so_only_the_last_exchange_trains(make_tokenizer):
    tokenizer = with_template(make_tokenizer("llama2"), "mistralai-Mistral-Nemo-Instruct-2407.jinja")
    conversation = to_conversation(Record({"messages": MISTRAL_CHAT, "tools": TOOLS}, "m"), "messages")
    # served before the first answer, the tools sit in the first user turn; inside the whole
    # conversation, in the last one
    with pytest.raises(PromptMismatch, match=r"before assistant turn 1 .*served '.*\[AVAILABLE_TOOLS\]"):
        tokenize_conversation(tokenizer, conversation, max_length=4096)
    last = tokenize_conversation(tokenizer, conversation, max_length=4096, train_on="last")
    assert decoded_runs(tokenizer, last) == [
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]</s>',
        "It is 18 C and sunny in Paris.</s>",
    ]
    # and a system prompt is rendered only into a prompt that ends with a user turn: never in training
    system = [{"role": "system", "content": "Be brief."}, *MISTRAL_CHAT]
    conversation = to_conversation(Record({"messages": system, "tools": TOOLS}, "m"), "messages")
    with pytest.raises(PromptMismatch, match=r"before assistant turn 4 .*served '.*Be brief"):
        tokenize_conversation(tokenizer, conversation, max_length=4096, train_on="last")


def test_empty_tool_calls_as_exports_write_them_are_no_calls():
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "tool_calls": []}]
    assert to_messages({"messages": turns}, "messages") == [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
    ]
