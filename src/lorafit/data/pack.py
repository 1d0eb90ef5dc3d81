"""Examples -> rows: best-fit packing, the packed and padded collators, the datasets.

Packing. Examples are bin-packed (best-fit decreasing) into rows of at most ``max_length``
tokens. ``PackedCollator`` gives ``position_ids`` restarting at 0 for every example and no
``attention_mask``; transformers 5 (``masking_utils.find_packed_sequence_indices``) then reads
the example boundaries from the position_ids and builds a block-diagonal causal mask, for
``sdpa`` and ``eager`` alike (flash-attention uses the same position_ids as varlen boundaries).
It does so only when no KV cache is passed, so the model must run with ``use_cache=False``:
``transformers.Trainer`` sets ``model.config.use_cache = args.use_cache`` (False by default),
and gradient checkpointing forces it off too. ``tests/data/test_pack.py`` checks on a tiny Phi-3
that packed logits equal per-example logits, and that ``use_cache=True`` would break that.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorafit.constants import IGNORE_INDEX
from lorafit.errors import LorafitError


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of at most ``max_length``.

    Longest example first (ties: lower index first), each into the open row with the least room
    that still fits it, else a new row. Deterministic; indices within a row are sorted. Open rows
    are kept in buckets by free room, so each step is one bisect over the (at most
    ``max_length``) distinct free-room values: 5000 examples pack in milliseconds.
    """
    if max_length < 1:
        raise LorafitError(f"pack: max_length {max_length}; expected a positive integer.")
    bad = next((i for i, n in enumerate(lengths) if not 1 <= n <= max_length), None)
    if bad is not None:
        raise LorafitError(f"pack: example {bad} has length {lengths[bad]}; expected 1..{max_length}.")
    rows: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct free room values that have at least one open row
    by_room: dict[int, list[int]] = {}  # free room -> open rows (indices into `rows`)
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        k = bisect_left(rooms, length)
        if k == len(rooms):
            row = len(rows)
            rows.append([index])
            room = max_length - length
        else:
            room = rooms[k]
            bucket = by_room[room]
            row = bucket.pop()
            if not bucket:
                del by_room[room]
                rooms.pop(k)
            rows[row].append(index)
            room -= length
        if room > 0:
            if room not in by_room:
                by_room[room] = []
                insort(rooms, room)
            by_room[room].append(row)
    return [sorted(row) for row in rows]


def _as_list(values: Any) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _concat_row(row: Any) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, position_ids) of one packed row; each example's first label is -100."""
    if isinstance(row, dict) and "position_ids" in row:
        ids, labels, positions = (
            _as_list(row["input_ids"]),
            _as_list(row["labels"]),
            _as_list(row["position_ids"]),
        )
        # a token at position 0 starts an example: nothing before it may predict it
        labels = [IGNORE_INDEX if p == 0 else label for p, label in zip(positions, labels, strict=True)]
        return ids, labels, positions
    examples = [row] if isinstance(row, dict) else row
    ids, labels, positions = [], [], []
    for example in examples:
        example_ids = _as_list(example["input_ids"])
        ids += example_ids
        labels += [IGNORE_INDEX] + _as_list(example["labels"])[1:]
        positions += list(range(len(example_ids)))
    return ids, labels, positions


def _check_pad_id(pad_token_id: Any, name: str) -> None:
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise LorafitError(
            f"{name}: pad_token_id is {pad_token_id!r}; expected the tokenizer's pad id (an integer). "
            "Set one with prepare_tokenizer(tokenizer, pad_token='unk')."
        )


