"""Preference tuning on lorafit's engine: DPO (sigmoid, IPO, hinge, robust), ORPO, SimPO and KTO.

Every method scores sequences by the log-probabilities of their answer tokens,
``logp(y|x) = sum_t log softmax(z_t)[y_t]``, taken from the memory-light head (the decoder's
hidden states at the answer positions only, projected in tiles: never ``tokens x vocabulary``
logits). With ``s = logp_policy - logp_reference`` (the implicit reward is ``beta * s``) and
``d = s_chosen - s_rejected``, the losses are TRL 1.16's, term for term:

* DPO ``sigmoid``: ``-log sigma(beta d)``; ``hinge``: ``relu(1 - beta d)``; ``ipo``:
  ``(d_avg - 1 / (2 beta))^2`` with each ``s`` divided by its answer's token count; ``robust``:
  ``((1 - eps) (-log sigma(beta d)) - eps (-log sigma(-beta d))) / (1 - 2 eps)``, eps =
  ``label_smoothing``; ``sft``: the chosen answers' NLL, ``-mean log softmax(z_t)[y_t]`` over
  every chosen answer token of the batch. A list of types is their sum weighted by
  ``loss_weights`` (1 each by default), as TRL combines them (``[sigmoid, sft]`` is RPO).
* ORPO (no reference): with ``p`` = the mean answer log-prob, ``log odds = (p_c - p_r) -
  (log(1 - e^p_c) - log(1 - e^p_r))``, loss ``NLL - beta log sigma(log odds)``, the NLL over the
  chosen sequences' every token (prompt included, as TRL's ORPOTrainer).
* SimPO (no reference; CPO's ``loss_type: simpo``): ``-log sigma(beta (p_c - p_r) - gamma)`` with
  mean log-probs, smoothed as DPO's sigmoid, plus ``cpo_alpha`` times the chosen answers' NLL.
* KTO: ``z = max(0, mean(logp - logp_ref) over mismatched pairs)`` (detached), desirable
  ``w_d (1 - sigma(beta (s - z)))``, undesirable ``w_u (1 - sigma(beta (z - s)))``, averaged.

The reference is the same model, never a second copy: with a fresh adapter it is the base
model (every LoRA layer skips its update for the reference pass); continuing from an adapter
(``model.adapter``), it is that adapter as it was loaded (its starting tensors are kept, a few
MB, and swapped in for the reference pass). With ``precompute_ref_log_probs`` the reference
log-probs are taken in one pass over the data before training.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.constants import IGNORE_INDEX
from lorafit.errors import LorafitError, did_you_mean
from lorafit.kernels import widen_products
from lorafit.training import loss as lf_loss
from lorafit.training.trainer import LorafitTrainer

__all__ = [
    "PreferenceTrainer",
    "Reference",
    "dpo_loss",
    "kto_loss",
    "orpo_loss",
    "sequence_logps",
    "simpo_loss",
    "token_logps",
]


# -- per-token log-probabilities from the memory-light head -----------------------------------


def head_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """``log softmax(hidden @ weight.T + bias)[i, targets_i]`` for each row, in tiles: (M,) fp32.

    ``hidden``: (M, H); ``weight``: (V, H), frozen. Products in the autocast dtype (else
    ``hidden``'s), the softmax in fp32, as :func:`lorafit.training.loss.head_cross_entropy_sum`.
    The gradient of each row's log-prob with respect to its hidden state,
    ``(onehot(t_i) - softmax(z_i)) @ W``, is formed from the same tile and kept (M, H); backward
    scales row ``i`` by the incoming gradient of its log-prob.
    """
    return _HeadTokenLogps.apply(hidden, weight, bias, targets, *lf_loss.head_tiling(hidden, weight))


class _HeadTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype, rows, need_grad):  # noqa: ANN001, ANN205
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            wide = widen_products(dtype, hidden.device.type)
            if wide:  # fp32 products of the 16-bit values, rounded as a 16-bit product would be
                w = w.float()
                b = None if b is None else b.float()
            out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows].to(dtype)  # (c, H)
                t = targets[start : start + rows]  # (c,)
                logits = F.linear(h.float() if wide else h, w, b)  # (c, V)
                logits = logits.to(dtype).float() if wide else logits.float()
                picked = logits.gather(1, t[:, None]).squeeze(1)
                top = logits.amax(dim=-1, keepdim=True)
                top = top.masked_fill(~top.isfinite(), 0.0)
                exps = logits.sub_(top).exp_()  # (c, V)
                sums = exps.sum(dim=-1, keepdim=True)
                out[start : start + rows] = picked - (sums.log() + top).squeeze(1)
                if need_grad:
                    minus = exps.div_(sums).neg_()  # -softmax, in place
                    minus[torch.arange(len(t), device=t.device), t] += 1.0  # onehot - softmax
                    minus = minus.to(dtype)
                    grad[start : start + rows] = (minus.float() @ w).to(dtype) if wide else minus @ w
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return (grad * grad_out[:, None]).to(ctx.hidden_dtype), None, None, None, None, None, None


def token_logps(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    *,
    unwrapped: nn.Module | None = None,
) -> torch.Tensor:
    """Log-probabilities (fp32) of the tokens at the positions of ``mask`` (1, T) bool, in order.

    Position ``t`` holds token ``input_ids[t]``, predicted from the hidden state at ``t - 1``
    (``mask[:, 0]`` must be False). The forward runs on ``input_ids``, ``position_ids`` and the
    packed boundaries; the head sees only the masked positions (see :func:`head_token_logps`),
    or, for a model the fast path cannot serve, the model's logits are used.
    """
    unwrapped = model if unwrapped is None else unwrapped
    inputs = {
        k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k")
    }
    ids = batch["input_ids"]
    targets = ids[:, 1:][mask[:, 1:]]
    if not lf_loss.supports_fast_loss(unwrapped):
        logits = model(**inputs, use_cache=False).logits[:, :-1][mask[:, 1:]].float()
        return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    captured: list[torch.Tensor] = []

    def keep_hidden(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0])  # (1, T, hidden), after the final norm

    handle = unwrapped.get_decoder().register_forward_hook(keep_hidden)
    try:
        no_position = torch.empty(0, dtype=torch.long, device=ids.device)
        model(**inputs, logits_to_keep=no_position, use_cache=False)
    finally:
        handle.remove()
    hidden = captured[-1][:, :-1][mask[:, 1:]]  # (M, hidden)
    head = unwrapped.get_output_embeddings()
    return head_token_logps(hidden, head.weight, head.bias, targets)


def sequence_logps(
    values: torch.Tensor, owners: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of per-token ``values`` and token counts: ``(sums (count,), counts (count,))``."""
    sums = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, owners, values)
    counts = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(
        0, owners, torch.ones_like(values)
    )
    return sums, counts


