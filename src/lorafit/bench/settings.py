"""What both sides of the benchmark share: the model sizes, the LoRA settings, the run lengths."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafit.errors import LorafitError
from lorafit.models.quant import QLORA_SETTINGS

# Sizes of the small bench model (Phi-3-mini: 3072 / 32 / 32 / 8192), of Phi-3-mini itself (its
# published config, microsoft/Phi-3-mini-4k-instruct) and of the --quick one.
BENCH_MODEL = {
    "vocab_size": 32064,
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 1376,
}


PHI3_MINI = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 8192,
}

SIZES = {"small": BENCH_MODEL, "phi3-mini": PHI3_MINI}


QUICK_MODEL = {
    "vocab_size": 2048,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 176,
}


MODEL_SEED = 1234


LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": "all-linear",
}


# TRL's configurations: name -> (packing, gradient checkpointing).
TRL_CONFIGS = {
    "packing": (True, False),
    "packing+checkpointing": (True, True),
    "padded": (False, False),
    "padded+checkpointing": (False, True),
}


# PEFT + TRL's QLoRA (benchmarks/gpu_check.sh): the same 4-bit settings as lorafit's "qlora",
# PEFT's prepare_model_for_kbit_training, packing and checkpointing.
TRL_QLORA_CONFIGS = {"qlora+packing+checkpointing": (True, True)}


# PEFT + TRL in fp32, weights and math: what a PEFT + TRL user picks on a CPU without bf16 matrix
# instructions (AVX2), where its bf16 run emulates every product at a few percent of the fp32 rate.
TRL_FP32_CONFIGS = {"fp32+packing": (True, False), "fp32+packing+checkpointing": (True, True)}


LORAFIT_CONFIG = "defaults"  # packing, no checkpointing: what `lorafit train` does

# lorafit's configurations: name -> run-config overrides; the first one run is the one the ratios
# are taken for. "lean" recomputes a share of the decoder
# layers (training_config.checkpoint_layers) to stay within PEFT + TRL's peak memory; "qlora" is the
# 4-bit NF4 base (the Phi-3 QLoRA sample's settings) with the layers recomputed that 6 GB need
# for Phi-3-mini at 1 x 2048 (3/4 of them: 2.3 GB of weights, 1.4 GB of activations).
LORAFIT_CONFIGS: dict[str, dict] = {
    "defaults": {},
    # no layer recomputed (lorafit train's default checkpoints models above 1 B parameters)
    "fast": {"training_config": {"gradient_checkpointing": False}},
    "lean": {"training_config": {"checkpoint_layers": 0.25}},
    "qlora": {
        "model": {"quantization": dict(QLORA_SETTINGS)},
        "training_config": {"checkpoint_layers": 0.75},
    },
}


@dataclass
class BenchSettings:
    """What both sides share, and how long the benchmark runs.

    Attributes:
        size: the model: ``small`` (hidden 512, 8 layers) or ``phi3-mini`` (its published config);
            each has its own defaults for the fields below (``for_size``).
        layers: decoder layers, if not the size's own (a cut of its widths; labelled as such).
        steps: optimizer steps per run.
        warmup: first steps left out of the tokens/s figure (allocator and lazy start-up).
        repeats: runs of each configuration, alternating sides.
        batch_size: rows per step.
        max_length: tokens per row (packed rows) or per example (padded).
        conversations: size of the synthetic chat set.
        learning_rate: AdamW's, under a cosine schedule, on both sides.
        seed: data order, LoRA initialisation and dropout seed.
        min_tokens: with ``max_tokens``, the range of tokens per chat of the synthetic data
            (None: the small bench's short chats).
        max_tokens: see ``min_tokens``.
        parity_layers: the parity check's model: the bench model's widths with this many layers
            (None: the bench model itself).
        parity_length: the parity check's row length (None: ``max_length``; 0: no parity check,
            for CPUs without bf16 instructions, where PEFT's bf16 side of it is emulated: tens of
            minutes at Phi-3-mini's widths).
        trl_configs: which of ``TRL_CONFIGS`` to run.
        lorafit_configs: which of ``LORAFIT_CONFIGS`` to run.
        quick: the tiny smoke-test model and sizes.
    """

    size: str = "small"
    layers: int | None = None

    steps: int = 15
    warmup: int = 2
    repeats: int = 3
    batch_size: int = 8
    max_length: int = 512
    conversations: int = 2000
    learning_rate: float = 5e-4
    seed: int = 0
    min_tokens: int | None = None
    max_tokens: int | None = None
    parity_layers: int | None = None
    parity_length: int | None = None
    trl_configs: list[str] = field(default_factory=lambda: list(TRL_CONFIGS))
    lorafit_configs: list[str] = field(default_factory=lambda: [LORAFIT_CONFIG])
    quick: bool = False

    @classmethod
    def for_size(cls, size: str) -> BenchSettings:
        """The defaults of ``size``. ``phi3-mini``: 1 row of 2048 tokens a step, chats of 260 to
        1,900 tokens, 4 steps (1 warm-up) x 2 runs, PEFT + TRL's best setting that fits 24 GB
        (packing with gradient checkpointing; without it PEFT keeps about 12 GB of activations
        more), and lorafit's fast (nothing recomputed), lean and QLoRA settings."""
        if size not in SIZES:
            raise LorafitError(f"--size: unknown size {size!r}; expected one of {', '.join(SIZES)}")
        if size == "small":
            return cls()
        return cls(
            size=size,
            steps=4,
            warmup=1,
            repeats=2,
            batch_size=1,
            max_length=2048,
            conversations=240,
            min_tokens=260,
            max_tokens=1900,
            parity_layers=2,
            parity_length=512,
            trl_configs=["packing+checkpointing"],
            lorafit_configs=["fast", "lean", "qlora"],
        )

    @classmethod
    def quick_settings(cls) -> BenchSettings:
        return cls(
            steps=3,
            warmup=1,
            repeats=1,
            batch_size=4,
            max_length=128,
            conversations=64,
            trl_configs=["packing"],
            quick=True,
        )

    @classmethod
    def from_options(
        cls,
        quick: bool = False,
        steps: int | None = None,
        warmup: int | None = None,
        repeats: int | None = None,
        trl: str | None = None,
        size: str = "small",
        layers: int | None = None,
        max_length: int | None = None,
        lorafit: str | None = None,
        parity_length: int | None = None,
    ) -> BenchSettings:
        """The defaults of ``size`` (or the quick ones) with the ``lorafit bench`` options applied."""
        settings = cls.quick_settings() if quick else cls.for_size(size)
        for key, value in (
            ("steps", steps),
            ("warmup", warmup),
            ("repeats", repeats),
            ("layers", layers),
            ("max_length", max_length),
            ("parity_length", parity_length),
        ):
            if value is not None:
                setattr(settings, key, value)
        if trl is not None:  # "" runs lorafit alone
            settings.trl_configs = [c.strip() for c in trl.split(",") if c.strip()]
        if lorafit:
            settings.lorafit_configs = [c.strip() for c in lorafit.split(",") if c.strip()]
        if settings.max_tokens is not None and settings.max_tokens > settings.max_length:
            settings.max_tokens = settings.max_length - 16
            settings.min_tokens = min(settings.min_tokens or 1, settings.max_tokens // 4)
        return settings

    @property
    def model_sizes(self) -> dict[str, int]:
        sizes = dict(QUICK_MODEL if self.quick else SIZES[self.size])
        if self.layers is not None:
            sizes["num_hidden_layers"] = self.layers
        return sizes

    @property
    def model_name(self) -> str:
        """How the report names the model: the size, and the cut if there is one."""
        name = "quick" if self.quick else self.size
        full = (QUICK_MODEL if self.quick else SIZES[self.size])["num_hidden_layers"]
        if self.layers is not None and self.layers != full:
            name += f" (its widths, {self.layers} of {full} layers)"
        return name
