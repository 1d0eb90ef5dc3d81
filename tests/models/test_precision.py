"""The precision decision: the dtypes a run loads and computes in on a given machine, decided once.

The tables pin the decisions lorafit made before they were gathered into ``Precision`` (load dtype,
widened products, autocast flags, 4-bit compute dtype), for CPUs with and without native bf16 (the
detector's answer forced through ``native``); the loads check that ``load_model`` and the layers
follow the object, and the count that a model's size is known before its weights load. One rule
changed with that count: a small 4-bit hub model, whose size used to be known only once loaded,
now computes in fp32 on such CPUs as the demo's 4-bit model always did."""

from __future__ import annotations

import pytest
import torch
import yaml

from lorafit.config import ModelConfig, build_config
from lorafit.models.precision import WIDE_ABOVE, Precision

NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
TINY, LARGE = 4_000_000, 3_800_000_000  # the demo's parameters, Phi-3-mini's
AVX2, AMX = (), ("bfloat16",)  # what the detector says on an AVX2-only CPU, on one with AVX-512 BF16


def decide(
    torch_dtype: str = "bfloat16",
    *,
    n_params: int = TINY,
    native: tuple[str, ...] = AVX2,
    training: bool = True,
    dora: bool = False,
    quantization: dict | None = None,
    on_cpu: bool = True,
    **flags: bool,
) -> Precision:
    model = ModelConfig(torch_dtype=torch_dtype, quantization=quantization)
    return Precision.decide(
        model,
        flags,
        training=training,
        dora=dora,
        count_params=lambda: n_params,
        on_cpu=on_cpu,
        native=native,
    )


@pytest.mark.parametrize(
    ("case", "kwargs", "load", "widened", "bf16"),
    [
        # a tiny fp32 model on a CPU: as asked, and bf16 autocast off where it would be emulated
        ("tiny fp32, AVX2", {"torch_dtype": "float32", "bf16": True}, "float32", False, False),
        ("tiny fp32, AMX", {"torch_dtype": "float32", "bf16": True, "native": AMX}, "float32", False, True),
        # a tiny bf16 model trains faster in fp32 on a CPU that would emulate bf16
        ("tiny bf16, AVX2", {"bf16": True}, "float32", False, False),
        ("tiny bf16, AMX", {"bf16": True, "native": AMX}, "bfloat16", False, True),
        # from 1 B parameters LoRA training keeps bf16 there, products widened, autocast on
        ("3.8B bf16, AVX2", {"bf16": True, "n_params": LARGE}, "bfloat16", True, True),
        ("3.8B bf16, AMX", {"bf16": True, "n_params": LARGE, "native": AMX}, "bfloat16", False, True),
        ("just below 1 B", {"bf16": True, "n_params": WIDE_ABOVE - 1}, "float32", False, False),
        ("3.8B, DoRA", {"bf16": True, "n_params": LARGE, "dora": True}, "float32", False, False),
        ("3.8B, chat", {"bf16": True, "n_params": LARGE, "training": False}, "float32", False, False),
        ("3.8B, chat, AMX", {"n_params": LARGE, "training": False, "native": AMX}, "bfloat16", False, False),
        # an explicit torch_dtype: auto stays auto, fp16 counts as 16-bit like bf16
        ("auto", {"torch_dtype": "auto", "bf16": True, "native": AMX}, "auto", False, True),
        ("3.8B fp16, AVX2", {"torch_dtype": "float16", "n_params": LARGE}, "float16", True, False),
        ("tiny fp16, AMX", {"torch_dtype": "float16", "native": AMX}, "float32", False, False),
        # a GPU computes as the config says
        ("GPU", {"bf16": True, "on_cpu": False}, "bfloat16", False, True),
    ],
)
def test_the_load_dtype_and_autocast_as_before(case, kwargs, load, widened, bf16) -> None:
    p = decide(**kwargs)
    assert (p.load, p.widened, p.bf16, p.fp16) == (load, widened, bf16, False), case
    assert p.autocast == ("bfloat16" if bf16 else None)


