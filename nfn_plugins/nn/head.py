"""The MLP that maps invariant feature vectors to outputs, and the standardiser in front of it (shared by
the NFN's heads and the feature baselines)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(n_in: int, hidden: Sequence[int], n_out: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear-ReLU(-Dropout) stack ending in a Linear to ``n_out``."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        n_in = h
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class Standardizer(nn.Module):
    """Feature-wise (x - mean) / std with buffers; identity until `fit` is called. Features of weights differ
    in scale by orders of magnitude (variances vs. extremes), and an MLP trains badly on such inputs.
    ``shared_scale``: one std for all features (the RMS of theirs), for features in one unit whose relative
    sizes matter (log-norms: one that barely varies is sampling noise, not a signal to amplify)."""

    def __init__(self, n_features: int, shared_scale: bool = False):
        super().__init__()
        self.shared_scale = shared_scale
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    @property
    def fitted(self) -> bool:
        """Read off the buffers (so saved files need no flag): False only while they are exactly the identity."""
        return bool((self.mean != 0).any() or (self.std != 1).any())

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        x = x.to(self.mean)
        std = x.std(0, correction=0) if x.shape[0] > 1 else torch.ones_like(self.std)
        if self.shared_scale and (std > 1e-12).any():
            std = std[std > 1e-12].square().mean().sqrt().expand_as(std)
        self.mean.copy_(x.mean(0))
        self.std.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
