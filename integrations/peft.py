"""PEFT models as weight spaces: a LoRA layer contributes its effective weight (base + active, unmerged deltas).

A model holding PEFT layers can only exist once peft has been imported, so these checks look at
``sys.modules`` instead of importing peft (a multi-second import) for every plain model.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def peft_base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (its layers may be LoRA-wrapped); other models unchanged."""
    if sys.modules.get("peft") is None:
        return model
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def tuner_kind(module: nn.Module) -> str | None:
    """'lora', 'modules_to_save', 'other' for PEFT layers, None for anything else."""
    if sys.modules.get("peft") is None:
        return None
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

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


def lora_delta(layer: nn.Module, where: str) -> torch.Tensor | None:
    """Sum of the active, unmerged LoRA deltas of ``layer`` in the base weight's layout, or None.

    Variants whose effective weight is not base + delta (DoRA) or that also change the bias (lora_bias)
    are refused: reading them as plain LoRA would be silently wrong.
    """
    if layer.disable_adapters or layer.merged:
        return None
    adapters = [a for a in layer.active_adapters if a in layer.lora_A or a in getattr(layer, "lora_embedding_A", {})]
    for a in adapters:
        if getattr(layer, "use_dora", {}).get(a) or getattr(layer, "lora_bias", {}).get(a):
            kind = "DoRA" if getattr(layer, "use_dora", {}).get(a) else "lora_bias=True"
            raise ValueError(f"{where}: {kind} adapter {a!r} is not supported (its effective weight is not base + "
                             "B A); call merge_and_unload() first")
    deltas = [layer.get_delta_weight(a) for a in adapters]
    return sum(deltas[1:], deltas[0]) if deltas else None
