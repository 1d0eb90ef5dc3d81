"""The model stops: after a short LoRA run, greedy answers end with the template's end-of-turn
token, in lorafit's generation and in llama.cpp through the GGUF that ``lorafit export`` writes,
rather than running to ``max_new_tokens``.

The commands are the real CLI (``lorafit train``, ``lorafit export``) in process, on the tiny demo
model (Phi-3's architecture and chat format, random weights): before training it never ends a turn
(``<|end|>`` is one token in 1,536), so an answer that stops shows that the end of the turn was
trained, and the same tokens from llama.cpp, stopping where the GGUF's vocabulary marks
end-of-generation, show that it survives export. The same on the real SmolLM2-135M-Instruct with
a tool-calling template (Qwen2.5's) and the tool-calling example's data: before training some
held-out requests run to the limit; after a short run every answer ends with ``<|im_end|>``, in
lorafit and in llama.cpp (``examples/smollm2/tools/score_calls.py`` also scores the calls).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from lorafit.cli import main
from lorafit.export.llama_cpp import llama_cpp_greedy, load_in_llama_cpp
from lorafit.models.load import decide_precision, load_model, run_config, stop_token_ids

# Invented answers the base model cannot give; short, so that a run of a few steps learns them.
FACTS = [
    ("What is the ferry code?", "The ferry code is 4471."),
    ("Who keeps the Varnholt lighthouse?", "Odile Brask keeps it."),
    ("What colour is the harbour flag?", "It is teal."),
    ("Where does Pim the heron sleep?", "Pim sleeps on the pier."),
]
MAX_NEW_TOKENS = 24  # each answer is under 16 tokens; a model that does not stop runs to this
STEPS = 80  # 4 rows of up to 64 tokens a step: well under a minute on the tiny model


def test_a_short_run_stops_at_its_end_of_turn_in_lorafit_and_in_llama_cpp(tmp_path) -> None:
    from lorafit.models import load_trained

    torch.set_num_threads(1)
    data = tmp_path / "facts.jsonl"
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in FACTS]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8")
    run = tmp_path / "run"
    args = ["train", "--data.train", str(data), "--data.max_length", "64", "--data.packing", "false"]
    args += ["--data.eval_prompts", "0", "--model.torch_dtype", "float32", "--peft_config.lora_dropout", "0"]
    args += ["--training_config.learning_rate", "5e-3", "--training_config.max_steps", str(STEPS)]
    args += ["--training_config.per_device_train_batch_size", "4", "--training_config.warmup_steps", "0"]
    args += ["--training_config.gradient_accumulation_steps", "1", "--training_config.save_strategy", "no"]
    args += ["--training_config.eval_strategy", "no", "--training_config.report_to", "none"]
    args += ["--training_config.lr_scheduler_type", "cosine", "--training_config.logging_steps", "10"]
    args += ["--training_config.seed", "0", "--training_config.output_dir", str(run)]
    assert main(args) == 0

    cfg, tokenizer, model = load_trained(run, echo=lambda _: None)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|end|>")
    stops = stop_token_ids(tokenizer)
    assert end_of_turn in stops
    base_cfg = run_config(run)
    precision = decide_precision(base_cfg.model, base_cfg.training_config)
    base = load_model(base_cfg.model, tokenizer, precision, echo=lambda _: None).eval()
    gguf = tmp_path / "out" / "model.gguf"
    assert main(["export", "--adapter", str(run), "--out", str(gguf)]) == 0
    served_by = load_in_llama_cpp(gguf) if importlib.util.find_spec("cyllama") is not None else None
    for question, answer in FACTS:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
        )
        before = greedy(base, prompt, stops)
        assert len(before) == MAX_NEW_TOKENS and not set(before) & set(stops)  # the premise: no stop
        out = greedy(model, prompt, stops)
        # learned, and ended with the end-of-turn token well before max_new_tokens
        assert tokenizer.decode(out[:-1]).strip() == answer, (question, tokenizer.decode(out))
        assert out[-1] == end_of_turn and len(out) < MAX_NEW_TOKENS
        if served_by is not None:
            served, stopped = llama_cpp_greedy(served_by, prompt, MAX_NEW_TOKENS)
            assert stopped and served == out, (question, tokenizer.decode(served))


def greedy(model: torch.nn.Module, prompt: list[int], stops: list[int]) -> list[int]:
    """The new tokens of ``model.generate``, greedy, up to the first stop token (included)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=stops[0],
        )
    return out[0, len(prompt) :].tolist()


