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

from lorafit.config import ModelConfig, RunConfig, TokenizerConfig
from lorafit.constants import DEMO_MODEL, RUN_CONFIG_NAME
from lorafit.data import prepare_tokenizer
from lorafit.data.chat_templates import BUILTIN_TEMPLATES, missing_template_tokens, resolve_chat_template
from lorafit.data.template import end_of_turn_token
from lorafit.errors import LorafitError
from lorafit.models.gguf import ensure_gguf_cache, is_gguf, read_gguf_header
from lorafit.models.precision import Precision


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


def load_tokenizer(
    model: ModelConfig,
    settings: TokenizerConfig,
    precision: Precision | None = None,
    *,
    echo: Callable[[str], Any] = print,
) -> Any:
    """The tokenizer of the ``model`` section's model (or ``settings.name_or_path``: the
    ``tokenizer`` section), set up for training, with ``settings.chat_template`` (a built-in name,
    a file or Jinja text) in place of its own. A GGUF base's tokenizer comes from the dense copy
    in ``precision.load`` (default: the precision of a run that does not train)."""
    from transformers import AutoTokenizer

    name = settings.name_or_path or model.name_or_path
    if is_gguf(name):
        name = _gguf_folder(name, (precision or decide_precision(model, {})).load_dtype, echo)
    if name == DEMO_MODEL:
        from lorafit.demo import load_demo_tokenizer

        tokenizer = load_demo_tokenizer()
    else:
        _check_local_path(name, "tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                name, trust_remote_code=model.trust_remote_code, revision=model.revision
            )
        except (OSError, ValueError) as e:
            raise _load_error("tokenizer", name, e) from None
    if settings.chat_template:
        template, builtin = resolve_chat_template(settings.chat_template)
        missing = missing_template_tokens(tokenizer, builtin) if builtin else []
        if missing:
            echo(
                f"warning: tokenizer.chat_template: {builtin} is written in {', '.join(missing)}, which this "
                "tokenizer lacks as single tokens; they are split into ordinary pieces and learned as text"
            )
        tokenizer.chat_template = template
    return prepare_tokenizer(
        tokenizer,
        pad_token=settings.pad_token,
        padding_side=settings.padding_side,
        model_max_length=settings.model_max_length,
    )


def stop_token_ids(tokenizer: Any) -> list[int]:
    """eos, plus the token the chat template ends an assistant turn with (``<|end|>`` for Phi-3,
    ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3) when it is another one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = end_of_turn_token(tokenizer)
    if end is not None and end not in ids:
        ids.append(end)
    return ids


def parameter_count(model: ModelConfig) -> int:
    """The parameters of the model ``model`` names, known before its weights load: a GGUF file's
    from its header, any other's by building it from its config on the ``meta`` device (no memory,
    tied weights counted once, as ``sum(p.numel() for p in model.parameters())`` counts them)."""
    name = model.name_or_path
    if is_gguf(name) and Path(name).expanduser().is_file():
        return read_gguf_header(name).n_elements
    from transformers import AutoModelForCausalLM

    config = model_config(model)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    return sum(p.numel() for p in built.parameters())


def decide_precision(
    model: ModelConfig, training_config: dict[str, Any], *, training: bool = False, dora: bool = False
) -> Precision:
    """The run's :class:`Precision` on this machine for the ``model`` section and
    ``training_config`` (``training``: LoRA training, ``dora`` with DoRA); the model's size is
    counted (:func:`parameter_count`) only where the decision depends on it."""
    return Precision.decide(
        model, training_config, training=training, dora=dora, count_params=lambda: parameter_count(model)
    )


def model_config(model: ModelConfig, precision: Precision | None = None) -> Any:
    """The transformers config of the model the ``model`` section names, read without its weights
    (a GGUF base from its copy converted in ``precision.load``, default: the precision of a run
    that does not train; call :func:`prepare_base` first)."""
    name = model.name_or_path
    if name == DEMO_MODEL:
        from lorafit.demo import demo_config, load_demo_tokenizer

        return demo_config(len(load_demo_tokenizer()))
    from transformers import AutoConfig

    if is_gguf(name):
        name = _gguf_folder(name, (precision or decide_precision(model, {})).load_dtype, print)
    _check_local_path(name, "model")
    try:
        return AutoConfig.from_pretrained(
            name, trust_remote_code=model.trust_remote_code, revision=model.revision
        )
    except (OSError, ValueError) as e:
        raise _load_error("model", name, e) from None


def prepare_base(
    model: ModelConfig, tokenizer: TokenizerConfig, precision: Precision, echo: Callable[[str], Any] = print
) -> None:
    """Make the base model loadable: a GGUF file is converted to its cached dense copy in
    ``precision.load`` (once)."""
    for name in {model.name_or_path, tokenizer.name_or_path or model.name_or_path}:
        _gguf_folder(name, precision.load_dtype, echo)


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
    m: ModelConfig, tokenizer: Any, precision: Precision, *, echo: Callable[[str], Any] = print
) -> torch.nn.Module:
    """The base model the ``model`` section names, in ``precision.load`` (its notes said through
    ``echo``) and the configured attention implementation, 4-bit when ``model.quantization`` says
    so (computing in ``precision.quant_compute``)."""
    for note in precision.notes:
        echo(note)
    dtype = precision.load_dtype
    quantization = dict(m.quantization) if m.quantization else None
    if quantization and precision.quant_compute is not None:
        quantization["bnb_4bit_compute_dtype"] = precision.quant_compute
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
        try:
            model = None
            if quantization and m.device_map is None and precision.on_cpu:
                # a local 16-bit folder, streamed into 4 bits a tensor at a time (no 16-bit copy kept)
                from lorafit.models.quant_load import load_4bit

                model = load_4bit(
                    name,
                    quantization,
                    dtype=dtype,
                    attn_implementation=m.attn_implementation,
                    trust_remote_code=m.trust_remote_code,
                    revision=m.revision,
                )
            if model is None:
                if quantization:  # transformers quantizes while loading
                    from lorafit.models.quant import bnb_config

                    kwargs["quantization_config"] = bnb_config(quantization)
                model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (OSError, ValueError, ImportError) as e:
            raise _load_error("model", m.name_or_path, e) from None
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
    cfg = run_config(folder)
    return model_config(cfg.model, decide_precision(cfg.model, cfg.training_config))


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
    precision = decide_precision(cfg.model, cfg.training_config)
    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer, precision, echo=echo)
    if sixteen_bit and cfg.model.quantization:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization=None))
        model = load_model(cfg.model, tokenizer, decide_precision(cfg.model, cfg.training_config), echo=echo)
        if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
            from lorafit.models.quant import dequantize_model

            dequantize_model(model)
            echo(f"{cfg.model.name_or_path} is stored in 4 bits: the adapter goes onto their dequantization")
        else:
            echo(f"QLoRA run: the adapter goes onto the original 16-bit weights of {cfg.model.name_or_path}")
    else:
        model = load_model(cfg.model, tokenizer, precision, echo=echo)
    load_adapter(model, folder)
    model.eval()
    return cfg, tokenizer, model
