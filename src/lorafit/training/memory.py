"""The memory planner: a training step's peak resident memory predicted from shapes, and the fewest
decoder layers to recompute (``training_config.checkpoint_layers``) that keep it within a budget.

The prediction is a sum of tensor classes, each counted in bytes from the model's config, the
dtype plan, the row shape and LoRA's settings (``N`` tokens a step, ``h`` hidden, ``I``
intermediate, ``L`` layers, ``k`` of them recomputed)::

    peak = process + weights + LoRA state + kept + max(loss working set, layer backward working set)
           + heap holes + runtime

- process: what the process holds before the model is loaded (Python, torch, the data), measured.
- weights: every parameter in its load dtype; with QLoRA the decoder's linear weights at 4 bits
  plus their block scales, norms in fp32, and nothing of the 16-bit checkpoint: on a CPU it is
  read a tensor at a time and not kept (:mod:`lorafit.models.quant_load`; ``from_pretrained``
  kept it mapped, which made QLoRA peaks 23-32% above this prediction).
- LoRA state: the fp32 adapter, its gradients and AdamW's two moments (16 bytes a parameter).
- kept: what backward needs, per token. A layer not recomputed keeps (with lorafit's lean layers,
  packed attention and LoRA op) its input ``x`` and ``a = x + attention`` in the residual
  stream's dtype with one fp32 ``rsqrt`` each, q, k and v, the attention output, one fp32
  log-sum-exp per head, the MLP's ``gate`` and ``up`` and LoRA's rank-r ``drop(x) A^T`` per
  adapted linear layer. A recomputed layer keeps its input ``x`` alone, and in backward holds one
  layer's full set again while it is rebuilt. The final norm keeps its input, and the loss the
  fp32 gradient of the final hidden state of every trained token.
- loss working set: the output head in the product dtype (an fp32 copy where products are
  widened), a tile of logits and its softmax (:mod:`lorafit.training.loss`).
- layer backward working set: the gradient in flight, the MLP's backward (the SiLU-gate gradients,
  the widest linear's gradient, fp32 operand copies where products are widened, the weight as
  the product multiplies it: a dequantized 16-bit copy with QLoRA, an fp32 one when widened).
- heap holes: the holes each layer's freed (N, h)-sized temporaries leave in glibc's heap, which
  lorafit never trims (``HOLES_PER_LAYER`` of them a layer, ``HOLES_PER_RECOMPUTED_LAYER`` a
  recomputed one, ``HOLES_FIXED`` more whatever the count; measured).
- runtime: what the process grows by in its first steps beyond those (``RUNTIME``, measured:
  torch's kernels and caches, autograd's and the optimizer's bookkeeping).

Everything here is a pure function of shapes and settings: :func:`plan_run` gathers them for a
run config and measures the process and the machine's free memory.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from lorafit.models.precision import Precision

GB = 10**9
# A default budget leaves this share of the memory available at start, and at least MARGIN_MIN, to
# the rest of the machine (the page cache, other processes, the allocator's slack).
MARGIN_SHARE = 0.10
MARGIN_MIN = 512 * 2**20
# Logits per head tile and attention scores per query block (lorafit.training.loss.TILE_LOGITS,
# lorafit.models.attention.TILE_SCORES), copied here so that planning imports no model code.
_TILE = 1 << 22
# What a training process's RSS grows by in its first steps beyond the tensors counted here, whatever
# the model: torch's lazily built kernels and caches, autograd's and the optimizer's bookkeeping.
# Measured on the 4 M-parameter demo at 64 tokens, where activations are negligible: 0.14 GB.
RUNTIME = 150 * 10**6
# glibc serves blocks under 32 MiB from a heap that lorafit never trims (keep_freed_memory: no page
# faults in the next step), and the (N, h)-sized temporaries each decoder layer frees (norm outputs,
# RoPE's temporaries, dropped inputs, projection outputs and their gradients), in forward and when
# a recomputed layer is rebuilt, leave holes between the tensors kept that later requests only
# partly fill. Measured at the second step's peak: Phi-3-mini's widths at 4 layers hold 0.20 GB
# more of them than at 2 (1 x 2,048 tokens): 8 such tensors a layer kept whole. A recomputed layer
# leaves 4 (its forward's temporaries are freed before backward asks for its own), and the last
# layer's 8 stay whatever the count: fitted to Phi-3-mini at full size (32 layers: every layer
# recomputed 11.38 GB with LoRA, 5.72 with QLoRA) and its 2- and 4-layer cuts (docs/memory.md).
HOLES_PER_LAYER = 8
HOLES_PER_RECOMPUTED_LAYER = 4
HOLES_FIXED = 8
# Bytes per 4-bit weight: the NF4 value (half a byte) and, per block of 64, one absmax (one
# byte with double quantization, an fp32 otherwise).
_NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}


@dataclass(frozen=True)
class ModelShapes:
    """What memory depends on in a Llama-family causal LM's config."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool = False
    fused: bool = True  # Phi-3's qkv_proj and gate_up_proj; separate q/k/v/gate/up otherwise

    @classmethod
    def from_config(cls, config: Any) -> ModelShapes:
        """The shapes of a transformers config (its text config for a multimodal one)."""
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            heads = int(c.num_attention_heads)
            return cls(
                vocab=int(c.vocab_size),
                hidden=int(c.hidden_size),
                layers=int(c.num_hidden_layers),
                heads=heads,
                kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
                head_dim=int(getattr(c, "head_dim", None) or c.hidden_size // heads),
                intermediate=int(c.intermediate_size),
                tied=bool(getattr(c, "tie_word_embeddings", False)),
                fused=getattr(c, "model_type", "") in ("phi3", "phi4"),
            )
        except (AttributeError, TypeError) as e:
            raise LorafitError(
                f"training_config.max_memory: the model's config lacks a field the planner reads ({e}); "
                "set training_config.checkpoint_layers or gradient_checkpointing yourself"
            ) from None

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by module name."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        if self.fused:
            return {
                "qkv_proj": (h, q + 2 * kv),
                "o_proj": (q, h),
                "gate_up_proj": (h, 2 * i),
                "down_proj": (i, h),
            }
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        """Weights of the decoder layers' linear layers (what QLoRA stores at 4 bits)."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    def other_params(self) -> int:
        """Embedding, output head (unless tied) and norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def params(self) -> int:
        return self.linear_params() + self.other_params()


@dataclass(frozen=True)
class Widths:
    """The dtype plan, in bytes per element: ``weights`` of the 16/32-bit parameters, ``products`` of
    the linear layers' outputs (the autocast dtype, else the weights'), ``residual`` of the
    residual stream; ``widened``: 16-bit products computed as fp32 products of fp32 copies
    (:func:`lorafit.kernels.widen_products`), as :class:`lorafit.models.precision.Precision`
    decides; ``four_bit``: QLoRA's NF4 base (double-quantized
    scales when ``double_quant``)."""

    weights: int = 2
    products: int = 2
    residual: int = 2
    widened: bool = False
    four_bit: bool = False
    double_quant: bool = True


@dataclass(frozen=True)
class StepSettings:
    """One step's shape: ``batch`` rows of ``length`` tokens; LoRA's rank, the names it targets
    (None: every linear layer but the head) and whether it drops out; packed attention or sdpa."""

    batch: int
    length: int
    rank: int = 16
    targets: tuple[str, ...] | None = None
    dropout: bool = True
    packed: bool = True

    @property
    def tokens(self) -> int:
        return self.batch * self.length


@dataclass(frozen=True)
class Prediction:
    """The predicted peak of a step with ``recomputed`` layers recomputed, by term (bytes)."""

    terms: dict[str, int]
    recomputed: int
    layers: int

    @property
    def peak(self) -> int:
        return sum(self.terms.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GB:.2f}" for name, value in self.terms.items())
        return f"{self.peak / GB:.2f} GB ({parts})"


def spread(count: int, layers: int) -> list[int]:
    """The ``count`` of ``layers`` decoder layers to recompute, spread evenly (indices, ascending)."""
    return sorted({int((i + 0.5) * layers / count) for i in range(count)}) if count else []


def adapted(shapes: ModelShapes, targets: tuple[str, ...] | None) -> dict[str, tuple[int, int]]:
    """The linear layers of one decoder layer that LoRA adapts (names as in ``peft_config``)."""
    layers = shapes.linears()
    if targets is None:
        return layers
    return {name: size for name, size in layers.items() if any(_target_hit(t, name) for t in targets)}


def _target_hit(target: str, name: str) -> bool:
    return name == target or name.endswith("." + target) or bool(re.fullmatch(target, name))


def lora_params(shapes: ModelShapes, settings: StepSettings) -> int:
    """LoRA's parameters: ``r (in + out)`` for each adapted layer."""
    return shapes.layers * sum(settings.rank * (a + b) for a, b in adapted(shapes, settings.targets).values())


def kept_per_token(shapes: ModelShapes, widths: Widths, settings: StepSettings) -> int:
    """Bytes a decoder layer keeps for backward per token when it is not recomputed (module doc)."""
    h, p, res = shapes.hidden, widths.products, widths.residual
    q, kv = shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim
    kept = 2 * res * h + 2 * 4  # x and a, with one fp32 rsqrt each (lean norms)
    kept += p * (q + 2 * kv) + p * q  # q, k, v and the attention output (o_proj's input)
    if settings.packed:
        kept += 4 * shapes.heads  # the log-sum-exp per head
    else:  # sdpa keeps its attention probabilities, a row of them per head and token
        kept += p * shapes.heads * settings.length
    kept += p * 2 * shapes.intermediate  # gate and up
    if widths.four_bit:  # QLoRA's fp32 norms hand back a cast copy, which LoRA's op must keep
        kept += 2 * p * h
    kept += p * settings.rank * len(adapted(shapes, settings.targets))  # u = drop(x) A^T
    return kept


def weight_bytes(shapes: ModelShapes, widths: Widths) -> int:
    if not widths.four_bit:
        return shapes.params() * widths.weights
    norms = (2 * shapes.layers + 1) * shapes.hidden
    embeddings = shapes.other_params() - norms
    linear = shapes.linear_params() * _NF4_BYTES[widths.double_quant]
    return int(linear) + embeddings * widths.weights + norms * 4


def predict(
    shapes: ModelShapes, widths: Widths, settings: StepSettings, recomputed: int, process: int = 0
) -> Prediction:
    """The step's peak resident memory with ``recomputed`` of the decoder layers recomputed."""
    if not 0 <= recomputed <= shapes.layers:
        raise ValueError(f"recomputed={recomputed} is not between 0 and {shapes.layers}")
    n, h, i, v = settings.tokens, shapes.hidden, shapes.intermediate, shapes.vocab
    p, res = widths.products, widths.residual
    wide = 4 if widths.widened else p  # bytes of a product operand as multiplied
    full = kept_per_token(shapes, widths, settings) * n
    # Backward runs from the last layer down; a recomputed layer holds its full set again while the
    # layers below it hold what they keep: the most held at once, with the final norm's input and
    # the loss's fp32 gradient of the hidden state on top.
    chosen = set(spread(recomputed, shapes.layers))
    below, kept = 0, 0
    for layer in range(shapes.layers):
        kept = max(kept, below + full)  # this layer's full set, kept or rebuilt
        below += res * h * n if layer in chosen else full
    kept = max(kept, below) + res * h * n + 4 * h * n
    # The loss's forward: the head as the products multiply it, the trained hidden rows gathered,
    # and a tile of fp32 logits with its softmax (in place) and its 16-bit and widened copies.
    head = v * h * (4 if widths.widened else (p if p != widths.weights else 0))
    tile_rows = max(1, _TILE // v)
    loss_work = head + res * h * n + tile_rows * v * (4 + p + (4 if widths.widened else 0))
    # A layer's backward, at its widest (the MLP): dL/dx in flight in fp32 and in the residual dtype;
    # the SiLU gate's gradients (silu'(gate) * up * g, silu(gate), dgate, dup: 4 of (N, I)) and
    # their concatenation (N, 2I); the gate/up projection's backward with its weight as multiplied
    # (dequantized to 16 bits first with QLoRA), fp32 copies of its gradient and input where
    # widened, and the (N, h) products LoRA adds (drop(x), g_u A, the sum).
    largest_in, largest_out = max(
        adapted(shapes, settings.targets).values() or shapes.linears().values(), key=lambda s: s[0] * s[1]
    )
    weight_copy = (
        largest_in * largest_out * ((wide if wide != widths.weights else 0) + (p if widths.four_bit else 0))
    )
    layer_work = (4 + res) * h * n + 4 * p * i * n + 2 * p * i * n + weight_copy
    layer_work += (4 * (largest_out + largest_in) * n if widths.widened else 0) + 3 * wide * largest_in * n
    lora = lora_params(shapes, settings)
    terms = {
        "process": process,
        "weights": weight_bytes(shapes, widths),
        "LoRA state": 16 * lora,
        "kept": kept,
        "working": max(loss_work, layer_work),
        "heap holes": p
        * h
        * n
        * (
            HOLES_FIXED
            + HOLES_PER_LAYER * (shapes.layers - recomputed)
            + HOLES_PER_RECOMPUTED_LAYER * recomputed
        ),
        "runtime": RUNTIME,
    }
    return Prediction(terms, recomputed, shapes.layers)


@dataclass(frozen=True)
class Plan:
    """The planner's answer: the prediction for the fewest layers recomputed that fit ``budget``
    (``fits`` False: even all of them do not), and how the budget was set."""

    prediction: Prediction
    budget: int
    budget_source: str
    fits: bool

    def describe(self) -> str:
        """The one line ``train`` prints."""
        p = self.prediction
        choice = f"{p.recomputed} of {p.layers} layers recomputed"
        budget = f"budget {self.budget / GB:.2f} GB ({self.budget_source})"
        return f"memory: peak {p.describe()} predicted with {choice}; {budget}"


def choose(
    shapes: ModelShapes, widths: Widths, settings: StepSettings, budget: int, process: int = 0
) -> tuple[Prediction, bool]:
    """The prediction with the fewest layers recomputed whose peak is within ``budget``, and True;
    or the one with every layer recomputed, and False."""
    for recomputed in range(shapes.layers + 1):
        prediction = predict(shapes, widths, settings, recomputed, process)
        if prediction.peak <= budget:
            return prediction, True
    return prediction, False


def longest_fitting(
    shapes: ModelShapes, widths: Widths, settings: StepSettings, budget: int, process: int = 0
) -> int:
    """The longest row (a multiple of 64 tokens, 0 if none) that fits with every layer recomputed."""
    fits = 0
    for length in range(64, settings.length, 64):
        trial = dataclasses.replace(settings, length=length)
        if predict(shapes, widths, trial, shapes.layers, process).peak > budget:
            break
        fits = length
    return fits


def parse_size(value: int | float | str, field: str = "training_config.max_memory") -> int:
    """Bytes of ``12GB``, ``12 GiB``, ``800MB``, ``1.5e10`` or a plain number of bytes (GB = 10^9,
    GiB = 2^30)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
    if match is None or match.group(2) not in units or float(match.group(1)) <= 0:
        raise LorafitError(f"{field}: {value!r} is not a memory size; write e.g. 12GB, 12GiB or 800MB")
    return int(float(match.group(1)) * units[match.group(2)])


def process_rss() -> int:
    """This process's resident memory now, in bytes (0 where it cannot be read)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


def available_memory() -> int | None:
    """Bytes the machine can give without swapping (MemAvailable), or None where unknown."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def default_budget(process: int, available: int) -> int:
    """What the process holds plus what is available, less the margin (module constants)."""
    return process + available - max(MARGIN_MIN, int(MARGIN_SHARE * available))


# -- a run config's plan ---------------------------------------------------------------------------

_CHECKPOINT_KEYS = ("checkpoint_layers", "gradient_checkpointing", "activation_checkpointing")


def run_settings(cfg: Any) -> StepSettings:
    """The step's shape a run config asks for (rows packed or padded to ``data.max_length``)."""
    targets = cfg.lora.target_modules
    return StepSettings(
        batch=_whole(cfg.training_config.get("per_device_train_batch_size"), 8),
        length=int(cfg.data.max_length),
        rank=int(cfg.lora.r),
        targets=None
        if targets == "all-linear"
        else tuple([targets] if isinstance(targets, str) else targets),
        dropout=bool(cfg.lora.lora_dropout),
        packed=bool(cfg.data.packing),
    )


def _whole(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def run_widths(cfg: Any, precision: Precision) -> Widths:
    """The bytes per element of the run's dtype plan: the base loads in ``precision.load`` (a
    :class:`lorafit.models.precision.Precision`), its products in ``precision.autocast`` (else in
    the weights' dtype), widened where ``precision.widened``; 4-bit where ``model.quantization``
    says so."""
    import torch

    dtype = precision.load_dtype
    weights = (
        torch.finfo(dtype).bits // 8 if isinstance(dtype, torch.dtype) and dtype.is_floating_point else 2
    )
    quantization = cfg.model.quantization or {}
    return Widths(
        weights=weights,
        products=2 if precision.autocast else weights,
        residual=weights,
        widened=precision.widened,
        four_bit=bool(quantization.get("load_in_4bit")),
        double_quant=bool(quantization.get("bnb_4bit_use_double_quant", False)),
    )


def _user_choice(tc: dict[str, Any], layers: int) -> int | None:
    """Layers the user's own keys recompute, or None where they set none of them."""
    if not any(key in tc for key in _CHECKPOINT_KEYS):
        return None
    amount = tc.get("checkpoint_layers")
    if amount:
        return round(amount * layers) if isinstance(amount, float) and amount < 1 else int(amount)
    return layers if tc.get("gradient_checkpointing") or tc.get("activation_checkpointing") else 0


def plan_run(
    cfg: Any,
    model_config: Any,
    precision: Precision,
    *,
    process: int | None = None,
    available: int | None = None,
) -> Plan:
    """The plan for a run config whose base model has ``model_config`` (a transformers config),
    computing as ``precision`` (a :class:`lorafit.models.precision.Precision`) says.

    ``process`` (default: measured now) and ``available`` (default: the machine's MemAvailable)
    set the prediction's first term and the default budget. Raises ``LorafitError`` when the
    budget is unknown and not given."""
    shapes = ModelShapes.from_config(model_config)
    widths, settings = run_widths(cfg, precision), run_settings(cfg)
    process = process_rss() if process is None else process
    tc = cfg.training_config
    if tc.get("max_memory") is not None:
        budget, source = parse_size(tc["max_memory"]), "training_config.max_memory"
    else:
        available = available_memory() if available is None else available
        if available is None:
            raise LorafitError("training_config.max_memory: this machine's free memory is unknown; set it")
        budget = default_budget(process, available)
        source = f"free at start less {MARGIN_SHARE:.0%}, at least {MARGIN_MIN // 2**20} MiB"
    chosen = _user_choice(tc, shapes.layers)
    if chosen is not None:
        prediction = predict(shapes, widths, settings, min(chosen, shapes.layers), process)
        return Plan(
            prediction,
            budget,
            source + "; layers recomputed as training_config says",
            prediction.peak <= budget,
        )
    prediction, fits = choose(shapes, widths, settings, budget, process)
    return Plan(prediction, budget, source, fits)


def does_not_fit(
    cfg: Any, model_config: Any, plan: Plan, precision: Precision, *, going_on: bool = False
) -> str:
    """Why a run cannot fit its budget, and what would: a shorter ``data.max_length``, QLoRA;
    ``going_on``: the run goes on anyway (a default budget), else it stops."""
    shapes = ModelShapes.from_config(model_config)
    widths, settings = run_widths(cfg, precision), run_settings(cfg)
    process = plan.prediction.terms["process"]
    ways = []
    length = longest_fitting(shapes, widths, settings, plan.budget, process)
    if length:
        ways.append(f"data.max_length: {length} (or per_device_train_batch_size smaller)")
    if not widths.four_bit:
        four = dataclasses.replace(widths, four_bit=True, double_quant=True)
        qlora = predict(shapes, four, settings, shapes.layers, process)
        ways.append(f"--qlora ({qlora.peak / GB:.2f} GB with every layer recomputed)")
    return (
        f"{plan.describe()}: the step does not fit even with every layer recomputed. "
        + ("What would fit: " + "; ".join(ways) + "." if ways else "Nothing at this row length fits.")
        + (
            " Going on with every layer recomputed (a training_config.max_memory makes this an error)."
            if going_on
            else " Set training_config.max_memory higher to try anyway."
        )
    )


def plan_memory(cfg: Any, precision: Precision, echo: Any = print) -> Any:
    """``cfg`` with the planner's ``checkpoint_layers`` where the user set none of
    ``checkpoint_layers`` / ``gradient_checkpointing``, the plan said in one line through ``echo``;
    raises ``LorafitError`` before the model is loaded when even every layer recomputed does not
    fit a ``max_memory`` the user set (without one, it warns and recomputes every layer).
    Single-process CPU runs only (the budget is this process's resident memory): elsewhere
    ``cfg`` comes back as it is and the settings' defaults decide."""
    from accelerate import PartialState

    from lorafit.models.load import model_config

    tc = cfg.training_config
    if not precision.on_cpu or PartialState().num_processes > 1:
        if tc.get("max_memory") is not None:
            echo(
                "note: training_config.max_memory is planned for single-process CPU runs only; "
                "not applied here"
            )
        return cfg
    config = model_config(cfg.model, precision)
    plan = plan_run(cfg, config, precision)
    user = _user_choice(tc, plan.prediction.layers) is not None
    if not plan.fits and not user:
        if tc.get("max_memory") is not None:
            raise LorafitError(does_not_fit(cfg, config, plan, precision))
        # no budget of the user's: the machine's free memory is a guess at what it will be, so say so
        # and go on with every layer recomputed, as large models trained before there was a plan
        echo("warning: " + does_not_fit(cfg, config, plan, precision, going_on=True))
    else:
        echo(plan.describe() + ("" if plan.fits else ": over the budget"))
    if user:
        return cfg
    return dataclasses.replace(cfg, training_config={**tc, "checkpoint_layers": plan.prediction.recomputed})