ROOT = Path(__file__).resolve().parents[1]
TOOLS_EXAMPLE = ROOT / "examples" / "smollm2" / "tools"
TOOL_TEMPLATE = ROOT / "tests" / "fixtures" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"
SMOL_STEPS = 16  # the example's run: 2 records a step, about one pass over its 30 conversations
SMOL_NEW_TOKENS = 80  # a call to one of the example's tools is under 40 tokens


def test_smollm2_with_a_tool_calling_template_stops_after_a_short_run(smollm2_session, tmp_path, monkeypatch):
    from lorafit.data.build import load_tools
    from lorafit.inference.generate import generate_batch
    from lorafit.inference.metrics import eval_conversations
    from lorafit.models import load_trained

    torch.set_num_threads(2)
    monkeypatch.setenv("LORAFIT_CACHE", str(smollm2_session.cache_dir))  # the session's converted copy
    run = tmp_path / "run"
    args = ["train", "--model.name_or_path", str(smollm2_session.gguf), "--model.torch_dtype", "float32"]
    args += [
        "--tokenizer.chat_template",
        str(TOOL_TEMPLATE),
        "--data.train",
        str(TOOLS_EXAMPLE / "train.jsonl"),
    ]
    args += ["--data.tools", str(TOOLS_EXAMPLE / "tools.json"), "--data.max_length", "640"]
    args += ["--data.eval_prompts", "0", "--peft_config.r", "16", "--peft_config.lora_alpha", "32"]
    args += ["--training_config.learning_rate", "1e-3", "--training_config.max_steps", str(SMOL_STEPS)]
    args += ["--training_config.per_device_train_batch_size", "2", "--training_config.warmup_steps", "0"]
    args += ["--training_config.gradient_accumulation_steps", "1", "--training_config.save_strategy", "no"]
    args += ["--training_config.eval_strategy", "no", "--training_config.report_to", "none"]
    args += ["--training_config.lr_scheduler_type", "cosine", "--training_config.seed", "0"]
    args += ["--training_config.output_dir", str(run)]
    assert main(args) == 0

    cfg, tokenizer, model = load_trained(run, echo=lambda _: None)
    conversations = eval_conversations(
        TOOLS_EXAMPLE / "eval.jsonl", "messages", tools=load_tools(cfg.data.tools)
    )
    prompts = [c.messages[:-1] for c in conversations]
    tools = [c.tools for c in conversations]
    base_cfg = run_config(run)
    base = load_model(base_cfg.model, tokenizer, decide_precision(base_cfg.model, base_cfg.training_config))
    _, before = generate_batch(base.eval(), tokenizer, prompts, max_new_tokens=SMOL_NEW_TOKENS, tools=tools)
    # the premise: untrained, some answers run to the limit with this template (5 of 12 stop)
    assert not all(n < SMOL_NEW_TOKENS for n in before.lengths), before.lengths
    answers, after = generate_batch(model, tokenizer, prompts, max_new_tokens=SMOL_NEW_TOKENS, tools=tools)
    assert all(n < SMOL_NEW_TOKENS for n in after.lengths), list(zip(answers, after.lengths, strict=True))
    assert sum("<tool_call>" in a for a in answers) >= len(answers) // 2, answers  # it learned to call

    if importlib.util.find_spec("cyllama") is None:
        return
    gguf = tmp_path / "out" / "model.gguf"
    assert main(["export", "--adapter", str(run), "--out", str(gguf)]) == 0
    served_by = load_in_llama_cpp(gguf)
    for prompt, conversation_tools, answer in zip(prompts, tools, answers, strict=True):
        ids = tokenizer.apply_chat_template(
            prompt, tools=conversation_tools, add_generation_prompt=True, return_dict=False
        )
        served, stopped = llama_cpp_greedy(served_by, ids, SMOL_NEW_TOKENS)
        assert stopped, (answer, tokenizer.decode(served))
        # the same answer's start from the merged f16 file (later tokens may part on near ties)
        assert tokenizer.decode(served[:4]) == tokenizer.decode(
            tokenizer.encode(answer, add_special_tokens=False)[:4]
        )
