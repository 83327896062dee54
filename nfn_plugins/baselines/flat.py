"""Flat-weights MLP baseline: all weights (or a fixed random subset of them) concatenated -> MLP.

Why this exists: it is the "no structure at all" baseline of the Transformer-NFN paper (and of most
NFN papers). It ignores every symmetry: a permuted or GL-transformed copy of the same network gives a
different input vector, so it can only learn what is visible in fixed coordinates. For large weight
spaces ``max_features`` keeps a fixed random index set (drawn once from ``seed``, stored as buffers so
it is saved with the model) so that the first Linear stays affordable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..spec import WeightSpaceSpec
from ..weight_space import WeightSpace
from .statnn import FeatureMLP


def _sample_indices(total: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct sorted indices in [0, total), without materialising a permutation of ``total``."""
    if k >= total:
        return torch.arange(total)
    if total <= 10_000_000:
        return torch.randperm(total, generator=generator)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        draw = torch.randint(total, (k - chosen.numel() + k // 8 + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    keep = torch.randperm(chosen.numel(), generator=generator)[:k]
    return chosen[keep].sort().values


class FlatMLP(FeatureMLP):
    """Concatenate the weights (spec order, row-major) -> optional random subset -> standardise -> MLP.

    Args:
        spec: the weight space it is built for (tensor names and shapes are fixed).
        hidden: widths of the MLP's hidden layers.
        max_features: keep at most this many weights (a fixed random subset drawn from ``seed``);
            ``None`` keeps all of them.
        tensors: names of the tensors to use (default: all).
        in_channels: channels C if the inputs have batch dims [B, C] (features are concatenated).
        sigmoid: squash the output to (0, 1) (accuracy prediction).
    """

    def __init__(
        self,
        spec: WeightSpaceSpec,
        hidden: Sequence[int] = (256, 256),
        out_dim: int = 1,
        max_features: int | None = None,
        seed: int = 0,
        tensors: Sequence[str] | None = None,
        in_channels: int = 1,
        dropout: float = 0.0,
        sigmoid: bool = True,
    ):
        names = tuple(tensors) if tensors is not None else spec.names
        numels = [int(torch.Size(spec[n].shape).numel()) for n in names]
        total = sum(numels)
        full = max_features is None or max_features >= total
        n_selected = total if full else int(max_features)
        super().__init__(n_selected * in_channels, hidden, out_dim, dropout, sigmoid)
        self.spec, self.tensor_names, self.in_channels = spec, names, in_channels
        self.n_weights, self.n_selected, self._full = total, n_selected, full
        if not full:
            idx = _sample_indices(total, max_features, torch.Generator().manual_seed(seed))
            start = 0
            for i, n in enumerate(numels):
                local = idx[(idx >= start) & (idx < start + n)] - start
                self.register_buffer(f"index_{i}", local)
                start += n

    def flatten(self, ws: WeightSpace) -> torch.Tensor:
        """The (selected) weights of ``ws`` (batch dims [B] or [B, C]) as [B, C * n_selected]."""
        for n in self.tensor_names:
            if n not in ws or ws.spec[n].shape != self.spec[n].shape:
                raise ValueError(f"FlatMLP was built for a different weight space: tensor {n!r} is missing or has another shape")
        if not ws.batch_shape:
            ws = ws.unsqueeze(0)
        batch = ws.batch_shape
        parts = []
        for i, name in enumerate(self.tensor_names):
            x = ws[name].reshape(*batch, -1)
            if not self._full:
                x = x[..., getattr(self, f"index_{i}")]
            parts.append(x)
        return self._checked(torch.cat(parts, dim=-1).reshape(batch[0], -1))

    features = flatten
