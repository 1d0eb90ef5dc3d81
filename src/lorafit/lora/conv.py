"""LoRA over convolutions (loralib's ``Conv1d``/``Conv2d``/``Conv3d``), its kernel-size bug fixed."""

from __future__ import annotations

import torch
import torch.nn as nn

from lorafit.lora.layers import LoRALayer, _init_pair


class ConvLoRA(nn.Module, LoRALayer):
    """A convolution plus a low-rank update of its kernel, ``W = W0 + (alpha/r) (B A).view(W0)``.

    The convolution lives in ``self.conv`` as in loralib, so full checkpoints keep loralib's
    ``conv.weight`` keys. For an integer kernel k over d spatial dims:
    ``lora_A``: (r k, in k^(d-1)), ``lora_B``: (out / groups * k, r k). For d=2 these are
    loralib's shapes; loralib used them for d=1 and d=3 too, which only fit when k=1.
    No dropout is applied (as in loralib: the update acts on the kernel, not the input).
    """

    def __init__(
        self,
        conv_module: type[nn.Module],
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        use_rslora: bool = False,
        **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        if not isinstance(kernel_size, int):
            raise TypeError(f"kernel_size must be an int (as in loralib), got {kernel_size!r}")
        d = self.conv.weight.dim() - 2  # spatial dims
        if r > 0:
            w = self.conv.weight
            self.lora_A = nn.Parameter(w.new_zeros((r * kernel_size, in_channels * kernel_size ** (d - 1))))
            self.lora_B = nn.Parameter(
                w.new_zeros((out_channels // self.conv.groups * kernel_size, r * kernel_size))
            )
            w.requires_grad = False
        self.reset_parameters()
        self._install_state_dict_hooks()

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            _init_pair(self.lora_A, self.lora_B)

    def _base_weight(self) -> torch.Tensor:
        return self.conv.weight

    def _base_weight_key(self) -> str:
        return "conv.weight"

    def _own_bias(self) -> torch.Tensor | None:
        return self.conv.bias  # loralib misses it: its lora_only leaves Conv biases frozen

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()).view(self.conv.weight.shape) * self.scaling

    def train(self, mode: bool = True) -> ConvLoRA:
        nn.Module.train(self, mode)
        self._loralib_train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_lora and not self.merged:
            delta = (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling
            return self.conv._conv_forward(
                x, self.conv.weight + delta.to(self.conv.weight.dtype), self.conv.bias
            )
        return self.conv(x)


class Conv1d(ConvLoRA):
    """LoRA over ``nn.Conv1d`` (see :class:`ConvLoRA`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    """LoRA over ``nn.Conv2d`` (see :class:`ConvLoRA`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    """LoRA over ``nn.Conv3d`` (see :class:`ConvLoRA`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(nn.Conv3d, *args, **kwargs)
