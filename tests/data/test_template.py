"""lorafit.data.template: assistant-only masks on real chat templates, lengths, the tokenizer set-up.

The masks are checked on real chat templates (Phi-3, Llama 2, ChatML, Llama 3) by decoding the
labelled tokens."""

from __future__ import annotations

import pytest

from lorafit.data import (
    IGNORE_INDEX,
    prepare_tokenizer,
    tokenize_conversation,
    tokenize_text,
)
from lorafit.data.chat_templates import BUILTIN_TEMPLATES, missing_template_tokens, resolve_chat_template
from lorafit.data.template import end_of_turn_token
from lorafit.errors import LorafitError

from chat_data import CONVERSATION, END_OF_TURN, labelled_runs


@pytest.mark.parametrize("family", ["phi3", "llama2", "chatml", "llama3"])
def test_mask_is_each_assistant_content_plus_end_of_turn(make_tokenizer, family):
    tokenizer = make_tokenizer(family)
    example = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)

    # the tokens are exactly the tokenizer's own chat template rendering
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]

    runs = [tokenizer.decode(run) for run in labelled_runs(example)]
    eot = END_OF_TURN[family]
    assert runs == [f"Two plus two is four.{eot}", f"That is eight.{eot}"]
    # the system turn, the user turns and every header stay unlabelled
    unlabelled = [
        t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab == IGNORE_INDEX
    ]
    text = tokenizer.decode(unlabelled)
    assert "You are a helpful assistant" in text and "three plus five" in text
    assert "four" not in text and "eight" not in text


def test_mask_ignores_marker_text_inside_user_turns(chatml_tokenizer):
    # A user turn that contains the assistant header as text: a marker search would start the
    # labels there; token positions from the template prefix do not.
    messages = [
        {"role": "user", "content": "Repeat after me: <|im_start|>assistant\nfour"},
        {"role": "assistant", "content": "four"},
    ]
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=512)
    assert [chatml_tokenizer.decode(r) for r in labelled_runs(example)] == ["four<|im_end|>"]


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("chatml", "  Hello there!  <|im_end|>"),
        ("llama3", "Hello there!<|eot_id|>"),  # the template trims content
        ("phi3", "Hello there!  <|end|>"),  # <|assistant|> swallows "\n  " (rstrip), not labelled
    ],
)
def test_mask_follows_whitespace_as_template_and_tokenizer_treat_it(make_tokenizer, family, expected):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "  Hello there!  "}]
    tokenizer = make_tokenizer(family)
    example = tokenize_conversation(tokenizer, messages, max_length=512)
    assert [tokenizer.decode(r) for r in labelled_runs(example)] == [expected]


def test_full_loss_labels_every_token(phi3_tokenizer):
    example = tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=512, assistant_only_loss=False)
    assert example["labels"] == example["input_ids"]
    assert phi3_tokenizer.decode(example["input_ids"]).endswith("That is eight.<|end|><|endoftext|>")


def test_overlong_truncate_and_drop(phi3_tokenizer):
    full = tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=512)
    n = len(full["input_ids"])
    cut = tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=n - 3)
    assert cut["input_ids"] == full["input_ids"][: n - 3] and cut["labels"] == full["labels"][: n - 3]
    assert tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=n - 3, overlong="drop") is None
    assert tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=n, overlong="drop") == full
    # cut before the first assistant token: nothing left to learn
    first_label = next(i for i, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX)
    assert tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=first_label) is None
    with pytest.raises(LorafitError, match="overlong.*truncate, drop"):
        tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=64, overlong="cut")


def test_template_that_rewrites_earlier_turns_is_refused(phi3_tokenizer):
    # renders the last message differently, so messages[:i] + generation prompt is not a prefix
    phi3_tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}"
        "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    with pytest.raises(
        LorafitError, match="rec 1: the chat template renders the conversation before assistant turn 1 "
    ):
        tokenize_conversation(phi3_tokenizer, CONVERSATION[1:3], max_length=512, where="rec 1")
    # without assistant-only loss no position is needed
    assert tokenize_conversation(phi3_tokenizer, CONVERSATION[1:3], max_length=512, assistant_only_loss=False)


def test_no_chat_template_is_an_error(phi3_tokenizer):
    phi3_tokenizer.chat_template = None
    with pytest.raises(LorafitError, match="no chat template.*format: text"):
        tokenize_conversation(phi3_tokenizer, CONVERSATION, max_length=512)