def test_the_size_is_counted_only_where_it_decides() -> None:
    def count() -> int:
        raise AssertionError("counted")

    model = ModelConfig(torch_dtype="bfloat16")
    for training, native, on_cpu in ((False, AVX2, True), (True, AMX, True), (True, AVX2, False)):
        p = Precision.decide(model, {}, training=training, native=native, on_cpu=on_cpu, count_params=count)
        assert p.n_params is None
    assert decide(n_params=LARGE).n_params == LARGE


def test_notes_say_each_change_once() -> None:
    small = decide(bf16=True)
    assert small.notes[0].startswith("model.torch_dtype: bfloat16 -> float32: this CPU has no native")
    assert small.notes[1] == "bf16: true -> false (no native bfloat16 products on this CPU; fp32 is faster)"
    large = decide(bf16=True, n_params=LARGE)
    assert len(large.notes) == 1 and "bfloat16 kept" in large.notes[0]
    assert decide(bf16=True, native=AMX).notes == ()


@pytest.mark.parametrize(
    ("native", "n_params", "bf16", "how"),
    [
        (AMX, TINY, True, "fp16: true -> bf16: true (this CPU multiplies bf16 natively, fp16 only emulated)"),
        (AVX2, LARGE, True, "as fp32 products (lorafit's training ops)"),
        (AVX2, TINY, False, "fp16: true -> false (no native float16 products on this CPU; fp32 is faster)"),
    ],
)
def test_fp16_becomes_bf16_where_bf16_runs(native, n_params, bf16, how) -> None:
    """The Phi-3 cookbook asks for fp16: on a CPU it becomes bf16 where bf16 runs, else off."""
    p = decide(native=native, n_params=n_params, fp16=True)
    assert (p.bf16, p.fp16) == (bf16, False) and how in p.notes[-1]
    assert decide(fp16=True, on_cpu=False).fp16  # a GPU keeps it


def test_a_4bit_base_computes_in_fp32_where_bf16_would_be_emulated_unless_widened() -> None:
    chat = decide(quantization=NF4, training=False)
    assert chat.quant_compute == "float32" and chat.load == "float32"
    assert chat.notes[0].startswith("model.quantization.bnb_4bit_compute_dtype: bfloat16 -> float32")
    large = decide(quantization=NF4, n_params=LARGE, bf16=True)
    assert (large.quant_compute, large.load, large.widened, large.bf16) == (
        "bfloat16",
        "bfloat16",
        True,
        True,
    )
    assert decide(quantization=NF4, native=AMX).quant_compute == "bfloat16"
    small = decide(quantization=NF4, n_params=TINY, bf16=True)  # trains faster in fp32, as unquantized
    assert (small.quant_compute, small.load, small.widened, small.bf16) == (
        "float32",
        "float32",
        False,
        False,
    )
    unset = {k: v for k, v in NF4.items() if k != "bnb_4bit_compute_dtype"}  # bitsandbytes' default: fp32
    assert decide(quantization=unset).quant_compute is None


def test_lorafit_wide_above_is_read_by_the_decision(monkeypatch) -> None:
    """The benchmarks set it to 0, so that a cut of Phi-3-mini trains as the 3.8 B model would."""
    monkeypatch.setenv("LORAFIT_WIDE_ABOVE", "0")
    assert decide(n_params=TINY).widened
    monkeypatch.setenv("LORAFIT_WIDE_ABOVE", str(TINY + 1))
    assert not decide(n_params=TINY).widened


def test_the_detector_is_the_one_the_kernels_ask(monkeypatch) -> None:
    from lorafit import kernels

    machine = Precision.decide(ModelConfig(), {}, on_cpu=True)
    assert machine.native == tuple(n for n in ("bfloat16", "float16") if kernels.cpu_multiplies_natively(n))
    assert kernels.widen_products(torch.bfloat16, "cpu") == ("bfloat16" not in machine.native)
    assert not kernels.widen_products(torch.bfloat16, "cuda") and not kernels.widen_products(
        torch.float32, "cpu"
    )
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        kernels.cpu_multiplies_natively("float32")


