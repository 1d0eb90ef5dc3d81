"""Chat-instruction files -> masked, packed training examples for Hugging Face causal LMs.

The flow, one module a step (``build_datasets`` runs it all, cached):

    read (files -> records) -> formats (-> messages) -> template (-> tokens + labels)
    -> pack (rows, collators) -> build (datasets, cache, fingerprints)
"""

from lorafit.constants import FORMATS, IGNORE_INDEX
from lorafit.data.build import build_datasets, dataset_fingerprint, held_out_records
from lorafit.data.formats import detect_format, to_messages, to_text
from lorafit.data.pack import (
    PackedCollator,
    PackedDataset,
    PaddedCollator,
    TokenizedDataset,
    collator_for,
    pack,
)
from lorafit.data.read import BadRecord, Record, read_records
from lorafit.data.template import prepare_tokenizer, tokenize_conversation, tokenize_text

__all__ = [
    "BadRecord",
    "FORMATS",
    "IGNORE_INDEX",
    "PackedCollator",
    "PackedDataset",
    "PaddedCollator",
    "Record",
    "TokenizedDataset",
    "build_datasets",
    "collator_for",
    "dataset_fingerprint",
    "detect_format",
    "held_out_records",
    "pack",
    "prepare_tokenizer",
    "read_records",
    "to_messages",
    "to_text",
    "tokenize_conversation",
    "tokenize_text",
]
