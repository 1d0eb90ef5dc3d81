"""Loading a base model and its tokenizer: a hub id, a local folder, a GGUF file (through its dense
cached copy, :mod:`lorafit.models.gguf`), or the embedded demo.

The model comes in the configured dtype and attention implementation (4-bit when
``model.quantization`` says so); the tokenizer is set up for training (pad token, padding side,
maximum length) and the model's generation config stops at the chat template's end-of-turn token.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorafit.config import RunConfig
from lorafit.constants import DEMO_MODEL, RUN_CONFIG_NAME
from lorafit.data import prepare_tokenizer
from lorafit.data.chat_templates import BUILTIN_TEMPLATES, missing_template_tokens, resolve_chat_template
from lorafit.data.template import end_of_turn_token
from lorafit.errors import LorafitError
from lorafit.models.device import compute_dtype, has_accelerator
from lorafit.models.gguf import ensure_gguf_cache, is_gguf, read_gguf_header


def _check_local_path(name: str, what: str) -> None:
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and Path(name).parent.exists()
    if looks_local and not Path(name).expanduser().exists():
        raise LorafitError(f"{what} folder {name} does not exist")


def _load_error(what: str, name: str, error: Exception) -> LorafitError:
    if "trust_remote_code" in str(error):
        return LorafitError(
            f"could not load the {what} {name}: it ships its own Python code (auto_map in its config), "
            "which lorafit never runs unless you set model.trust_remote_code: true; do that only for a "
            "source you trust, or use a model that transformers supports natively."
        )
    return LorafitError(f"could not load the {what} {name}: {' '.join(str(error).split())}")


def _gguf_folder(name: str, dtype: torch.dtype | str, echo: Callable[[str], Any]) -> str:
    """A GGUF file's dense copy in ``dtype`` (a transformers folder, converted on first use: under
    torchrun ``train`` converts it on one process per machine first); any other name as it is."""
    if not is_gguf(name):
        return name
    return str(ensure_gguf_cache(name, dtype=dtype, echo=echo))


def load_tokenizer(cfg: RunConfig, *, echo: Callable[[str], Any] = print, training: bool = False) -> Any:
    """The model's tokenizer (or ``tokenizer.name_or_path``), set up for training, with
    ``tokenizer.chat_template`` (a built-in name, a file or Jinja text) in place of its own.
    ``training`` as for :func:`load_model`: a GGUF base's tokenizer comes from the same dense copy."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer.name_or_path or cfg.model.name_or_path
    name = _gguf_folder(name, load_dtype(cfg, training=training), echo)
    if name == DEMO_MODEL:
        from lorafit.demo import load_demo_tokenizer

        tokenizer = load_demo_tokenizer()
    else:
        _check_local_path(name, "tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                name, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision
            )
        except (OSError, ValueError) as e:
            raise _load_error("tokenizer", name, e) from None
    if cfg.tokenizer.chat_template:
        template, builtin = resolve_chat_template(cfg.tokenizer.chat_template)
        missing = missing_template_tokens(tokenizer, builtin) if builtin else []
        if missing:
            echo(
                f"warning: tokenizer.chat_template: {builtin} is written in {', '.join(missing)}, which this "
                "tokenizer lacks as single tokens; they are split into ordinary pieces and learned as text"
            )
        tokenizer.chat_template = template
    return prepare_tokenizer(
        tokenizer,
        pad_token=cfg.tokenizer.pad_token,
        padding_side=cfg.tokenizer.padding_side,
        model_max_length=cfg.tokenizer.model_max_length,
    )


