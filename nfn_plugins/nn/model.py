"""`TransformerNFN`: equivariant layers, then an invariant read-out and an MLP head."""

from __future__ import annotations

import torch
from torch import nn

from ..weight_space import WeightSpace
from .features import soft_clip, summarize_outer
from .head import Standardizer, mlp
from .layers import EquivariantLayer, EquivariantReLU, InvariantLayer
from .normalize import SCALE_SLOTS, normalize_scales


class TransformerNFNEncoder(nn.Module):
    """A stack of equivariant layers (with equivariant ReLUs between): weight space -> weight space.

    The output has every block tensor of the input; non-block tensors come out as the per-stream
    statistics of `summarize_outer` (embedding tables are too large to carry through 16 channels).
    The ReLUs run in place on the layers' outputs, so a forward hook on ``layers[i]`` sees them after it.
    """

    def __init__(self, in_channels: int = 1, channels: int = 16, n_layers: int = 2, hidden: int = 32,
                 product_channels: int = 4, final_activation: bool = True, out_channels: int | None = None):
        super().__init__()
        dims = [in_channels] + [channels] * (n_layers - 1) + [out_channels or channels]
        self.layers = nn.ModuleList(EquivariantLayer(a, b, hidden, product_channels) for a, b in zip(dims, dims[1:]))
        self.act = EquivariantReLU(inplace=True)  # layer outputs are fresh tensors
        self.final_activation = final_activation
        self.out_channels = dims[-1]

    def forward(self, ws: WeightSpace, blocks_only: bool = False) -> WeightSpace:
        """``blocks_only``: the output has only the block tensors (see `EquivariantLayer.forward`)."""
        ws = summarize_outer(ws)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            ws = layer(ws, blocks_only=blocks_only and i == last)
            if i < len(self.layers) - 1 or self.final_activation:
                ws = self.act(ws)
        return ws


class TransformerNFN(nn.Module):
    """Invariant Transformer-NFN: weight space [B, C_in] -> [B, out_dim], same output for every symmetric copy.

    Inputs are rescaled per tensor by invariant scalars (`normalize_scales`); their logs join the pooled
    features, so the network sees magnitudes without being dominated by them. ``feature_limit``: the
    features are soft-clipped there (identity below; elementwise, so they stay invariant). Degenerate
    checkpoints (dead attention or norm gains) are inflated by the rescaling to features of ~1e3, where
    trained networks give < 50, and would dominate training of the head.

    ``scale_head_layers`` > 0 adds a second head that reads only the standardised log-scales; the main head
    (pooled features and the same log-scales) starts at zero and learns a correction. Weight norms alone
    predict a zoo member's accuracy well (they record learning rate, decay and initialisation), and with one
    head on both kinds of features ours trailed an MLP on the norms alone (README, adapter 3). It is off by
    default: on models trained by recipes outside the zoo it predicted worse (a norm-based head can learn the
    training recipe rather than the function; benchmarks/results/predictor_recipes.md). The log-norms
    share one standardisation scale (they share a unit): per-feature scaling would blow up norms that barely
    vary to the size of informative ones.
    Fit ``scale_norm`` to the training data's `log_scale_features` before training (`AccuracyPredictor.fit` does).
    """

    def __init__(self, in_channels: int = 1, channels: int = 16, n_layers: int = 2, hidden: int = 32,
                 product_channels: int = 4, invariant_dim: int = 32, head_hidden: int = 64, out_dim: int = 1,
                 feature_limit: float | None = None, head_layers: int = 1, scale_head_layers: int = 0,
                 extra_features: int = 0):
        super().__init__()
        self.feature_limit = feature_limit
        self.encoder = TransformerNFNEncoder(in_channels, channels, n_layers, hidden, product_channels)
        self.pool = InvariantLayer(channels, invariant_dim)
        n_scales = in_channels * len(SCALE_SLOTS)
        self.feature_dim = self.pool.out_dim + n_scales
        self.head = mlp(self.feature_dim + extra_features, [head_hidden] * head_layers, out_dim)
        self.scale_norm: Standardizer | None = None
        self.scale_head: nn.Sequential | None = None
        if scale_head_layers:
            self.scale_norm = Standardizer(n_scales, shared_scale=True)
            self.scale_head = mlp(n_scales, [head_hidden] * scale_head_layers, out_dim)
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def features(self, ws: WeightSpace) -> torch.Tensor:
        """[B, feature_dim] invariant features: pooled NFN output and the inputs' log-scales (last columns;
        standardised when there is a scale head)."""
        ws, log_scales = normalize_scales(summarize_outer(ws))
        log_scales = log_scales.flatten(1)
        if self.scale_norm is not None:
            log_scales = self.scale_norm(log_scales)
        features = torch.cat([self.pool(self.encoder(ws)), log_scales], -1)
        return features if self.feature_limit is None else soft_clip(features, self.feature_limit)

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        """The heads' output [B, out_dim] from `features` (and ``extra_features`` more columns after them, which
        the main head reads too)."""
        out = self.head(features)
        if self.scale_head is not None:
            out = out + self.scale_head(features[:, self.pool.out_dim : self.feature_dim])
        return out

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        return self.readout(self.features(ws))
