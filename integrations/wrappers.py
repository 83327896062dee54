"""Seeing through the wrappers a training stack puts around a model: DDP, DataParallel, accelerate, torch.compile."""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model under DDP / DataParallel / accelerate / torch.compile wrappers (PEFT is handled per layer)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model