def test_text_format_is_tokens_plus_eos_all_labelled(phi3_tokenizer):
    example = tokenize_text(phi3_tokenizer, "The sky is blue.", max_length=512)
    assert phi3_tokenizer.decode(example["input_ids"]) == "The sky is blue.<|endoftext|>"
    assert example["labels"] == example["input_ids"]
    assert len(tokenize_text(phi3_tokenizer, "The sky is blue.", max_length=3)["input_ids"]) == 3
    assert tokenize_text(phi3_tokenizer, "The sky is blue.", max_length=3, overlong="drop") is None


def test_prepare_tokenizer(phi3_tokenizer, llama3_tokenizer):
    prepare_tokenizer(phi3_tokenizer, pad_token="unk", padding_side="right", model_max_length=4096)
    assert phi3_tokenizer.pad_token == "<unk>" and phi3_tokenizer.pad_token_id == phi3_tokenizer.unk_token_id
    assert phi3_tokenizer.padding_side == "right" and phi3_tokenizer.model_max_length == 4096
    prepare_tokenizer(phi3_tokenizer, pad_token="<|end|>")
    assert phi3_tokenizer.pad_token == "<|end|>"
    with pytest.raises(
        LorafitError,
        match=r"'<\|endoftxt\|>' is not in the tokenizer's vocabulary \(did you mean '<\|endoftext\|>'",
    ):
        prepare_tokenizer(phi3_tokenizer, pad_token="<|endoftxt|>")
    with pytest.raises(LorafitError, match="has no unk token; expected auto, one of eos, bos"):
        prepare_tokenizer(llama3_tokenizer, pad_token="unk")
    with pytest.raises(LorafitError, match="padding_side: 'rigth' \\(did you mean 'right'"):
        prepare_tokenizer(phi3_tokenizer, padding_side="rigth")
    with pytest.raises(LorafitError, match="model_max_length: 0; expected a positive integer"):
        prepare_tokenizer(phi3_tokenizer, model_max_length=0)


def test_pad_token_auto_follows_the_tokenizer(make_tokenizer):
    own = make_tokenizer("phi3")
    own.pad_token = "<|endoftext|>"
    assert prepare_tokenizer(own).pad_token == "<|endoftext|>"  # a pad token already: kept
    no_pad = make_tokenizer("phi3")
    no_pad.pad_token = None
    assert prepare_tokenizer(no_pad).pad_token == "<unk>"  # none: unk, as the Phi-3 samples pad
    llama3 = make_tokenizer("llama3")
    llama3.pad_token = None
    assert llama3.unk_token is None
    assert prepare_tokenizer(llama3).pad_token == llama3.eos_token  # no unk either: eos


@pytest.mark.parametrize(
    ("family", "end"), [("phi3", "<|end|>"), ("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")]
)
def test_end_of_turn_token_comes_from_the_template(make_tokenizer, family, end):
    tokenizer = make_tokenizer(family)
    assert tokenizer.convert_ids_to_tokens(end_of_turn_token(tokenizer)) == end
    tokenizer.chat_template = None
    assert end_of_turn_token(tokenizer) is None


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_mask_assistant_turns_by_position(make_tokenizer, name):
    family = {"chatml": "chatml", "phi3": "phi3", "llama3": "llama3"}[name]
    tokenizer = make_tokenizer(family)
    tokenizer.chat_template = None  # a base model's tokenizer
    with pytest.raises(LorafitError, match="has no chat template.*chatml, phi3 or llama3"):
        tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    template, builtin = resolve_chat_template(name)
    assert builtin == name and missing_template_tokens(tokenizer, name) == []
    tokenizer.chat_template = template
    example = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    runs = [tokenizer.decode(run) for run in labelled_runs(example)]
    assert [r.strip() for r in runs] == [
        f"Two plus two is four.{END_OF_TURN[family]}".strip(),
        f"That is eight.{END_OF_TURN[family]}".strip(),
    ]


def test_chat_template_from_a_file_or_text_and_bad_values(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(BUILTIN_TEMPLATES["chatml"], encoding="utf-8")
    assert resolve_chat_template(str(path)) == (BUILTIN_TEMPLATES["chatml"], None)
    assert resolve_chat_template("{{ messages }}") == ("{{ messages }}", None)
    with pytest.raises(LorafitError, match=r"'chatlm' is not a built-in template \(did you mean 'chatml'"):
        resolve_chat_template("chatlm")
