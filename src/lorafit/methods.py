"""The training methods and the ``training_config`` keys each adds to TrainingArguments'.

``method: sft`` (the default) learns the assistant turns. The preference methods take TRL's key
names verbatim, as TRL 1.16 spells them: ``dpo`` (``DPOConfig``), ``orpo`` (``ORPOConfig``),
``simpo`` (``CPOConfig`` with ``loss_type: simpo``) and ``kto`` (``KTOConfig``); a config
written for TRL's trainer moves over unchanged for the keys listed here. Keys of those TRL
configs that lorafit does not implement are named in ``UNSUPPORTED`` and refused with a
message, never ignored. Imports nothing of lorafit.
"""

from __future__ import annotations

from typing import Any

METHODS = ("sft", "dpo", "orpo", "simpo", "kto")
PREFERENCE_METHODS = METHODS[1:]

# DPO loss types implemented (TRL's DPOConfig.loss_type values, same math). ``sft`` is the chosen
# answers' NLL, meant to be combined with another (``loss_type: [sigmoid, sft]``, ``loss_weights``).
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sft")
TRUNCATION_MODES = ("keep_start", "keep_end")

_COMMON: dict[str, tuple[Any, Any]] = {
    # key: (type, default). max_length None means data.max_length (lorafit's own default).
    "beta": (float, 0.1),
    "max_length": (int | None, None),
    "disable_dropout": (bool, True),
}
_WITH_REFERENCE = {
    # True, unlike TRL: one reference pass before training costs what a pass per step costs in the
    # first epoch and saves it in every later one (measured: docs/preference.md); the policy
    # forward alone remains in each step.
    "precompute_ref_log_probs": (bool, True),
    "precompute_ref_batch_size": (int | None, None),
}

METHOD_KEYS: dict[str, dict[str, tuple[Any, Any]]] = {
    "sft": {},
    "dpo": {
        **_COMMON,
        **_WITH_REFERENCE,
        "loss_type": (str | list, "sigmoid"),
        "loss_weights": (list | None, None),
        "label_smoothing": (float, 0.0),
        "truncation_mode": (str, "keep_start"),
    },
    "orpo": {**_COMMON},
    # SimPO is CPO's loss_type "simpo"; cpo_alpha (the NLL term's weight) defaults to 0 here, which
    # is SimPO as published (CPOConfig's 1.0 is CPO + SimPO's margin). Set it to match a CPO run.
    "simpo": {
        **_COMMON,
        "loss_type": (str, "simpo"),
        "simpo_gamma": (float, 0.5),
        "cpo_alpha": (float, 0.0),
        "label_smoothing": (float, 0.0),
    },
    "kto": {
        **_COMMON,
        **_WITH_REFERENCE,
        "loss_type": (str, "kto"),
        "desirable_weight": (float, 1.0),
        "undesirable_weight": (float, 1.0),
    },
}

# Keys of TRL's configs for these methods that lorafit does not implement: refused, not ignored.
UNSUPPORTED = (
    "ld_alpha",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "use_weighting",
    "discopop_tau",
    "sync_ref_model",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "padding_free",
    "pad_to_multiple_of",
    "max_completion_length",
    "max_prompt_length",
    "alpha",
    "generate_during_eval",
    "train_sampling_strategy",
    "activation_offloading",
    "model_init_kwargs",
    "dataset_num_proc",
    "router_aux_loss_coef",
)

ALL_METHOD_KEYS = sorted({key for keys in METHOD_KEYS.values() for key in keys})


def method_defaults(method: str) -> dict[str, Any]:
    """The method's keys and their defaults (TRL's, but ``max_length`` None: ``data.max_length``)."""
    return {key: default for key, (_, default) in METHOD_KEYS[method].items()}
