"""Held-out tool calls: does the model call the right function with the right arguments, and stop?

After ``lorafit train`` (see README.md), and optionally ``lorafit export --adapter RUN --out OUT/model.gguf``:

    python examples/smollm2/tools/score_calls.py RUN examples/smollm2/tools/eval.jsonl          # after
    python examples/smollm2/tools/score_calls.py RUN examples/smollm2/tools/eval.jsonl --base   # before
    python examples/smollm2/tools/score_calls.py RUN examples/smollm2/tools/eval.jsonl --gguf OUT/model.gguf

Each record is a request and the assistant turn that calls a tool (``tool_calls``); the prompt is
the request rendered by the run's chat template with the record's ``tools`` (else the run's
``data.tools``), as training rendered it. The model answers greedily, up to ``--max-new-tokens``.
An answer is *well formed* when it holds at least one ``<tool_call>{json}</tool_call>`` block (the
call format of the Qwen2.5 and Hermes templates) whose JSON parses, and *right* when its calls are
exactly the record's: the same function names with equal arguments (compared as parsed JSON, so
key order and spacing do not matter). It *stopped* when it ended with a token generation stops at
(the template's end of turn) before ``--max-new-tokens``: lorafit's generation stops only there or
at the limit; llama.cpp stops where the GGUF's own vocabulary marks end-of-generation.

``--base`` answers with the run's base model without the adapter (the figures before training);
``--gguf`` answers with the exported file in llama.cpp too (the ``cyllama`` wheel).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_calls(answer: str) -> list[dict] | None:
    """The ``{name, arguments}`` calls written in ``answer``, or None when there is none or one of
    them is not JSON with a name."""
    blocks = CALL.findall(answer)
    calls = []
    for block in blocks:
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
    return calls or None


def expected_calls(message: dict) -> list[dict]:
    """A record's assistant ``tool_calls`` as ``{name, arguments}`` with the arguments parsed."""
    out = []
    for call in message["tool_calls"]:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        out.append(
            {
                "name": function["name"],
                "arguments": json.loads(arguments) if isinstance(arguments, str) else arguments,
            }
        )
    return out


def llama_cpp_answers(
    gguf: Path, prompts: list[list[int]], max_new_tokens: int
) -> list[tuple[list[int], bool]]:
    """Greedy tokens from llama.cpp for each prompt (its end-of-generation token left out), and
    whether it stopped at one."""
    from lorafit.export.llama_cpp import llama_cpp_greedy, load_in_llama_cpp

    model = load_in_llama_cpp(gguf)
    out = []
    for prompt in prompts:
        tokens, stopped = llama_cpp_greedy(model, prompt, max_new_tokens)
        out.append((tokens[:-1] if stopped else tokens, stopped))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="the run folder (lorafit train)")
    parser.add_argument("data", type=Path, help="JSONL records: a request, then the assistant's tool_calls")
    parser.add_argument("--base", action="store_true", help="the base model without the adapter (before)")
    parser.add_argument("--gguf", type=Path, help="also answer with this exported GGUF in llama.cpp")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    from lorafit.data.build import load_tools
    from lorafit.inference.generate import generate_batch
    from lorafit.inference.metrics import eval_conversations
    from lorafit.models import load_trained
    from lorafit.models.load import decide_precision, load_model, load_tokenizer, run_config

    torch.set_num_threads(1)
    if args.base:
        cfg = run_config(args.run)
        precision = decide_precision(cfg.model, cfg.training_config)
        tokenizer = load_tokenizer(cfg.model, cfg.tokenizer, precision)
        model = load_model(cfg.model, tokenizer, precision).eval()
    else:
        cfg, tokenizer, model = load_trained(args.run)
    conversations = eval_conversations(args.data, "messages", tools=load_tools(cfg.data.tools))
    prompts = [c.messages[:-1] for c in conversations]
    tools = [c.tools for c in conversations]
    answers, stats = generate_batch(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, tools=tools
    )
    results = {"lorafit": [(a, n < args.max_new_tokens) for a, n in zip(answers, stats.lengths, strict=True)]}
    print(f"lorafit: {stats.describe()}", file=sys.stderr)
    if args.gguf:
        ids = [
            tokenizer.apply_chat_template(p, tools=t, add_generation_prompt=True, return_dict=False)
            for p, t in zip(prompts, tools, strict=True)
        ]
        results["llama.cpp"] = [
            (tokenizer.decode(tokens, skip_special_tokens=True).strip(), stopped)
            for tokens, stopped in llama_cpp_answers(args.gguf, ids, args.max_new_tokens)
        ]
    counts: dict[str, dict[str, int]] = {
        name: {"right": 0, "well formed": 0, "stopped": 0} for name in results
    }
    for i, conversation in enumerate(conversations):
        want = expected_calls(conversation.messages[-1])
        print(f"Q: {prompts[i][-1]['content']}\n   expected: {json.dumps(want)}")
        for name, rows in results.items():
            answer, stopped = rows[i]
            got = parse_calls(answer)
            right = got == want
            counts[name]["right"] += right
            counts[name]["well formed"] += got is not None
            counts[name]["stopped"] += stopped
            mark = "right" if right else "formed" if got is not None else "wrong"
            stop = "" if stopped else " [no end of turn]"
            print(f"   {name:9} {mark:6} {' '.join(answer.split())[:110]}{stop}")
    n = len(conversations)
    for name, count in counts.items():
        print(f"{name}: " + ", ".join(f"{key} {value}/{n}" for key, value in count.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
