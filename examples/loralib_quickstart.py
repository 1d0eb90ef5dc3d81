"""The loralib tutorial's steps with ``from lorafit import lora`` in place of ``import loralib as lora``.

1. Take a "pretrained" model and replace a layer with ``lora.Linear(in, out, r=16)``.
2. ``lora.mark_only_lora_as_trainable(model)`` and train a few steps.
3. ``torch.save(lora.lora_state_dict(model), path)``: a checkpoint of the LoRA weights alone.
4. A fresh model loads the pretrained checkpoint, then the LoRA checkpoint, both with
   ``strict=False``, and gives the trained outputs.

Run: ``python examples/loralib_quickstart.py [--steps 200] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from lorafit import lora


class MLP(nn.Module):
    """A small regressor; ``lora_r > 0`` swaps its hidden layer for a LoRA layer."""

    def __init__(self, lora_r: int = 0) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 64)
        self.hidden = lora.Linear(64, 64, r=lora_r, lora_alpha=2 * lora_r) if lora_r else nn.Linear(64, 64)
        self.out = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(torch.relu(self.inp(x)))))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the checkpoints (default: temporary)"
    )
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="lorafit-quickstart-"))
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    pretrained = MLP()
    torch.save(pretrained.state_dict(), out / "pretrained.pt")

    # 1. The same architecture with a LoRA hidden layer, loaded from the pretrained weights.
    model = MLP(lora_r=16)
    model.load_state_dict(torch.load(out / "pretrained.pt", weights_only=True), strict=False)
    # 2. Only lora_A / lora_B train.
    lora.mark_only_lora_as_trainable(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    print(f"trainable: {trainable}")
    x = torch.randn(256, 16)
    y = torch.sin(x.sum(dim=1, keepdim=True))  # a new task for the pretrained net
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    loss_fn = nn.MSELoss()
    first = loss_fn(model(x), y).item()
    for _ in range(args.steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    print(f"loss {first:.4f} -> {loss.item():.4f} in {args.steps} steps")

    # 3. Save the LoRA weights alone: a few KB instead of the whole model.
    torch.save(lora.lora_state_dict(model), out / "lora.pt")
    model.eval()
    with torch.no_grad():
        trained = model(x)

    # 4. A fresh model: pretrained checkpoint first, LoRA checkpoint second, both strict=False.
    fresh = MLP(lora_r=16)
    fresh.load_state_dict(torch.load(out / "pretrained.pt", weights_only=True), strict=False)
    fresh.load_state_dict(torch.load(out / "lora.pt", weights_only=True), strict=False)
    fresh.eval()
    with torch.no_grad():
        diff = (fresh(x) - trained).abs().max().item()
    print(f"reloaded model vs trained model: max |diff| = {diff:.2e}  ({out})")
    if diff > 1e-5:
        raise SystemExit("reloaded outputs differ from the trained model")
    return diff


if __name__ == "__main__":
    main()
