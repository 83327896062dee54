"""PEFT models as weight spaces: a LoRA layer contributes its effective weight (base + active, unmerged deltas)."""

from __future__ import annotations

import torch
from torch import nn


def peft_base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (its layers may be LoRA-wrapped); other models unchanged."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional at run time
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def tuner_kind(module: nn.Module) -> str | None:
    """'lora', 'modules_to_save', 'other' for PEFT layers, None for anything else."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None
    if isinstance(module, LoraLayer):
        return "lora"
    if isinstance(module, ModulesToSaveWrapper):
        return "modules_to_save"
    if isinstance(module, BaseTunerLayer):
        return "other"
    return None


def active_copy(wrapper: nn.Module) -> nn.Module:
    """The copy of a ``ModulesToSaveWrapper`` that the forward pass uses."""
    if getattr(wrapper, "disable_adapters", False) or wrapper.active_adapter not in wrapper.modules_to_save:
        return wrapper.original_module
    return wrapper.modules_to_save[wrapper.active_adapter]


def lora_delta(layer: nn.Module) -> torch.Tensor | None:
    """Sum of the active, unmerged LoRA deltas of ``layer`` in the base weight's layout, or None."""
    if layer.disable_adapters or layer.merged:
        return None
    deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
    return sum(deltas[1:], deltas[0]) if deltas else None
