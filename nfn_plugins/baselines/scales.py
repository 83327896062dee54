"""Scale-MLP baseline: only the log-norms of the tensor types (the NFN's invariant rescaling scalars) -> MLP.

Why this exists: weight norms alone carry much of what predicts a trained network's accuracy (learning
rate, weight decay and initialisation leave them behind). This is the part of our NFN's input that needs no
equivariant layer, so the gap between it and the NFN is what the layers add. It has one feature per tensor
type, whatever the width or depth, so it handles zoos of several architectures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..nn.normalize import SCALE_SLOTS, log_scale_features
from ..weight_space import WeightSpace
from .statnn import FeatureMLP


class ScaleMLP(FeatureMLP):
    """log-scales of `normalize_scales` [B, len(SCALE_SLOTS)] -> standardisation -> MLP."""

    def __init__(self, hidden: Sequence[int] = (64, 64), out_dim: int = 1, sigmoid: bool = True):
        super().__init__(len(SCALE_SLOTS), hidden, out_dim, 0.0, sigmoid)

    def features(self, ws: WeightSpace) -> torch.Tensor:
        """ws with batch dims [B] -> [B, len(SCALE_SLOTS)] (invariant under the NFN's group)."""
        return self._checked(log_scale_features(ws.unsqueeze(1)))