def stop_token_ids(tokenizer: Any) -> list[int]:
    """eos, plus the token the chat template ends an assistant turn with (``<|end|>`` for Phi-3,
    ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3) when it is another one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = end_of_turn_token(tokenizer)
    if end is not None and end not in ids:
        ids.append(end)
    return ids


def on_cpu(cfg: RunConfig) -> bool:
    """Whether the run computes on the CPU: no accelerator, or ``training_config.use_cpu``."""
    return not has_accelerator() or bool(cfg.training_config.get("use_cpu"))


def _wide_above() -> int:
    """Parameters from which LoRA training keeps a 16-bit model 16-bit on a CPU without 16-bit
    products (``LORAFIT_WIDE_ABOVE`` overrides it: the bench's cuts of Phi-3-mini stand for it)."""
    return int(os.environ.get("LORAFIT_WIDE_ABOVE", 1_000_000_000))


def _widened(cfg: RunConfig, training: bool) -> bool:
    """Whether LoRA training (not DoRA, whose variant multiplies natively) keeps a 16-bit dtype on a
    CPU without 16-bit matrix products, lorafit's training ops multiplying its values as fp32
    products. That halves the weights of a large model (Phi-3-mini: 7.6 GB, not 15.3) at the fp32
    rate; a small one (the demo, SmolLM2-135M) trains faster in fp32, where some backward products
    outside lorafit's ops stay 16-bit (measured on the demo: 158 against 2,268 tokens/s), so below
    :func:`_wide_above` parameters it loads in fp32. A model's size is known here for the demo and
    a GGUF file; any other is checked once loaded (:func:`load_model`)."""
    if not training or cfg.lora.use_dora:
        return False
    name = cfg.model.name_or_path
    if name == DEMO_MODEL:
        return _wide_above() == 0
    if is_gguf(name) and Path(name).expanduser().is_file():
        return read_gguf_header(name).n_elements >= _wide_above()
    return True


def _dtype_and_note(cfg: RunConfig, widened: bool) -> tuple[torch.dtype | str, str | None]:
    name = cfg.model.torch_dtype
    dtype, note = compute_dtype(name, on_cpu=on_cpu(cfg) and not widened)
    if widened and on_cpu(cfg) and compute_dtype(name, on_cpu=True)[1]:
        note = (
            f"model.torch_dtype: {name} kept: this CPU has no native {name} matrix "
            "products, so lorafit's training ops multiply the 16-bit values as float32 products"
        )
    return dtype, note


def load_dtype(cfg: RunConfig, *, training: bool = False) -> torch.dtype | str:
    """The dtype the base model loads in (see :func:`lorafit.models.device.compute_dtype`)."""
    return _dtype_and_note(cfg, _widened(cfg, training))[0]


def planned_dtype(cfg: RunConfig, n_params: int) -> tuple[torch.dtype | str, bool]:
    """The dtype :func:`load_model` will give a training run's model of ``n_params`` parameters, and
    whether its 16-bit products will be widened (``model._lorafit_wide_products``): for planning
    memory before loading."""
    widened = _widened(cfg, True)
    dtype, note = _dtype_and_note(cfg, widened)
    wide = widened and note is not None
    if wide and not cfg.model.quantization and n_params < _wide_above():
        return torch.float32, False
    return dtype, wide


def model_config(cfg: RunConfig, *, training: bool = False) -> Any:
    """The transformers config of the model ``cfg`` names, read without its weights (a GGUF base
    from its converted copy, for the dtype a run, ``training`` or not, loads it in: call
    :func:`prepare_base` first)."""
    name = cfg.model.name_or_path
    if name == DEMO_MODEL:
        from lorafit.demo import demo_config, load_demo_tokenizer

        return demo_config(len(load_demo_tokenizer()))
    from transformers import AutoConfig

    name = _gguf_folder(name, load_dtype(cfg, training=training), print)
    _check_local_path(name, "model")
    try:
        return AutoConfig.from_pretrained(
            name, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision
        )
    except (OSError, ValueError) as e:
        raise _load_error("model", name, e) from None


def prepare_base(cfg: RunConfig, echo: Callable[[str], Any] = print, *, training: bool = False) -> None:
    """Make the base model loadable: a GGUF file is converted to its cached dense copy (once)."""
    for name in {cfg.model.name_or_path, cfg.tokenizer.name_or_path or cfg.model.name_or_path}:
        _gguf_folder(name, load_dtype(cfg, training=training), echo)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a local model, tokenizer, chat template file and ``data.tools`` file named by
    their absolute paths, so that the run's ``lorafit_run.yaml`` finds them from any folder
    (``lorafit chat`` / ``eval`` / ``export``)."""

    def absolute(name: Any) -> Any:
        # a chat template may be Jinja text and data.tools a list: only a short string can be a path
        if not isinstance(name, str) or not name or "\n" in name or "{" in name or len(name) > 1024:
            return name
        return str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name

    model = dataclasses.replace(cfg.model, name_or_path=absolute(cfg.model.name_or_path))
    tokenizer = dataclasses.replace(
        cfg.tokenizer,
        name_or_path=absolute(cfg.tokenizer.name_or_path),
        chat_template=cfg.tokenizer.chat_template
        if cfg.tokenizer.chat_template in BUILTIN_TEMPLATES  # a name, even where a file has it
        else absolute(cfg.tokenizer.chat_template),
    )
    data = dataclasses.replace(cfg.data, tools=absolute(cfg.data.tools))
    return dataclasses.replace(cfg, model=model, tokenizer=tokenizer, data=data)


def load_model(
    cfg: RunConfig, tokenizer: Any, *, echo: Callable[[str], Any] = print, training: bool = False
) -> torch.nn.Module:
    """The base model in the configured dtype (or float32 where this CPU would emulate it, said
    through ``echo``) and attention implementation, 4-bit when ``model.quantization`` says so.

    ``training`` (LoRA training, not DoRA) keeps a 16-bit dtype on such CPUs too: lorafit's
    training ops (:func:`lorafit.kernels.matmul16`) multiply its values as fp32 products, at the
    fp32 rate with half its weight memory and the 16-bit math of the same run elsewhere."""
    m = cfg.model
    widened = _widened(cfg, training)
    dtype, note = _dtype_and_note(cfg, widened)
    quantization = dict(m.quantization) if m.quantization else None
    if quantization and on_cpu(cfg) and not widened:
        half = quantization.get("bnb_4bit_compute_dtype", "float32")
        _, compute_note = compute_dtype(half, on_cpu=True)
        if compute_note:
            quantization["bnb_4bit_compute_dtype"] = "float32"
            echo(compute_note.replace("model.torch_dtype", "model.quantization.bnb_4bit_compute_dtype"))
    if m.name_or_path == DEMO_MODEL:
        from lorafit.demo import build_demo_model

        model = build_demo_model(
            dtype=torch.float32 if dtype == "auto" else dtype, attn_implementation=m.attn_implementation
        )
        if quantization:  # built in memory, so quantized here (hub models quantize while loading)
            from lorafit.models.quant import quantize_model

            quantize_model(model, quantization)
    else:
        from transformers import AutoModelForCausalLM

        name = _gguf_folder(m.name_or_path, dtype, echo)
        _check_local_path(name, "model")
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "attn_implementation": m.attn_implementation,
            "trust_remote_code": m.trust_remote_code,
            "revision": m.revision,
        }
        if m.device_map is not None:
            kwargs["device_map"] = m.device_map
        if quantization:
            from lorafit.models.quant import bnb_config

            kwargs["quantization_config"] = bnb_config(quantization)
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (OSError, ValueError, ImportError) as e:
            raise _load_error("model", m.name_or_path, e) from None
    wide = widened and note is not None  # a note: this CPU would have emulated the 16-bit dtype
    if wide and not quantization and sum(p.numel() for p in model.parameters()) < _wide_above():
        model.float()  # small: fp32 is the faster way on this CPU (see _widened)
        wide = False
        echo(compute_dtype(m.torch_dtype, on_cpu=True)[1])
    elif note:
        echo(note)
    model._lorafit_wide_products = wide  # read by training.run (autocast, widened plain linears)
    if quantization:
        from lorafit.models.quant import prepare_kbit_model

        prepare_kbit_model(model, quantization)
    model.config.use_cache = m.use_cache
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = stop_token_ids(tokenizer)
        gen.pad_token_id = tokenizer.pad_token_id
    return model


def run_config(folder: str | os.PathLike) -> RunConfig:
    """The config a run folder was trained with (``lorafit_run.yaml``), or for any PEFT adapter
    folder a config naming its ``base_model_name_or_path``; the run's own tokenizer copy wins."""
    import json

    from lorafit.adapters.files import CONFIG_NAME
    from lorafit.config import build_config, load_config

    folder = Path(folder)
    if not folder.is_dir():
        raise LorafitError(f"--adapter {folder}: no such folder")
    if (folder / RUN_CONFIG_NAME).is_file():
        cfg = load_config(folder / RUN_CONFIG_NAME)
    elif (folder / CONFIG_NAME).is_file():
        base = json.loads((folder / CONFIG_NAME).read_text()).get("base_model_name_or_path")
        if not base:
            raise LorafitError(f"{folder / CONFIG_NAME} names no base_model_name_or_path")
        cfg = build_config({"model": {"name_or_path": base}})
    else:
        raise LorafitError(f"{folder} is neither a lorafit run folder nor an adapter folder ({CONFIG_NAME})")
    if (folder / "tokenizer_config.json").is_file():
        cfg.tokenizer.name_or_path = str(folder)  # the run's own copy, with its pad token and template
    return cfg


def base_config(folder: str | os.PathLike) -> Any:
    """The transformers config of the base model a run (or adapter folder) was trained on, read
    without loading its weights."""
    return model_config(run_config(folder))


def load_trained(
    folder: str | os.PathLike, *, sixteen_bit: bool = False, echo: Callable[[str], Any] = print
) -> tuple[RunConfig, Any, torch.nn.Module]:
    """``(config, tokenizer, model with the adapter, in eval mode)`` for a run folder or any PEFT
    adapter folder: the base model is the one the run's ``lorafit_run.yaml`` (or the adapter's
    ``base_model_name_or_path``) names, loaded as it was trained (dtype, 4-bit).

    ``sixteen_bit``: the base of a QLoRA run in its original 16-bit weights instead of 4-bit NF4
    (for merging and export: the update then lands on the weights the model was made with, not on
    their NF4 rounding). A base stored in 4-bit has no others: it is dequantized, and ``echo``
    says which weights were used.
    """
    from lorafit.adapters.files import load_adapter

    folder = Path(folder)
    cfg = run_config(folder)
    tokenizer = load_tokenizer(cfg, echo=echo)
    if sixteen_bit and cfg.model.quantization:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization=None))
        model = load_model(cfg, tokenizer, echo=echo)
        if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
            from lorafit.models.quant import dequantize_model

            dequantize_model(model)
            echo(f"{cfg.model.name_or_path} is stored in 4 bits: the adapter goes onto their dequantization")
        else:
            echo(f"QLoRA run: the adapter goes onto the original 16-bit weights of {cfg.model.name_or_path}")
    else:
        model = load_model(cfg, tokenizer, echo=echo)
    load_adapter(model, folder)
    model.eval()
    return cfg, tokenizer, model
