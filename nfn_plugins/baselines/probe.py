"""Probing baseline: the networks' outputs on learned probe images -> MLP (ProbeGen's probing without its
generator network). Exactly invariant (`nfn_plugins.probes`); image architectures."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.head import mlp
from ..probes import ProbeFeatures
from ..weight_space import WeightSpace


class ProbeMLP(nn.Module):
    """Weight spaces [B] of one of the architectures ``archs`` -> accuracies [B] in (0, 1)."""

    def __init__(self, archs: dict | Sequence[dict], n_probes: int = 16, hidden: Sequence[int] = (64, 64),
                 seed: int = 0):
        super().__init__()
        self.probe = ProbeFeatures(archs, n_probes, seed)
        self.mlp = mlp(self.probe.out_dim, hidden, 1)

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        return torch.sigmoid(self.mlp(self.probe(ws))).squeeze(-1)
