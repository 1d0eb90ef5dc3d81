"""LoRA layers with loralib's API (microsoft/LoRA, loralib 0.1.2), its defects fixed.

``from lorafit import lora`` is a drop-in for ``import loralib as lora``. Every layer adds a
trainable low-rank update to a frozen pretrained weight ``W0``::

    h = W0 x + (alpha / r) * B A x        # A: (r, in), B: (out, r), B starts at zero

Constructor arguments, parameter names (``lora_A``, ``lora_B``), shapes, initialisation,
scaling and state-dict keys are loralib's, so a checkpoint written by one loads in the
other with ``load_state_dict(..., strict=False)``. ``use_rslora=True`` (opt-in) scales by
``alpha / sqrt(r)`` instead.

Differences from loralib, each a fix:

* Dropout is an ``nn.Dropout``/``nn.Identity`` module, never a lambda, so layers deepcopy,
  pickle and work under DDP.
* Merging adds ``scaling * B @ A`` computed in fp32 and casts once, so bf16/fp16 weights
  are not rounded twice; ``merge()``/``unmerge()`` are explicit and idempotent (merging twice
  is a no-op), and a non-finite merged weight is refused.
* A merged layer's ``state_dict`` holds the *unmerged* base weight, and loading into a merged
  layer unmerges first: a checkpoint saved in ``eval()`` mode never carries the update twice.
* ``MergedLinear`` with ``r > 0`` and every group disabled is a plain linear layer (loralib
  crashes in forward); its index mask is a non-persistent buffer that follows ``.to()``.
* ``Conv1d``/``Conv3d`` with a kernel size above 1 get shapes whose product fits the
  convolution weight (loralib's only fit ``Conv2d``); with ``kernel_size=1``, and for
  ``Conv2d`` always, shapes equal loralib's.
* ``bias="lora_only"`` trains and saves the bias of LoRA convolutions too (loralib's helpers
  look for ``<layer>.bias`` and miss the convolution's ``<layer>.conv.bias``).

The ``merge_weights=True`` behaviour is loralib's: ``eval()`` merges, ``train()`` unmerges.
Code that shards weights (FSDP) should build layers with ``merge_weights=False`` and call
``merge()``/``unmerge()`` itself; :func:`lorafit.merge_lora` does that for whole models.
:class:`Linear` is in :mod:`lorafit.lora.linear`, the convolutions in :mod:`lorafit.lora.conv`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafit.constants import BIAS_MODES
from lorafit.lora.variants import LORA, parameter_name


class LoRALayer:
    """State shared by every LoRA layer: rank, alpha, scaling, dropout and merge flags.

    Subclasses provide ``_base_weight()`` (the frozen tensor the update is merged into) and
    ``delta_weight()`` (``scaling * B @ A`` in that tensor's layout, fp32); a LoRA variant
    (:class:`Linear`) changes how the update is merged through ``_merged_weight`` /
    ``_unmerged_weight``.
    """

    def __init__(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        merge_weights: bool,
        use_rslora: bool = False,
    ) -> None:
        if r < 0:
            raise ValueError(f"LoRA rank r must be >= 0, got {r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        # A module, not loralib's lambda: picklable, deep-copyable, visible in repr().
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        if r > 0:
            self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)

    # -- merging ---------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return self.r > 0 and hasattr(self, "lora_A")

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """This layer's tensors in an adapter file: PEFT's key after the module's path -> parameter,
        as its LoRA variant declares them (plain LoRA for the loralib layers that have none)."""
        variant = getattr(self, "variant", LORA)
        r, in_features = self.lora_A.shape[0], self.lora_A.shape[-1]
        keys = variant.tensors(in_features, self.lora_B.shape[0], r)
        return {key: getattr(self, parameter_name(key)) for key in keys}

    def _base_weight(self) -> torch.Tensor:
        return self.weight  # type: ignore[attr-defined]

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shaped like the base weight."""
        raise NotImplementedError

    def _merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The base weight ``w`` (fp32, stored layout) with the update folded in."""
        return w + self.delta_weight()

    def _unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The merged weight ``w`` (fp32, stored layout) with the update taken out again."""
        return w - self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (fp32 arithmetic, one cast). Idempotent."""
        if self.merged or not self.has_lora:
            return
        w = self._base_weight()
        new = self._merged_weight(w.float())
        if not torch.isfinite(new).all():
            raise ValueError(
                f"merging LoRA into {type(self).__name__} gives non-finite weights; "
                "the adapter is broken (NaN/Inf in lora_A or lora_B), weights left unchanged"
            )
        w.copy_(new.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again. Idempotent."""
        if not self.merged:
            return
        if self.has_lora:
            w = self._base_weight()
            w.copy_(self._unmerged_weight(w.float()).to(w.dtype))
        self.merged = False

    def _loralib_train(self, mode: bool) -> None:
        # loralib's contract: eval() merges, train() unmerges, when merge_weights is set.
        if self.merge_weights:
            if mode:
                self.unmerge()
            else:
                self.merge()

    # -- checkpoints never carry the update twice -------------------------------------
    def _install_state_dict_hooks(self) -> None:
        """Called once the layer's parameters exist (end of each subclass ``__init__``)."""
        m: nn.Module = self  # type: ignore[assignment]
        m.register_state_dict_post_hook(_save_unmerged)
        m.register_load_state_dict_pre_hook(_unmerge_before_load)
        m.register_load_state_dict_post_hook(_remerge_after_load)

    def _base_weight_key(self) -> str:
        return "weight"

    def _own_bias(self) -> torch.Tensor | None:
        """The bias of the layer the update belongs to (``bias="lora_only"`` trains it)."""
        return getattr(self, "bias", None)


# Module-level functions rather than closures, so hooked layers still pickle and deepcopy.
def _save_unmerged(module: LoRALayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # A merged layer saves W0, not W0 + delta: loading that into a layer that merges again
    # on eval() would otherwise apply the update twice.
    if module.merged and module.has_lora:
        key = prefix + module._base_weight_key()
        if key in state_dict:
            w = module._base_weight()
            state_dict[key] = module._unmerged_weight(w.detach().float()).to(w.dtype)


def _unmerge_before_load(module: LoRALayer, state_dict, prefix, *args) -> None:
    module._remerge_on_load = module.merged
    module.unmerge()


def _remerge_after_load(module: LoRALayer, incompatible_keys) -> None:
    if getattr(module, "_remerge_on_load", False):
        module.merge()
    module._remerge_on_load = False


def _init_pair(lora_A: torch.Tensor, lora_B: torch.Tensor, how: bool | str = True) -> None:
    """PEFT's ``init_lora_weights``: ``True`` (loralib's and PEFT's default: A like ``nn.Linear``'s
    Kaiming-uniform init, B zero, so the update starts at exactly zero), ``"gaussian"`` (A normal
    with std 1/r, B zero) or ``False`` (B Kaiming-uniform too: the update is not zero; for tests)."""
    with torch.no_grad():
        if how == "gaussian":
            nn.init.normal_(lora_A, std=1.0 / lora_A.shape[0])
        else:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        if how is False:
            nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(lora_B)


class Embedding(nn.Embedding, LoRALayer):
    """``nn.Embedding`` plus ``(alpha/r) * (B A)^T`` looked up by token id.

    ``lora_A``: (r, num_embeddings), zero-initialised; ``lora_B``: (embedding_dim, r), normal
    (loralib's choice: the opposite of Linear, so the update still starts at zero).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        use_rslora: bool = False,
        **kwargs,
    ) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, 0.0, merge_weights, use_rslora)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.weight.requires_grad = False
        self.reset_parameters()
        self._install_state_dict_hooks()

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()).T * self.scaling  # (num, dim)

    def train(self, mode: bool = True) -> Embedding:
        nn.Embedding.train(self, mode)
        self._loralib_train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)
        if self.has_lora and not self.merged:
            after_A = F.embedding(
                x,
                self.lora_A.T,
                self.padding_idx,
                self.max_norm,
                self.norm_type,
                self.scale_grad_by_freq,
                self.sparse,
            )  # (..., r)
            result = result + (after_A @ self.lora_B.T) * self.scaling
        return result


class MergedLinear(nn.Linear, LoRALayer):
    """A fused projection (e.g. qkv) whose output splits into ``len(enable_lora)`` equal groups;
    each enabled group gets its own rank-r pair.

    ``lora_A``: (r * n_enabled, in), ``lora_B``: (out / n_groups * n_enabled, r); group g's
    update is ``B_g A_g`` written into that group's rows, zeros elsewhere.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: list[bool] | tuple[bool, ...] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        use_rslora: bool = False,
        **kwargs,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        enable_lora = list(enable_lora)
        if not enable_lora or out_features % len(enable_lora) != 0:
            raise ValueError(f"len(enable_lora)={len(enable_lora)} must divide out_features={out_features}")
        self.enable_lora = enable_lora
        self.fan_in_fan_out = fan_in_fan_out
        n_on = sum(bool(e) for e in enable_lora)
        if r > 0 and n_on > 0:
            group = out_features // len(enable_lora)
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * n_on, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((group * n_on, r)))
            self.weight.requires_grad = False
            ind = torch.zeros((len(enable_lora), group), dtype=torch.bool)
            ind[[bool(e) for e in enable_lora], :] = True
            # A buffer so .to(device) moves it; not persistent so state-dict keys stay loralib's.
            self.register_buffer("lora_ind", ind.view(-1), persistent=False)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.T
        self._install_state_dict_hooks()

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            _init_pair(self.lora_A, self.lora_B)

    def _w(self) -> torch.Tensor:
        return self.weight.T if self.fan_in_fan_out else self.weight

    def zero_pad(self, x: torch.Tensor) -> torch.Tensor:
        """Scatter rows of the enabled groups into a full (out_features, ...) tensor."""
        result = x.new_zeros((self.lora_ind.numel(), *x.shape[1:]))
        result[self.lora_ind] = x
        return result

    def _grouped_BA(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        # Block-diagonal product: group g's B_g (out_g, r) @ A_g (r, in).
        n_on = sum(bool(e) for e in self.enable_lora)
        A_g = A.view(n_on, self.r, -1)  # (G, r, in)
        B_g = B.view(n_on, -1, self.r)  # (G, out_g, r)
        return (B_g @ A_g).reshape(-1, A.shape[-1])  # (G * out_g, in)

    def delta_weight(self) -> torch.Tensor:
        delta = self.zero_pad(self._grouped_BA(self.lora_A.float(), self.lora_B.float())) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def train(self, mode: bool = True) -> MergedLinear:
        nn.Linear.train(self, mode)
        self._loralib_train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self._w(), self.bias)
        if self.has_lora and not self.merged:
            x = self.lora_dropout(x).to(self.lora_A.dtype)
            delta = self.zero_pad(self._grouped_BA(self.lora_A, self.lora_B))  # (out, in)
            result = result + (F.linear(x, delta) * self.scaling).to(result.dtype)
        return result


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {', '.join(BIAS_MODES)}; got {bias!r}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter whose name lacks ``lora_``; then, by ``bias``, unfreeze no bias,
    every bias (``"all"``), or the biases of LoRA layers (``"lora_only"``)."""
    _check_bias(bias)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad = False
    if bias == "all":
        for name, p in model.named_parameters():
            if "bias" in name:
                p.requires_grad = True
    elif bias == "lora_only":
        for m in model.modules():
            if isinstance(m, LoRALayer):
                b = m._own_bias()
                if b is not None:
                    b.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The LoRA entries of ``model.state_dict()``; with ``bias``, also every bias (``"all"``)
    or the biases of modules that hold LoRA parameters (``"lora_only"``)."""
    _check_bias(bias)
    sd = model.state_dict()
    if bias == "none":
        return {k: v for k, v in sd.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in sd.items() if "lora_" in k or "bias" in k}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if "lora_" in k:
            out[k] = v
            owner = k.split("lora_")[0]
            # "conv.bias" too: loralib misses the bias of its own Conv layers here.
            for bias_key in (owner + "bias", owner + "conv.bias"):
                if bias_key in sd:
                    out[bias_key] = sd[bias_key]
    return out
