"""lorafit.data.pack: best-fit packing and the collators; on a real tiny Phi-3, packed logits equal
per-example logits (sdpa, eager and lorafit's packed attention)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafit.data import (
    IGNORE_INDEX,
    PackedCollator,
    PackedDataset,
    PaddedCollator,
    TokenizedDataset,
    build_datasets,
    collator_for,
    pack,
    prepare_tokenizer,
)
from lorafit.errors import LorafitError
from lorafit.models.attention import PACKED_ATTENTION, use_packed_attention

from chat_data import chat_rows, write_jsonl


def test_pack_best_fit_decreasing_example():
    assert pack([6, 5, 4, 3, 2, 1], 10) == [[0, 2], [1, 3, 4], [5]]
    assert pack([], 10) == []
    with pytest.raises(LorafitError, match="example 1 has length 11; expected 1..10"):
        pack([3, 11], 10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), max_size=300))
def test_pack_rows_are_valid_and_efficient(lengths):
    rows = pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert all(load <= 64 for load in loads)
    # best fit never leaves two rows at most half full (the later one's items would have fit)
    assert sum(load <= 32 for load in loads) <= 1
    assert len(rows) <= 2 * math.ceil(sum(lengths) / 64) + 1
    assert pack(lengths, 64) == rows  # deterministic


def test_pack_is_efficient_on_chat_like_lengths():
    rng = random.Random(0)
    lengths = [min(2048, int(rng.lognormvariate(5.5, 0.8)) + 20) for _ in range(5000)]
    rows = pack(lengths, 2048)
    assert sum(lengths) / (len(rows) * 2048) > 0.99


def test_packed_collator_positions_labels_and_padding():
    a = {"input_ids": [11, 12, 13], "labels": [11, 12, 13]}
    b = {"input_ids": [21, 22], "labels": [21, 22]}
    c = {"input_ids": [31], "labels": [-100]}
    batch = PackedCollator(pad_token_id=0)([[a, b], [c]])
    assert batch.keys() == {"input_ids", "labels", "position_ids"}
    bounded = PackedCollator(pad_token_id=0, example_boundaries=True)([[a, b], [c]])
    assert bounded.keys() == {"input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"}
    # example boundaries over the flattened rows: 3 and 2 tokens, then 1 and the padding's 4
    assert bounded["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10]
    assert bounded["cu_seq_lens_k"] is bounded["cu_seq_lens_q"]
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, -100, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    # a pre-concatenated row collates the same, and pad_to_multiple_of rounds the width up
    row = {"input_ids": [11, 12, 13, 21, 22], "labels": [11, 12, 13, 21, 22], "position_ids": [0, 1, 2, 0, 1]}
    again = PackedCollator(pad_token_id=0, pad_to_multiple_of=4)([row])
    assert again["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, -100, -100]]
    assert again["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    with pytest.raises(LorafitError, match="pad_token_id is None.*prepare_tokenizer"):
        PackedCollator(pad_token_id=None)


def test_padded_collator():
    batch = PaddedCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_packed_dataset_rows_match_collated_examples():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    tokenized = TokenizedDataset.from_examples(examples)
    assert [tokenized[i] for i in range(2)] == examples and tokenized[-1] == examples[1]
    packed = PackedDataset(tokenized, [[0, 1]])
    assert packed[0] == {
        "input_ids": [1, 2, 3, 4, 5],
        "labels": [-100, 2, 3, -100, 5],
        "position_ids": [0, 1, 2, 0, 1],
    }
    collator = PackedCollator(pad_token_id=0)
    assert all(torch.equal(collator([packed[0]])[k], collator([examples])[k]) for k in packed[0])


def _packed_batch(tokenizer, tmp_path, max_length=96):
    prepare_tokenizer(tokenizer, pad_token="unk")
    path = write_jsonl(tmp_path / "train.jsonl", chat_rows(12))
    train, _, stats = build_datasets(
        tokenizer, train=path, max_length=max_length, assistant_only_loss=False, cache_dir=tmp_path / "cache"
    )
    assert stats["packed_rows"] < stats["examples"]  # several examples share rows
    rows = [train[i] for i in range(len(train))]
    batch = PackedCollator(tokenizer.pad_token_id, example_boundaries=True)(rows)
    assert (batch["input_ids"] == tokenizer.pad_token_id).any()  # rows of unequal length got padding
    return train, batch


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", PACKED_ATTENTION])
@pytest.mark.parametrize("sliding_window", [None, 8])
def test_packed_logits_equal_per_example_logits(
    phi3_tokenizer, make_tiny_phi3, tmp_path, attn_implementation, sliding_window
):
    train, batch = _packed_batch(phi3_tokenizer, tmp_path)
    packed_attention = attn_implementation == PACKED_ATTENTION
    model = make_tiny_phi3(
        len(phi3_tokenizer),
        attn_implementation="sdpa" if packed_attention else attn_implementation,
        sliding_window=sliding_window,
    )
    if packed_attention:
        assert use_packed_attention(model)
    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        packed_loss_sum = packed.loss * (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss_sum, count = 0.0, 0
        for r, row in enumerate(train.rows):
            start = 0
            for index in row:
                example = train.examples[index]
                ids = torch.tensor([example["input_ids"]])
                alone = model(input_ids=ids, labels=torch.tensor([example["labels"]]), use_cache=False)
                n = ids.shape[1]
                torch.testing.assert_close(
                    packed.logits[r, start : start + n], alone.logits[0], atol=1e-5, rtol=1e-5
                )
                loss_sum += alone.loss * (n - 1)
                count += n - 1
                start += n
    # the loss over the packed batch is the loss over the examples: nothing crosses a boundary
    torch.testing.assert_close(packed_loss_sum, loss_sum, atol=1e-4, rtol=1e-5)
    assert count == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def test_packed_attention_gradients_equal_sdpa_and_it_hands_back_other_cases(
    phi3_tokenizer, make_tiny_phi3, tmp_path, monkeypatch
):
    """Per-example attention gives sdpa's gradients; padded batches and generation (a mask, a
    cache) go to sdpa itself, and use_packed_attention refuses a model that is not sdpa."""
    from transformers.integrations import sdpa_attention

    _, batch = _packed_batch(phi3_tokenizer, tmp_path)
    reference, model = (make_tiny_phi3(len(phi3_tokenizer)).train() for _ in range(2))
    reference(**batch, use_cache=False).loss.backward()
    assert use_packed_attention(model) and model.config._attn_implementation == PACKED_ATTENTION
    with monkeypatch.context() as patch:
        patch.setattr(sdpa_attention, "sdpa_attention_forward", None)  # packed rows never need it
        model(**batch, use_cache=False).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)

    padded = PaddedCollator(phi3_tokenizer.pad_token_id)(
        [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}, {"input_ids": [9, 10], "labels": [9, 10]}]
    )
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits, reference(**padded).logits)
        prompt = torch.tensor([[5, 6, 7]])
        settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(prompt, **settings), reference.generate(prompt, **settings))
    assert not use_packed_attention(make_tiny_phi3(len(phi3_tokenizer), attn_implementation="eager"))


def test_packed_isolation_needs_use_cache_false(phi3_tokenizer, make_tiny_phi3, tmp_path):
    # transformers only derives the block-diagonal mask from position_ids when no cache is in
    # play; Phi3Config defaults to use_cache=True (Trainer turns it off). Pin that behaviour.
    train, batch = _packed_batch(phi3_tokenizer, tmp_path)
    model = make_tiny_phi3(len(phi3_tokenizer))
    assert model.config.use_cache is True
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        isolated = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    assert not torch.allclose(leaky, isolated, atol=1e-3)


def test_trainer_runs_on_packed_rows(phi3_tokenizer, make_tiny_phi3, tmp_path):
    from transformers import Trainer, TrainingArguments

    train, _ = _packed_batch(phi3_tokenizer, tmp_path)
    model = make_tiny_phi3(len(phi3_tokenizer)).train()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train, data_collator=collator_for(phi3_tokenizer, packing=True)
    )
    result = trainer.train()
    assert model.config.use_cache is False  # what makes the packed mask block-diagonal
    assert math.isfinite(result.training_loss)
