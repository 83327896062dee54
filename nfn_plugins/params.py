"""The parameters a model computes with, by clean name, through DDP/accelerate/compile and PEFT wrappers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nfn_plugins.integrations.peft import active_copy, lora_delta, peft_base_model, tuner_kind
from nfn_plugins.integrations.wrappers import unwrap_model


@dataclass
class ParamHandle:
    """Read and write one weight by its clean name (as in the unwrapped model)."""

    name: str
    module_path: str
    module_type: str
    param: nn.Parameter
    lora_layer: nn.Module | None = None

    def read(self) -> torch.Tensor:
        value = self.param.detach()
        if self.lora_layer is not None and self.name.endswith(".weight"):
            delta = lora_delta(self.lora_layer, f"{self.module_path} ({self.module_type})")
            if delta is not None:
                value = value + delta.to(value.dtype)
        return value

    def check_writable(self) -> None:
        if self.lora_layer is not None and self.name.endswith(".weight"):
            delta = lora_delta(self.lora_layer, f"{self.module_path} ({self.module_type})")
            if delta is not None and bool(delta.ne(0).any()):
                raise ValueError(
                    f"{self.module_path} ({self.module_type}) has active, unmerged LoRA adapters with a non-zero "
                    "delta: writing its effective weight is ambiguous. Call merge_and_unload() or "
                    "disable the adapters first."
                )

    @torch.no_grad()
    def write(self, value: torch.Tensor) -> None:
        self.param.copy_(value)


def root_model(model: nn.Module) -> nn.Module:
    return peft_base_model(unwrap_model(model))


def parameter_table(model: nn.Module) -> dict[str, ParamHandle]:
    """Every parameter the model computes with, keyed by the name it has in the plain (unwrapped) model."""
    table: dict[str, ParamHandle] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str) -> None:
        kind = tuner_kind(module)
        if kind == "lora":
            base = module.get_base_layer()
            for pname, p in base.named_parameters(recurse=False):
                add(f"{prefix}{pname}", prefix[:-1], base, p, lora_layer=module)
            return
        if kind == "modules_to_save":
            visit(active_copy(module), prefix)
            return
        if kind == "other":
            raise ValueError(
                f"{prefix[:-1] or '<root>'} is a PEFT {type(module).__name__} layer; nfn-plugins reads LoRA "
                "layers and modules_to_save only. Merge the adapter (merge_and_unload) first."
            )
        for pname, p in module.named_parameters(recurse=False):
            add(f"{prefix}{pname}", prefix[:-1], module, p)
        for cname, child in module.named_children():
            visit(child, f"{prefix}{cname}.")

    def add(name: str, path: str, module: nn.Module, p: nn.Parameter, lora_layer: nn.Module | None = None) -> None:
        if id(p) in seen:  # tied weights (e.g. lm_head = embeddings) are one tensor
            delta = lora_delta(lora_layer, path) if lora_layer is not None else None
            if delta is not None and bool(delta.ne(0).any()):
                raise ValueError(
                    f"{path} ({type(module).__name__}) has a LoRA adapter on a tied weight (shared with another "
                    "module): the adapted model has two different matrices where the weight space has one. "
                    "Untie the weights or merge_and_unload() first.")
            return
        seen.add(id(p))
        table[name] = ParamHandle(name, path or "<root>", type(module).__name__, p, lora_layer)

    visit(root_model(model), "")
    return table
