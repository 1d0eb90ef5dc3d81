"""Held-out preference figures of SmolLM2-135M-Instruct before and after a DPO run, by plain
transformers + PEFT (none of lorafit's training code):

    python examples/smollm2/preference_check.py runs/smollm2-dpo [--pairs PAIRS.jsonl] [--beta 0.1]

For each held-out pair, with ``logp(y|x)`` the summed log-probabilities of the answer's tokens
(its content and ``<|im_end|>``, as lorafit and TRL score them) under the chat template:

* the log-prob margin ``logp(chosen) - logp(rejected)``, under the base model (before) and under
  the base model + the run's adapter (after): the share of pairs where it is above 0;
* DPO's implicit reward margin ``beta * ((logp_after(c) - logp_base(c)) - (logp_after(r) - logp_base(r)))``
  (the reference is the base model: the run started from no adapter): the share above 0. Before
  training the policy is the reference and every implicit margin is 0, so only "after" is shown.

Then each held-out prompt is answered greedily (up to ``--max-new-tokens``) before and after; an
answer shows the preferred behaviour (brevity) when it ends by itself within ``--max-words`` words.
The base weights are the dense float32 copy lorafit trained on (its GGUF cache folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafit.demo import smollm2_gguf
from lorafit.models.gguf import ensure_gguf_cache


def answer_logp(model: torch.nn.Module, tokenizer, prompt: str, answer: str) -> float:  # noqa: ANN001
    """Summed log-probs of the answer's tokens (content + end of turn) after the prompt."""
    turns = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    whole = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": answer}], tokenize=False)
    whole = whole[: whole.rindex("<|im_end|>") + len("<|im_end|>")]  # not the newline after it
    assert whole.startswith(head), "the template's prompt is not a prefix of the conversation"
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert ids[: len(head_ids)] == head_ids
    inputs = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=inputs).logits[0, :-1].float()  # (T-1, V): position t predicts t+1
    logps = logits.log_softmax(-1).gather(-1, inputs[0, 1:, None])[:, 0]
    return float(logps[len(head_ids) - 1 :].sum())


def greedy(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, bool]:  # noqa: ANN001
    """The greedy answer and whether it ended by itself (end of turn) within ``max_new_tokens``."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    ended = end in new
    return tokenizer.decode(new, skip_special_tokens=True).strip(), ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the run folder (its adapter)")
    parser.add_argument("--pairs", default=str(Path(__file__).with_name("preference_eval.jsonl")))
    parser.add_argument("--beta", type=float, default=0.1, help="the run's beta (implicit reward scale)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-words", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    folder = ensure_gguf_cache(smollm2_gguf(), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.run).eval()
    pairs = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]

    rows = []
    for pair in pairs:
        with model.disable_adapter():
            before = {
                k: answer_logp(model, tokenizer, pair["prompt"], pair[k]) for k in ("chosen", "rejected")
            }
            said_before = greedy(model, tokenizer, pair["prompt"], args.max_new_tokens)
        after = {k: answer_logp(model, tokenizer, pair["prompt"], pair[k]) for k in ("chosen", "rejected")}
        said_after = greedy(model, tokenizer, pair["prompt"], args.max_new_tokens)
        implicit = args.beta * (
            (after["chosen"] - before["chosen"]) - (after["rejected"] - before["rejected"])
        )
        rows.append((pair["prompt"], before, after, implicit, said_before, said_after))

    def brief(said: tuple[str, bool]) -> bool:
        return said[1] and len(said[0].split()) <= args.max_words

    n = len(rows)
    margin_before = sum(b["chosen"] > b["rejected"] for _, b, *_ in rows)
    margin_after = sum(a["chosen"] > a["rejected"] for _, _, a, *_ in rows)
    implicit_after = sum(i > 0 for *_, i, _, _ in rows)
    brief_before = sum(brief(sb) for *_, sb, _ in rows)
    brief_after = sum(brief(sa) for *_, sa in rows)
    print(f"held-out pairs: {n}")
    print(f"log-prob margin > 0 (prefers chosen): before {margin_before}/{n}, after {margin_after}/{n}")
    print(f"implicit reward margin > 0 (after; 0 for every pair before): {implicit_after}/{n}")
    mean = sum(i for *_, i, _, _ in rows) / n
    print(f"mean implicit reward margin after: {mean:.3f}")
    print(
        f"greedy answer brief (ends within {args.max_words} words): "
        f"before {brief_before}/{n}, after {brief_after}/{n}"
    )
    print()
    print(
        "| held-out prompt | margin before | margin after | implicit | words before | words after | after |"
    )
    print("|---|---|---|---|---|---|---|")
    for prompt, b, a, implicit, sb, sa in rows:
        words = [f"{len(s[0].split())}{'' if s[1] else '+'}" for s in (sb, sa)]
        print(
            f"| {prompt} | {b['chosen'] - b['rejected']:.1f} | {a['chosen'] - a['rejected']:.1f} | "
            f"{implicit:.2f} | {words[0]} | {words[1]} | {sa[0]} |"
        )
    print("\n(+: cut off at the token limit)")
    for prompt, *_, sb, sa in rows:
        print(f"\n## {prompt}\nbefore: {sb[0]}\nafter: {sa[0]}")


if __name__ == "__main__":
    main()
