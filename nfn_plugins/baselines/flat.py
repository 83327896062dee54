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
from torch import nn

from ..spec import WeightSpaceSpec
from ..weight_space import WeightSpace
from .statnn import Standardizer, mlp


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


class FlatMLP(nn.Module):
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
        super().__init__()
        self.spec = spec
        self.tensor_names = tuple(tensors) if tensors is not None else spec.names
        sizes = [spec[n].shape for n in self.tensor_names]
        numels = [int(torch.Size(s).numel()) for s in sizes]
        total = sum(numels)
        self.n_weights = total
        self._full = max_features is None or max_features >= total
        if not self._full:
            idx = _sample_indices(total, max_features, torch.Generator().manual_seed(seed))
            start = 0
            for i, n in enumerate(numels):
                local = idx[(idx >= start) & (idx < start + n)] - start
                self.register_buffer(f"index_{i}", local)
                start += n
        self.n_selected = total if self._full else int(max_features)
        self.in_channels = in_channels
        self.n_features = self.n_selected * in_channels
        self.normalizer = Standardizer(self.n_features)
        self.mlp = mlp(self.n_features, hidden, out_dim, dropout)
        self.sigmoid = sigmoid

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
        x = torch.cat(parts, dim=-1).reshape(batch[0], -1)
        if x.shape[-1] != self.n_features:
            raise ValueError(f"got {x.shape[-1]} features, expected {self.n_features} (check in_channels)")
        return x.to(self.normalizer.mean.dtype)

    def fit_normalizer(self, data: WeightSpace | torch.Tensor) -> None:
        """Per-weight mean/std from a training batch (a WeightSpace or output of `flatten`)."""
        self.normalizer.fit(self.flatten(data) if isinstance(data, WeightSpace) else data)

    def forward(self, ws: WeightSpace | torch.Tensor) -> torch.Tensor:
        """``ws``: a WeightSpace batch, or the output of `flatten` [B, F]."""
        x = self.flatten(ws) if isinstance(ws, WeightSpace) else ws.to(self.normalizer.mean.dtype)
        y = self.mlp(self.normalizer(x))
        return torch.sigmoid(y) if self.sigmoid else y
