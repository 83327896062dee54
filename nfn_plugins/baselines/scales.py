"""Scale-MLP baseline: only the log-norms of the tensor types (the NFN's invariant rescaling scalars) -> MLP.

Why this exists: weight norms alone carry much of what predicts a trained network's accuracy (learning
rate, weight decay and initialisation leave them behind). This is the part of our NFN's input that needs no
equivariant layer, so the gap between it and the NFN is what the layers add. It has one feature per tensor
type, whatever the width or depth, so it handles zoos of several architectures. ``sizes=True`` adds the log
of the architecture's sizes (width, MLP width, heads): invariant too, and on the mnist-vit out-of-distribution
test (train widths 16-48, test 64) the strongest baseline we know of.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..nn.normalize import SCALE_SLOTS, log_scale_features
from ..weight_space import WeightSpace
from .statnn import FeatureMLP


SIZES = ("d_model", "mlp_width", "n_heads")


class ScaleMLP(FeatureMLP):
    """log-scales of `normalize_scales` [B, len(SCALE_SLOTS)] (and with ``sizes`` the log-sizes of SIZES)
    -> standardisation -> MLP."""

    def __init__(self, hidden: Sequence[int] = (64, 64), out_dim: int = 1, sigmoid: bool = True, sizes: bool = False):
        super().__init__(len(SCALE_SLOTS) + (len(SIZES) if sizes else 0), hidden, out_dim, 0.0, sigmoid)
        self.sizes = sizes

    def features(self, ws: WeightSpace) -> torch.Tensor:
        """ws with batch dims [B] -> [B, n_features] (invariant under the NFN's group)."""
        x = log_scale_features(ws.unsqueeze(1))
        if self.sizes:
            logs = torch.tensor([math.log(getattr(ws.spec, s)) for s in SIZES], dtype=x.dtype, device=x.device)
            x = torch.cat([x, logs.expand(len(x), -1)], 1)
        return self._checked(x)
