"""The MLP that maps invariant feature vectors to outputs (the NFN's head and the feature baselines')."""

from __future__ import annotations

from collections.abc import Sequence

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