def test_the_size_is_known_before_loading() -> None:
    """The demo's count on the meta device equals its loaded parameters; Phi-3-mini's published
    configuration counts its 3.8 B parameters as the memory planner's shapes do."""
    from transformers import Phi3Config

    from lorafit.demo import build_demo_model
    from lorafit.models.load import parameter_count
    from lorafit.training.memory import ModelShapes

    demo = build_demo_model()
    assert parameter_count(ModelConfig()) == sum(p.numel() for p in demo.parameters())
    phi3 = Phi3Config(
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    )
    assert ModelShapes.from_config(phi3).params() == pytest.approx(3.82e9, rel=0.01)
    # parameter_count of a folder reads its config.json; built on the meta device, nothing allocated
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(phi3)
    assert sum(p.numel() for p in built.parameters()) == ModelShapes.from_config(phi3).params()


def test_a_folders_size_is_read_from_its_config(tmp_path) -> None:
    from lorafit.models.load import parameter_count

    from tiny import tiny_llama

    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    counted = parameter_count(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert counted == sum(p.numel() for p in model.parameters())


def test_load_model_and_the_wide_layers_follow_the_decision(monkeypatch) -> None:
    """The demo on a CPU without native bf16: fp32 when small (said through echo), bf16 with every
    plain linear widened when LoRA training counts it large (``LORAFIT_WIDE_ABOVE=0``)."""
    from lorafit.demo import load_demo_tokenizer
    from lorafit.models.lean import use_wide_linears
    from lorafit.models.load import load_model, parameter_count

    cfg = build_config({"model": {"torch_dtype": "bfloat16"}, "training_config": {"bf16": True}})

    def precision(**kw) -> Precision:
        count = lambda: parameter_count(cfg.model)  # noqa: E731
        return Precision.decide(
            cfg.model, cfg.training_config, on_cpu=True, native=AVX2, count_params=count, **kw
        )

    notes: list[str] = []
    small = precision(training=True)
    model = load_model(cfg.model, load_demo_tokenizer(), small, echo=notes.append)
    assert model.dtype == torch.float32 and use_wide_linears(model, small) == 0
    assert "-> float32" in notes[0] and small.n_params == sum(p.numel() for p in model.parameters())
    monkeypatch.setenv("LORAFIT_WIDE_ABOVE", "0")
    large = precision(training=True)
    model = load_model(cfg.model, load_demo_tokenizer(), large, echo=notes.append)
    plain = sum(type(m) is torch.nn.Linear for m in model.modules())  # no LoRA here: every linear
    assert model.dtype == torch.bfloat16 and large.widened and use_wide_linears(model, large) == plain > 0
    dora = precision(training=True, dora=True)
    assert load_model(cfg.model, load_demo_tokenizer(), dora, echo=notes.append).dtype == torch.float32


def test_the_run_file_records_it_and_reads_back_without_it(tmp_path) -> None:
    import dataclasses

    from lorafit.config import load_config

    cfg = build_config({"training_config": {"bf16": True}})
    p = decide(bf16=True, n_params=LARGE)
    text = dataclasses.replace(cfg, precision=p.record()).to_yaml()
    recorded = yaml.safe_load(text)["precision"]
    assert (
        recorded["load"] == "bfloat16" and recorded["widened"] is True and recorded["autocast"] == "bfloat16"
    )
    assert recorded["native"] == [] and recorded["n_params"] == LARGE and "notes" not in recorded
    (tmp_path / "lorafit_run.yaml").write_text(text)
    again = load_config(tmp_path / "lorafit_run.yaml")
    assert again == cfg and again.precision is None  # each machine decides its own