def _padded_length(longest: int, multiple: int | None) -> int:
    return longest if not multiple else -(-longest // multiple) * multiple


@dataclass
class PackedCollator:
    """Collate packed rows into ``input_ids``, ``labels``, ``position_ids``, all (B, T) int64, and
    with ``example_boundaries`` the examples' starts ``cu_seq_lens_q`` = ``cu_seq_lens_k`` (int32,
    over the B * T tokens, then B * T).

    A row is a list of examples (``{"input_ids", "labels"}``), one such example, or a row already
    concatenated with ``position_ids`` (what ``PackedDataset`` yields). There is deliberately no
    ``attention_mask``: transformers finds the example boundaries where position_ids restart and
    masks attention block-diagonally (the model must run with ``use_cache=False``, as under
    ``Trainer``). Each example's first label is -100, so the previous example's last token never
    learns to predict it. Rows are right-padded to the batch's longest row (or a multiple of
    ``pad_to_multiple_of``) with ``pad_token_id`` and label -100; padding gets its own
    position_ids 0, 1, ... so it forms a separate block that no example attends to.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    example_boundaries: bool = False  # add cu_seq_lens_q/k (lorafit.models.attention needs them)

    def __post_init__(self) -> None:
        _check_pad_id(self.pad_token_id, "PackedCollator")

    def __call__(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        parts = [_concat_row(row) for row in rows]
        width = _padded_length(max(len(ids) for ids, _, _ in parts), self.pad_to_multiple_of)
        input_ids = torch.full((len(parts), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(parts), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(parts), width), dtype=torch.long)
        for b, (ids, row_labels, positions) in enumerate(parts):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            labels[b, :n] = torch.tensor(row_labels)
            position_ids[b, :n] = torch.tensor(positions)
            position_ids[b, n:] = torch.arange(width - n)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.example_boundaries:
            # Over the flattened (B * T) tokens, padding blocks included, under the names
            # transformers passes on to attention functions (only to models whose forward takes
            # **kwargs: hence opt-in). sdpa and eager ignore them; flash-attention (without
            # max_length_q/k) still goes by the position_ids.
            starts = (position_ids.view(-1) == 0).nonzero().view(-1)
            cu_seq_lens = torch.cat([starts, torch.tensor([position_ids.numel()])]).to(torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
        return batch


@dataclass
class PaddedCollator:
    """Collate single examples (no packing): right-padded ``input_ids``, ``attention_mask``, ``labels``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        _check_pad_id(self.pad_token_id, "PaddedCollator")

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = _padded_length(max(len(e["input_ids"]) for e in examples), self.pad_to_multiple_of)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for b, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[b, :n] = torch.tensor(_as_list(example["input_ids"]))
            labels[b, :n] = torch.tensor(_as_list(example["labels"]))
            attention_mask[b, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collator_for(
    tokenizer: Any, *, packing: bool, pad_to_multiple_of: int | None = None, example_boundaries: bool = False
):
    """The collator matching ``build_datasets(packing=...)``, padding with the tokenizer's pad id;
    ``example_boundaries`` (packed rows only) is :class:`PackedCollator`'s."""
    if packing:
        return PackedCollator(tokenizer.pad_token_id, pad_to_multiple_of, example_boundaries)
    return PaddedCollator(tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised examples stored flat: item ``i`` is ``{"input_ids": [...], "labels": [...]}``.

    ``input_ids`` and ``labels`` are int32 arrays of all tokens back to back; example ``i`` spans
    ``offsets[i]:offsets[i + 1]``.
    """

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> None:
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets

    @classmethod
    def from_examples(cls, examples: Iterable[dict]) -> TokenizedDataset:
        examples = list(examples)
        lengths = [len(e["input_ids"]) for e in examples]
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = [t for e in examples for t in e["input_ids"]]
        flat_labels = [t for e in examples for t in e["labels"]]
        return cls(np.asarray(flat, dtype=np.int32), np.asarray(flat_labels, dtype=np.int32), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        a, b = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.input_ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class PackedDataset(torch.utils.data.Dataset):
    """Rows of packed examples: item ``i`` is ``{"input_ids", "labels", "position_ids"}``.

    Row ``i`` concatenates the examples ``rows[i]``; position_ids restart at 0 per example and
    each example's first label is -100 (see ``PackedCollator``).
    """

    def __init__(self, examples: TokenizedDataset, rows: list[list[int]]) -> None:
        self.examples, self.rows = examples, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples
        spans = [(ex.offsets[j], ex.offsets[j + 1]) for j in self.rows[i]]
        input_ids = np.concatenate([ex.input_ids[a:b] for a, b in spans])
        labels = np.concatenate([ex.labels[a:b] for a, b in spans])
        starts = np.cumsum([0] + [b - a for a, b in spans[:-1]])
        labels[starts] = IGNORE_INDEX
        positions = np.concatenate([np.arange(b - a) for a, b in spans])
        return {
            "input_ids": input_ids.tolist(),
            "labels": labels.tolist(),
            "position_ids": positions.tolist(),
        }
