"""The export flow that ``lorafit merge``, ``lorafit export`` and the page share, on a run folder of
the demo model: what each form writes, the fp32 merge reaching the GGUF file, the notes coming back
in the result (not as warnings), and the checks that run before any model loads."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

import lorafit
from lorafit.config import load_config
from lorafit.constants import RUN_CONFIG_NAME
from lorafit.errors import LorafitError
from lorafit.export import Exported, export_run

# a chat template with no Ollama counterpart: the Modelfile goes without TEMPLATE, with a note
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder as lorafit writes one: config, tokenizer and a PEFT adapter on the demo model in
    bf16, with B random and large enough that the merged weights differ from the base's."""
    from lorafit.adapters import save_adapter
    from lorafit.models import load_model, load_tokenizer
    from lorafit.models.load import decide_precision
    from lorafit.training.run import add_lora

    folder = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["--model.torch_dtype", "bfloat16", "--peft_config.init_lora_weights", "false"])
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    torch.manual_seed(0)
    model = add_lora(load_model(cfg.model, tokenizer, decide_precision(cfg.model, cfg.training_config)), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(50.0)
    (folder / RUN_CONFIG_NAME).write_text(cfg.to_yaml())
    tokenizer.save_pretrained(folder)
    save_adapter(model, folder)
    return folder


def test_gguf_form_writes_the_fp32_merge_rounded_once_with_its_modelfile(run_folder, tmp_path) -> None:
    from lorafit.models import load_trained

    out = tmp_path / "gguf" / "model.gguf"
    seen: list[tuple[int, int]] = []
    result = export_run(run_folder, out, form="gguf", progress=lambda *a: seen.append(a), echo=lambda _: None)
    assert result == Exported(out, [out, out.parent / "Modelfile"], [])
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./model.gguf")
    total = len(GGUFReader(out).tensors)
    assert seen == [(done, total) for done in range(1, total + 1)]
    # every weight in the file is the adapter merged in fp32, rounded once to f16
    _, _, model = load_trained(run_folder, sixteen_bit=True, echo=lambda _: None)
    model = lorafit.merge_lora(model.float(), unload=True)
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    expected, got = model.state_dict(), back.state_dict()
    for key in got:
        cast = torch.float16 if got[key].dim() == 2 else torch.float32
        assert torch.equal(got[key], expected[key].to(cast).float()), key


def test_notes_come_back_in_the_result_not_as_warnings(run_folder, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    (run / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
    out = tmp_path / "gguf" / "model-q8_0.gguf"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_run(run, out, form="gguf", dtype="q8_0", echo=lambda _: None)
    assert [note.split(":")[0] for note in result.notes] == ["Modelfile"]
    assert "Ollama picks one from the chat template stored in the GGUF" in result.notes[0]
    assert not [w for w in caught if str(w.message).startswith(("GGUF export", "Modelfile"))]
    assert "TEMPLATE" not in (out.parent / "Modelfile").read_text().replace("# no TEMPLATE", "")
    assert any(t.tensor_type.name == "Q8_0" for t in GGUFReader(out).tensors)


def test_merged_and_lora_forms(run_folder, tmp_path) -> None:
    merged = export_run(run_folder, tmp_path / "merged", form="merged", echo=lambda _: None)
    assert merged.path == tmp_path / "merged" and merged.notes == []
    assert (
        merged.files == sorted(p for p in merged.path.iterdir())
        and merged.path / "config.json" in merged.files
    )
    lora = export_run(run_folder, tmp_path / "adapter.gguf", form="lora", dtype="f32")
    assert lora == Exported(tmp_path / "adapter.gguf", [tmp_path / "adapter.gguf"], [])
    types = {t.tensor_type.name for t in GGUFReader(lora.path).tensors}
    assert types == {"F32"}


def test_what_needs_no_model_is_checked_before_the_model_loads(tmp_path) -> None:
    # the adapter folder does not exist: an error about the target, not about the folder, shows
    # that the target was judged before anything was loaded
    missing = tmp_path / "no-such-run"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.gguf").write_bytes(b"keep")
    (taken / "config.json").write_text("{}")
    cases = [
        ({"form": "gguf", "out": taken / "model.gguf"}, "already exists; choose a new file name"),
        ({"form": "gguf", "out": taken / "new.gguf"}, "Modelfile already exists"),
        ({"form": "gguf", "out": tmp_path / "m.gguf", "dtype": "f32"}, "expected one of f16, bf16, q8_0"),
        ({"form": "lora", "out": tmp_path / "a.gguf", "dtype": "q8_0"}, "expected one of f16, f32"),
        ({"form": "lora", "out": taken / "model.gguf"}, "already exists"),
        ({"form": "merged", "out": taken}, "already holds files"),
        ({"form": "onnx", "out": tmp_path / "m.onnx"}, "expected one of merged, gguf, lora"),
    ]
    (taken / "Modelfile").write_text("FROM ./model.gguf\n")
    for kwargs, message in cases:
        with pytest.raises(LorafitError, match=message):
            export_run(missing, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (taken / "model.gguf").read_bytes() == b"keep"
