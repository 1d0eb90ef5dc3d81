"""lorafit.export.ollama's refusals: what a Modelfile cannot hold is an error naming it, and nothing
is written. The Modelfile's templates and stop tokens, against each family's Jinja template and
Go's text/template, are checked in test_gguf.py."""

from __future__ import annotations

import pytest

from lorafit.demo import load_demo_tokenizer
from lorafit.errors import LorafitError
from lorafit.export.ollama import MODELFILE_NAME, write_modelfile


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gguf_filename": "sub/model.gguf"}, "must be a file name"),
        ({"system": 'Say """ twice.'}, 'cannot hold """'),
        ({"stop_tokens": ['<|end|>"']}, "cannot be written on a PARAMETER line"),
        ({"stop_tokens": ["two\nlines"]}, "cannot be written on a PARAMETER line"),
    ],
)
def test_what_a_modelfile_cannot_hold_is_refused(tmp_path, kwargs, message) -> None:
    arguments = {"gguf_filename": "model.gguf", "tokenizer": load_demo_tokenizer(), **kwargs}
    with pytest.raises(LorafitError, match=message):
        write_modelfile(tmp_path, **arguments)
    assert not (tmp_path / MODELFILE_NAME).exists()


def test_the_default_stops_are_the_end_tokens_and_role_markers_in_the_vocabulary(tmp_path) -> None:
    tokenizer = load_demo_tokenizer()  # Phi-3's special tokens and chat template
    text = write_modelfile(tmp_path, "model.gguf", tokenizer).read_text()
    stops = [line.split('"')[1] for line in text.splitlines() if line.startswith("PARAMETER stop")]
    assert "<|end|>" in stops and tokenizer.eos_token in stops and len(stops) == len(set(stops))
    assert all(stop in tokenizer.get_vocab() for stop in stops)
    assert "# chat template: phi3" in text