# -- the losses (each returns the batch loss and TRL's logged metrics) ------------------------


def _pair_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor
) -> dict[str, float]:
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": chosen.detach().mean().item(),
        "logps/rejected": rejected.detach().mean().item(),
    }


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO's loss over (B,) summed answer log-probs (see the module docstring); ``chosen_nll``
    (the chosen answer tokens' mean NLL) is needed only by the ``sft`` type."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(types)
    loss = delta.new_zeros(())
    for kind, weight in zip(types, weights, strict=True):
        if kind == "sigmoid":
            losses = -F.logsigmoid(beta * delta)
        elif kind == "hinge":
            losses = torch.relu(1 - beta * delta)
        elif kind == "ipo":
            per_token = chosen_ratio / chosen_tokens.clamp(min=1.0) - rejected_ratio / rejected_tokens.clamp(
                min=1.0
            )
            losses = (per_token - 1 / (2 * beta)) ** 2
        elif kind == "robust":
            eps = label_smoothing
            agree, disagree = -F.logsigmoid(beta * delta), -F.logsigmoid(-beta * delta)
            losses = ((1 - eps) * agree - eps * disagree) / (1 - 2 * eps)
        elif kind == "sft":
            if chosen_nll is None:
                raise ValueError("DPO loss_type 'sft' needs the chosen answers' NLL")
            losses = chosen_nll.reshape(1)
        else:
            raise ValueError(f"unknown DPO loss_type {kind!r}")
        loss = loss + weight * losses.mean()
    metrics = _pair_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), chosen, rejected)
    return loss, metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, accurate on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, nll: torch.Tensor, *, beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """ORPO over (B,) mean answer log-probs and the chosen sequences' NLL (a scalar)."""
    c, r = chosen_mean.float(), rejected_mean.float()
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    loss = nll - (beta * ratio).mean()
    metrics = _pair_metrics(beta * c.detach(), beta * r.detach(), c, r)
    metrics.update(
        nll_loss=nll.detach().item(),
        log_odds_ratio=ratio.detach().mean().item(),
        log_odds_chosen=log_odds.detach().mean().item(),
    )
    return loss, metrics


