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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("gguf", type=Path, help="the exported model (lorafit export)")
    parser.add_argument("run", type=Path, help="the run folder it was exported from")
    parser.add_argument("data", type=Path, help="JSONL records with messages and expect")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    from lorafit.export.llama_cpp import llama_cpp_greedy, load_in_llama_cpp
    from lorafit.inference.expect import is_right
    from lorafit.inference.generate import generate
    from lorafit.models import load_trained
    from lorafit.models.load import stop_token_ids

    _, tokenizer, adapter_model = load_trained(args.run)

    model = load_in_llama_cpp(args.gguf)
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
        tokens, stopped = llama_cpp_greedy(model, ids, args.max_new_tokens, stops=stops, threads=2)
        from_gguf = tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True).strip()
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
