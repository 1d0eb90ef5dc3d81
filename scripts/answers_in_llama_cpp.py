"""Answer held-out questions with an exported GGUF in llama.cpp itself, and with the adapter in
transformers, and count the answers that name the expected fact in each.

After the demo (``lorafit train``) and ``lorafit export --adapter RUN --out OUT/model.gguf``:

    python scripts/answers_in_llama_cpp.py OUT/model.gguf RUN src/lorafit/demo/facts_eval.jsonl

Each record needs ``messages`` (the question first) and ``expect`` (see
``lorafit.inference.expect``). Greedy decoding on both sides, up to ``--max-new-tokens``, stopping
at the chat template's end-of-turn. llama.cpp comes from the ``cyllama`` wheel (the test extra).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def llama_cpp_answer(
    llama_cpp: Any, model: Any, prompt_ids: list[int], stops: set[int], max_new_tokens: int
) -> list[int]:
    """Greedy continuation of ``prompt_ids`` in llama.cpp, one token per decode."""
    params = llama_cpp.LlamaContextParams()
    params.n_ctx, params.n_threads, params.n_threads_batch = 1024, 2, 2
    context = llama_cpp.LlamaContext(model, params)
    for position, token in enumerate(prompt_ids):
        batch = llama_cpp.LlamaBatch(n_tokens=1, embd=0, n_seq_max=1)
        batch.add(int(token), position, [0], position == len(prompt_ids) - 1)
        context.decode(batch)
    out: list[int] = []
    for position in range(len(prompt_ids), len(prompt_ids) + max_new_tokens):
        token = int(torch.tensor(context.get_logits()).argmax())
        if token in stops:
            break
        out.append(token)
        batch = llama_cpp.LlamaBatch(n_tokens=1, embd=0, n_seq_max=1)
        batch.add(token, position, [0], True)
        context.decode(batch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("gguf", type=Path, help="the exported model (lorafit export)")
    parser.add_argument("run", type=Path, help="the run folder it was exported from")
    parser.add_argument("data", type=Path, help="JSONL records with messages and expect")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    import cyllama.llama.llama_cpp as llama_cpp

    from lorafit.inference.expect import is_right
    from lorafit.inference.generate import generate
    from lorafit.models import load_trained
    from lorafit.models.load import stop_token_ids

    _, tokenizer, adapter_model = load_trained(args.run)

    class Model(llama_cpp.LlamaModel):
        @property
        def n_vocab(self) -> int:  # cyllama 0.2's LlamaContext.get_logits reads it; LlamaModel lacks it
            return self.get_vocab().n_vocab

    llama_cpp.disable_logging()
    model = Model(str(args.gguf), llama_cpp.LlamaModelParams())
    stops = set(stop_token_ids(tokenizer))
    lines = args.data.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    right = {"llama.cpp": 0, "transformers": 0}
    same = 0
    seconds = 0.0
    for record in records:
        question = record["messages"][:1]
        ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=False)
        start = time.perf_counter()
        from_gguf = tokenizer.decode(
            llama_cpp_answer(llama_cpp, model, ids, stops, args.max_new_tokens), skip_special_tokens=True
        ).strip()
        seconds += time.perf_counter() - start
        from_adapter = generate(adapter_model, tokenizer, question, max_new_tokens=args.max_new_tokens)
        for name, answer in (("llama.cpp", from_gguf), ("transformers", from_adapter)):
            right[name] += is_right(answer, record["expect"])
        same += from_gguf == from_adapter
        mark = "right" if is_right(from_gguf, record["expect"]) else "wrong"
        print(f"{mark}  {question[0]['content']}")
        print(f"       llama.cpp:    {from_gguf}\n       transformers: {from_adapter}")
    n = len(records)
    print(
        f"right: llama.cpp {right['llama.cpp']}/{n}, transformers {right['transformers']}/{n}; "
        f"identical answers {same}/{n}; llama.cpp answered in {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