def simpo_loss(
    chosen_mean: torch.Tensor,
    rejected_mean: torch.Tensor,
    nll: torch.Tensor,
    *,
    beta: float,
    simpo_gamma: float,
    cpo_alpha: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SimPO (CPO's ``simpo``) over (B,) mean answer log-probs, plus ``cpo_alpha`` x NLL."""
    logits = (chosen_mean - rejected_mean) - simpo_gamma / beta
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )
    loss = losses.mean() + cpo_alpha * nll
    metrics = _pair_metrics(
        beta * chosen_mean.detach(), beta * rejected_mean.detach(), chosen_mean, rejected_mean
    )
    metrics["nll_loss"] = nll.detach().item()
    return loss, metrics


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO over (B,) summed completion log-probs, their labels, and the mismatched pairs' log-probs."""
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    good, bad = ratio[desirable], ratio[~desirable]
    losses = torch.cat(
        (
            desirable_weight * (1 - torch.sigmoid(beta * (good - kl))),
            undesirable_weight * (1 - torch.sigmoid(beta * (kl - bad))),
        )
    )
    metrics: dict[str, float] = {"kl": kl.item()}
    if len(good):
        metrics["rewards/chosen"] = (beta * good.detach()).sum().item() / len(good)
        metrics["logps/chosen"] = logps[desirable].detach().sum().item() / len(good)
    if len(bad):
        metrics["rewards/rejected"] = (beta * bad.detach()).sum().item() / len(bad)
        metrics["logps/rejected"] = logps[~desirable].detach().sum().item() / len(bad)
    if len(good) and len(bad):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.nanmean(), metrics


_PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
# What each method's loss logs (TRL's names), in the order the ranks sum them.
METRIC_NAMES = {
    "dpo": _PAIR_METRICS,
    "orpo": (*_PAIR_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen"),
    "simpo": (*_PAIR_METRICS, "nll_loss"),
    "kto": ("kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "rewards/margins"),
}


# -- the reference: the same weights, the adapter off or at its start --------------------------


class Reference:
    """The reference policy on the training model itself, with no second copy of it.

    ``start_tensors`` None: the base model (each LoRA layer is marked merged for the pass, so it
    computes ``W0 x + b`` alone; nothing is merged). Otherwise a dict of the adapter's starting
    tensors (parameter name -> tensor), swapped into the parameters for the pass and back.
    """

    def __init__(self, model: nn.Module, start_tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.model = model
        self.start = start_tensors

    @classmethod
    def snapshot(cls, model: nn.Module) -> Reference:
        """The adapter as it is now (call after loading the starting adapter)."""
        return cls(model, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.start is None:
            layers = [m for m in self.model.modules() if getattr(m, "has_lora", False) and not m.merged]
            for layer in layers:
                layer.merged = True
            try:
                yield
            finally:
                for layer in layers:
                    layer.merged = False
            return
        params = dict(self.model.named_parameters())
        kept = {}
        with torch.no_grad():
            for name, tensor in self.start.items():
                kept[name] = params[name].data
                params[name].data = tensor
        try:
            yield
        finally:
            for name, data in kept.items():
                params[name].data = data


# -- the trainer ------------------------------------------------------------------------------


class PreferenceTrainer(LorafitTrainer):
    """``LorafitTrainer`` whose loss is a preference method's, logging TRL's metric names.

    ``settings`` are the method's keys (``lorafit.methods.METHOD_KEYS``) as resolved for the run;
    ``reference`` is the :class:`Reference` (None for ORPO and SimPO, which have none).
    """

    def __init__(
        self, *args: Any, method: str, settings: dict[str, Any], reference: Reference | None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.method = method
        self.settings = settings
        self.reference = reference
        self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean: Trainer scales it
        if method == "kto":  # as TRL's default: the KL rows pair each example with its neighbour
            self.args.train_sampling_strategy = "sequential"
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        if model.training:
            self._tokens = (
                self._tokens
                + inputs["input_ids"].numel()
                + (inputs["kl_input_ids"].numel() if "kl_input_ids" in inputs else 0)
            )
        loss, metrics = self.preference_loss(model, inputs)
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        return (loss, {}) if return_outputs else loss

    def preference_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The method's loss of one batch from :class:`lorafit.data.preference.PreferenceCollator`."""
        s = self.settings
        unwrapped = self.accelerator.unwrap_model(model)
        labels = inputs["labels"]
        answer = labels != IGNORE_INDEX
        owners = inputs["sequence_ids"]
        if self.method == "kto":
            return self._kto(model, unwrapped, inputs, answer, owners)
        pairs = int(owners.max()) // 2 + 1
        if self.method == "orpo":  # the chosen sequences' every predicted token, and the answers
            scored = answer | ((owners < pairs) & (inputs["position_ids"] > 0))
        else:
            scored = answer
        values = token_logps(model, inputs, scored, unwrapped=unwrapped)
        scored_owners = owners[scored]
        in_answer = answer[scored]
        sums, counts = sequence_logps(values[in_answer], scored_owners[in_answer], 2 * pairs)
        chosen, rejected = sums[:pairs], sums[pairs:]
        chosen_n, rejected_n = counts[:pairs], counts[pairs:]
        if self.method == "dpo":
            if "ref_chosen_logps" in inputs:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref = self.reference_logps(model, inputs)
                ref_chosen, ref_rejected = ref[:pairs], ref[pairs:]
            chosen_answer = in_answer & (scored_owners < pairs)
            return dpo_loss(
                chosen,
                rejected,
                ref_chosen.to(chosen.device),
                ref_rejected.to(chosen.device),
                chosen_n,
                rejected_n,
                beta=s["beta"],
                loss_type=s["loss_type"],
                loss_weights=s.get("loss_weights"),
                label_smoothing=s.get("label_smoothing", 0.0),
                chosen_nll=-values[chosen_answer].mean() if "sft" in _as_list(s["loss_type"]) else None,
            )
        chosen_mean, rejected_mean = chosen / chosen_n, rejected / rejected_n
        if self.method == "orpo":
            nll_mask = scored_owners < pairs
            nll = -values[nll_mask].mean()
            return orpo_loss(chosen_mean, rejected_mean, nll, beta=s["beta"])
        nll = -values[in_answer & (scored_owners < pairs)].mean() if s["cpo_alpha"] else values.new_zeros(())
        return simpo_loss(
            chosen_mean,
            rejected_mean,
            nll,
            beta=s["beta"],
            simpo_gamma=s["simpo_gamma"],
            cpo_alpha=s["cpo_alpha"],
            label_smoothing=s.get("label_smoothing", 0.0),
        )

    def reference_logps(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], prefix: str = ""
    ) -> torch.Tensor:
        """Summed answer log-probs of each sequence under the reference: (sequences,)."""
        unwrapped = self.accelerator.unwrap_model(model)
        batch = {k[len(prefix) :]: v for k, v in inputs.items() if k.startswith(prefix)}
        answer = batch["labels"] != IGNORE_INDEX
        count = int(batch["sequence_ids"].max()) + 1
        if self.reference is None:
            raise LorafitError(f"method {self.method} has no reference model; its loss takes none")
        with torch.no_grad(), self.reference.active():
            values = token_logps(model, batch, answer, unwrapped=unwrapped)
        return sequence_logps(values, batch["sequence_ids"][answer], count)[0]

    def _kto(self, model, unwrapped, inputs, answer, owners):  # noqa: ANN001, ANN202
        s = self.settings
        count = int(owners.max()) + 1
        values = token_logps(model, inputs, answer, unwrapped=unwrapped)
        logps = sequence_logps(values, owners[answer], count)[0]
        kl_batch = {k[3:]: v for k, v in inputs.items() if k.startswith("kl_")}
        kl_answer = kl_batch["labels"] != IGNORE_INDEX
        with torch.no_grad():
            kl_values = token_logps(model, kl_batch, kl_answer, unwrapped=unwrapped)
        kl_logps = sequence_logps(kl_values, kl_batch["sequence_ids"][kl_answer], count)[0]
        if "ref_logps" in inputs:
            ref_logps, ref_kl = inputs["ref_logps"].to(logps.device), inputs["ref_kl_logps"].to(logps.device)
        else:
            ref_logps = self.reference_logps(model, inputs)
            ref_kl = self.reference_logps(model, inputs, prefix="kl_")
        return kto_loss(
            logps,
            ref_logps,
            kl_logps,
            ref_kl,
            inputs["label"],
            beta=s["beta"],
            desirable_weight=s["desirable_weight"],
            undesirable_weight=s["undesirable_weight"],
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: ANN001, ANN201
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        averaged = self._averaged_metrics(mode)
        if mode == "eval":
            averaged = {f"eval_{k}": v for k, v in averaged.items()}
        logs.update(averaged)
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def _averaged_metrics(self, mode: str) -> dict[str, float]:
        """Each metric's mean over the batches since the last log, on every process together.

        Trainer logs on every rank (the loss is gathered there), so every rank joins one sum of
        ``(sum, count)`` per metric name, in the fixed order of ``METRIC_NAMES``: a rank whose
        batches gave no value for a name (KTO without desirable examples) adds ``(0, 0)``.
        With one process this is ``sum(values) / len(values)``."""
        values = self._metrics[mode]
        names = METRIC_NAMES[self.method]
        unknown = set(values) - set(names)
        if unknown:  # a new metric must be listed, or the ranks would disagree on what to sum
            raise RuntimeError(f"metrics {sorted(unknown)} are missing from METRIC_NAMES[{self.method!r}]")
        totals = [[float(sum(values.get(k, ()))), float(len(values.get(k, ())))] for k in names]
        if self.accelerator.num_processes > 1:
            summed = torch.tensor(totals, dtype=torch.float64, device=self.args.device)
            totals = self.accelerator.reduce(summed, reduction="sum").tolist()
        return {k: total / count for k, (total, count) in zip(names, totals, strict=True) if count}


def precompute_reference(trainer: PreferenceTrainer, dataset: Any, collator: Any, batch_size: int) -> None:
    """One pass over ``dataset`` before training: each example gets its reference log-probs
    (``ref_chosen_logps``/``ref_rejected_logps``, or KTO's ``ref_logps``/``ref_kl_logps``)."""
    model = trainer.model
    device = trainer.args.device
    examples = dataset.examples
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        with trainer.compute_loss_context_manager():
            ref = trainer.reference_logps(model, batch).cpu()
            ref_kl = (
                trainer.reference_logps(model, batch, prefix="kl_").cpu() if "kl_input_ids" in batch else None
            )
        n = len(chunk)
        for i, example in enumerate(chunk):
            if ref_kl is None:
                example["ref_chosen_logps"], example["ref_rejected_logps"] = float(ref[i]), float(ref[n + i])
            else:
                example["ref_logps"], example["ref_kl_logps"] = float(ref[i]), float(ref_kl[i])
    model.train(was_training)


# -- the run: data, settings and trainer for lorafit.training.run ------------------------------


def _as_list(loss_type: str | list[str]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else loss_type


def _dpo_loss_types(loss_type: Any, loss_weights: Any) -> str | list[str]:
    """DPO's ``loss_type`` checked: one type as a string, several (TRL's combination) as a list
    whose ``loss_weights`` (if given) match it one for one."""
    from lorafit.methods import DPO_LOSS_TYPES

    types = [loss_type] if isinstance(loss_type, str) else list(loss_type or [])
    if not types:
        raise LorafitError("training_config.loss_type: empty; expected one of " + ", ".join(DPO_LOSS_TYPES))
    for kind in types:
        if kind not in DPO_LOSS_TYPES:
            raise LorafitError(
                f"training_config.loss_type: {kind!r}{did_you_mean(str(kind), DPO_LOSS_TYPES)}; method dpo "
                f"takes {', '.join(DPO_LOSS_TYPES)}, or a list of them combined by loss_weights"
            )
    if len(set(types)) != len(types):
        raise LorafitError(f"training_config.loss_type: {types!r} names a type twice")
    if loss_weights is not None:
        if len(loss_weights) != len(types) or not all(isinstance(w, (int, float)) for w in loss_weights):
            raise LorafitError(
                f"training_config.loss_weights: {loss_weights!r}; expected one number per loss_type {types!r}"
            )
    return types[0] if len(types) == 1 else types


def method_settings(cfg: Any) -> dict[str, Any]:
    """The method's keys for this run: TRL's defaults, the user's ``training_config`` values, and
    ``max_length`` from ``data.max_length`` when ``training_config`` does not set it."""
    from lorafit.methods import DPO_LOSS_TYPES, method_defaults

    settings = method_defaults(cfg.method)
    settings.update({k: v for k, v in cfg.training_config.items() if k in settings})
    if settings.get("max_length") is None:
        settings["max_length"] = cfg.data.max_length
    loss_type = settings.get("loss_type")
    allowed = {"dpo": DPO_LOSS_TYPES, "simpo": ("simpo",), "kto": ("kto",)}.get(cfg.method, ())
    if cfg.method == "dpo":
        settings["loss_type"] = _dpo_loss_types(loss_type, settings.get("loss_weights"))
    elif allowed and loss_type not in allowed:
        raise LorafitError(
            f"training_config.loss_type: {loss_type!r}{did_you_mean(str(loss_type), allowed)}; method "
            f"{cfg.method} takes {', '.join(allowed)}"
        )
    if settings["beta"] <= 0:
        raise LorafitError(f"training_config.beta: {settings['beta']}; expected a number above 0")
    if not 0 <= settings.get("label_smoothing", 0.0) < 0.5:
        raise LorafitError(
            f"training_config.label_smoothing: {settings['label_smoothing']}; expected 0 <= value < 0.5"
        )
    return settings


def tokenizing_settings(cfg: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """How a run tokenises its pairs (``build_preference_split``'s method and length settings),
    for training and for scoring a file afterwards alike."""
    return dict(
        method=cfg.method,
        max_length=settings["max_length"],
        truncation_mode=settings.get("truncation_mode", "keep_start"),
        overlong=cfg.data.overlong,
    )


def load_preference_data(cfg: Any, tokenizer: Any, seed: int, echo: Any) -> tuple[Any, Any, dict, str]:
    """Train and eval :class:`PreferenceDataset` s, their stats and the training rows' fingerprint
    (the same return as :func:`lorafit.training.run.load_data`)."""
    import hashlib
    import json

    from accelerate import PartialState

    from lorafit.data.build import _cache_root, _split_fraction
    from lorafit.data.preference import PreferenceDataset, build_preference_split
    from lorafit.data.read import read_records
    from lorafit.training import distributed as lf_dist
    from lorafit.training.run import data_sources

    settings = method_settings(cfg)
    d = cfg.data
    if d.format != "auto":
        raise LorafitError(
            f"data.format: {d.format!r} is a chat format for sft; method {cfg.method} reads TRL's preference "
            "formats, told apart by their fields: set data.format: auto"
        )
    train_src, eval_src = data_sources(cfg)
    common = dict(
        **tokenizing_settings(cfg, settings),
        skip_bad_records=d.skip_bad_records,
        cache_dir=_cache_root(None),  # beside SFT's tokenised data ($LORAFIT_CACHE)
    )
    train_records, eval_records, unreadable = None, None, []
    if d.eval_fraction and not eval_src:  # held-out records, as SFT's data.eval_fraction
        records = read_records(train_src, bad=unreadable if d.skip_bad_records else None)
        train_records, eval_records = _split_fraction(records, d.eval_fraction, seed)
    with PartialState().local_main_process_first():  # the others then read its cache
        train, stats = build_preference_split(tokenizer, train_src, records=train_records, **common)
        eval_examples, eval_stats = None, None
        if eval_src or eval_records:
            eval_examples, eval_stats = build_preference_split(
                tokenizer, eval_src or train_src, records=eval_records, **common
            )
    stats["bad"] = unreadable + stats["bad"]
    stats["bad_records"] = len(stats["bad"])
    eval_set = None
    if eval_examples is not None:
        eval_set = PreferenceDataset(eval_examples)
        stats["eval"] = _stats_for_run(eval_stats)
    stats = _stats_for_run(stats) | ({"eval": stats["eval"]} if "eval" in stats else {})
    fingerprint = hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()
    lf_dist.check_same_on_all_ranks(fingerprint, "training rows")  # as SFT's: every rank read the same
    echo(
        f"data: {stats['records']} records ({stats['format']}, method {cfg.method}) -> {stats['examples']} "
        f"examples, {stats['tokens']:,} tokens; truncated {stats['truncated']}, dropped "
        f"{stats['dropped_too_long']} too long"
        + (f", skipped {stats['bad_records']} bad records" if stats["bad_records"] else "")
        + (f"; eval: {stats['eval']['examples']} examples" if "eval" in stats else "")
    )
    return PreferenceDataset(train), eval_set, stats, fingerprint


def sample_pairs(cfg: Any, seed: int) -> tuple[list[list[dict]], list[str | None]]:
    """Up to ``data.eval_prompts`` eval records for ``samples.md``: each as its prompt turns and
    chosen answer (the reference the generation metrics score against), with the rejected
    answer's text (None for a KTO record; a KTO record marked undesirable is passed over, its
    completion being no reference). From the eval data, the held-out records with
    ``eval_fraction``, else the training data; bad records are passed over (building the data
    has stopped on them or listed them)."""
    from lorafit.data.build import held_out_records
    from lorafit.data.preference import to_preference
    from lorafit.data.read import read_records
    from lorafit.training.run import data_sources

    n = cfg.data.eval_prompts
    if not n:
        return [], []
    train_src, eval_src = data_sources(cfg)
    if eval_src or cfg.data.eval_split:
        source = eval_src or f"hf:{str(train_src)[3:].partition(':')[0]}:{cfg.data.eval_split}"
        records = read_records(source, bad=[])
    elif cfg.data.eval_fraction:
        records = held_out_records(train_src, cfg.data.eval_fraction, seed)
    else:
        records = read_records(train_src, bad=[])
    conversations: list[list[dict]] = []
    rejected: list[str | None] = []
    for record in records:
        try:
            pair = to_preference(record, cfg.method)
        except LorafitError:
            continue
        if pair.label is False:
            continue
        conversations.append(pair.prompt + pair.chosen)
        rejected.append(None if pair.rejected is None else "\n\n".join(m["content"] for m in pair.rejected))
        if len(conversations) == n:
            break
    return conversations, rejected


def _stats_for_run(stats: dict) -> dict:
    out = {k: v for k, v in stats.items() if k != "bad"}
    out["skipped"] = [{"where": b.where, "reason": b.reason} for b in stats["bad"]]
    return out


def build_preference_trainer(
    cfg: Any, model: nn.Module, tokenizer: Any, args: Any, train_set: Any, eval_set: Any, fingerprint: str
) -> PreferenceTrainer:
    """The :class:`PreferenceTrainer` with lorafit's callbacks (as ``build_trainer``), its reference
    (the base model, or the starting adapter when ``model.adapter`` is set) and, with
    ``precompute_ref_log_probs``, the reference log-probs of every example taken now."""
    from lorafit.data.preference import PreferenceCollator
    from lorafit.models.attention import PACKED_ATTENTION
    from lorafit.training.trainer import _quiet_transformers, add_run_callbacks

    settings = method_settings(cfg)
    if settings.get("disable_dropout", True):  # TRL's default: the policy and reference see the same net
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    reference = None
    if cfg.method in ("dpo", "kto"):
        reference = Reference.snapshot(model) if cfg.model.adapter else Reference(model)
    collator = PreferenceCollator(
        tokenizer.pad_token_id,
        example_boundaries=model.config._attn_implementation == PACKED_ATTENTION,
        max_length=settings["max_length"],
    )
    with _quiet_transformers():
        trainer = PreferenceTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=collator,
            pad_token_id=tokenizer.pad_token_id,
            data_fingerprint=fingerprint,
            method=cfg.method,
            settings=settings,
            reference=reference,
        )
    add_run_callbacks(trainer, cfg)
    if reference is not None and settings.get("precompute_ref_log_probs"):
        chosen_size = settings.get("precompute_ref_batch_size")
        for dataset, batch_size in (
            (train_set, args.per_device_train_batch_size),
            (eval_set, args.per_device_eval_batch_size),
        ):
            if dataset is None:
                continue
            # KTO's KL rows pair neighbours within a batch: the reference pass must see the same batches
            size = batch_size if cfg.method == "kto" else chosen_size or batch_size
            precompute_reference(trainer, dataset, collator, size)
    return trainer


def evaluate_preferences(
    cfg: Any,
    model: nn.Module,
    tokenizer: Any,
    source: str,
    *,
    batch_size: int = 8,
    start_adapter: str | None = None,
) -> dict[str, float]:
    """The preference loss and TRL's logged metrics (``loss``, ``rewards/*``, ``logps/*``, ...)
    of a trained model (``lorafit.models.load_trained``) on a preference file, as the run's own
    eval computes them: the run's method and settings, its reference (the base model; with
    ``start_adapter``, the adapter the run started from), batches of ``batch_size`` examples.
    A run trained with SFT is scored as DPO (KTO for unpaired records) with its own defaults."""
    import dataclasses
    import tempfile

    from transformers import PrinterCallback, TrainingArguments

    from lorafit.data.preference import PreferenceCollator, PreferenceDataset, build_preference_split
    from lorafit.data.preference_report import file_preference_format

    if cfg.method == "sft":
        unpaired = file_preference_format(source) == "unpaired_preference"
        cfg = dataclasses.replace(cfg, method="kto" if unpaired else "dpo")
    settings = method_settings(cfg)
    examples, _ = build_preference_split(tokenizer, source, **tokenizing_settings(cfg, settings))
    if not examples:
        raise LorafitError(f"{source}: no preference record to score")
    reference = _trained_run_reference(model, start_adapter) if cfg.method in ("dpo", "kto") else None
    collator = PreferenceCollator(tokenizer.pad_token_id, max_length=settings["max_length"])
    with tempfile.TemporaryDirectory() as scratch:  # Trainer wants a folder; nothing is kept
        args = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=batch_size,
            remove_unused_columns=False,  # the collator reads the examples' own keys
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        trainer = PreferenceTrainer(
            model=model,
            args=args,
            eval_dataset=PreferenceDataset(examples),
            data_collator=collator,
            pad_token_id=tokenizer.pad_token_id,
            method=cfg.method,
            settings=settings,
            reference=reference,
        )
        trainer.remove_callback(PrinterCallback)  # the caller says the figures, once
        metrics = trainer.evaluate()
    skip = ("epoch", "eval_runtime", "eval_model_preparation_time")
    out = {k.removeprefix("eval_"): v for k, v in metrics.items() if k not in skip and "_per_second" not in k}
    return {"method": cfg.method, "pairs_or_examples": len(examples), **out}


def _trained_run_reference(model: nn.Module, start_adapter: str | None) -> Reference:
    """A trained run's reference: the base model, or the adapter it started from (read from
    ``start_adapter``; its tensors are swapped into the LoRA parameters for the reference pass)."""
    from lorafit.adapters.files import load_adapter

    if not start_adapter:
        return Reference(model)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    load_adapter(model, start_adapter)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in trained}
    with torch.no_grad():  # the trained tensors back in place
        for name, param in model.named_parameters():
            if name in trained:
                param.copy_(trained[name])
    return Reference(model, start)
