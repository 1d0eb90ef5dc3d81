"""What both sides of the benchmark share: the model sizes, the LoRA settings, the run lengths."""

from __future__ import annotations

from dataclasses import dataclass, field

# Sizes of the bench model (Phi-3-mini: 3072 / 32 / 32 / 8192) and of the --quick one.
BENCH_MODEL = {
    "vocab_size": 32064,
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 1376,
}


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


LORAFIT_CONFIG = "defaults"  # packing, no checkpointing: what `lorafit train` does


@dataclass
class BenchSettings:
    """What both sides share, and how long the benchmark runs.

    Attributes:
        steps: optimizer steps per run.
        warmup: first steps left out of the tokens/s figure (allocator and lazy start-up).
        repeats: runs of each configuration, alternating sides.
        batch_size: rows per step.
        max_length: tokens per row (packed rows) or per example (padded).
        conversations: size of the synthetic chat set.
        learning_rate: AdamW's, under a cosine schedule, on both sides.
        seed: data order, LoRA initialisation and dropout seed.
        trl_configs: which of ``TRL_CONFIGS`` to run.
        quick: the tiny smoke-test model and sizes.
    """

    steps: int = 15
    warmup: int = 2
    repeats: int = 3
    batch_size: int = 8
    max_length: int = 512
    conversations: int = 2000
    learning_rate: float = 5e-4
    seed: int = 0
    trl_configs: list[str] = field(default_factory=lambda: list(TRL_CONFIGS))
    quick: bool = False

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
    ) -> BenchSettings:
        """The defaults (or the quick ones) with the ``lorafit bench`` options applied."""
        settings = cls.quick_settings() if quick else cls()
        for key, value in (("steps", steps), ("warmup", warmup), ("repeats", repeats)):
            if value is not None:
                setattr(settings, key, value)
        if trl:
            settings.trl_configs = [c.strip() for c in trl.split(",") if c.strip()]
        return settings

    @property
    def model_sizes(self) -> dict[str, int]:
        return QUICK_MODEL if self.quick else BENCH_MODEL
