"""STATNN baseline: per-tensor weight statistics -> MLP (or gradient-boosted trees).

Why this exists: Unterthiner et al. 2020 ("Predicting Neural Network Accuracy from Weights") showed that
a handful of statistics of each layer's weights (mean, variance and the 0/25/50/75/100% quantiles)
predict a network's accuracy remarkably well; the Transformer-NFN paper reports it (and gradient-boosted
trees on the same features) as its strongest non-equivariant baselines, so our benchmark includes both.

The features are invariant to every permutation symmetry (statistics of a tensor ignore the order of
its entries) but not to GL / scaling symmetries, and they see nothing of how tensors interact.

Every tensor of the weight space contributes 7 numbers; with ``per_block=True`` (default, as the paper
treats each layer separately) a block tensor contributes 7 per block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.head import Standardizer, mlp
from ..spec import WeightSpaceSpec
from ..weight_space import WeightSpace

STATISTICS = ("mean", "var", "q0", "q25", "q50", "q75", "q100")
_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def tensor_statistics(x: torch.Tensor) -> torch.Tensor:
    """``x``: [N, n] -> [N, 7]: mean, (population) variance and quantiles 0/25/50/75/100 of each row.

    Quantiles interpolate linearly like ``torch.quantile``, but via a sort, so there is no size limit
    (``torch.quantile`` refuses inputs above 2^24 entries, e.g. a large embedding matrix).
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    n = x.shape[-1]
    if n == 0:
        raise ValueError("cannot compute statistics of an empty tensor")
    mean = x.mean(-1)
    var = x.var(-1, correction=0)
    xs = torch.sort(x, dim=-1).values
    pos = torch.tensor(_QUANTILES, dtype=x.dtype, device=x.device) * (n - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = pos - lo.to(x.dtype)
    q = xs[..., lo] * (1 - frac) + xs[..., hi] * frac
    return torch.cat([mean.unsqueeze(-1), var.unsqueeze(-1), q], dim=-1)


def _batched(ws: WeightSpace) -> tuple[WeightSpace, int, tuple[int, ...]]:
    """View ws with one flat batch dim N; returns (ws, B, trailing batch dims folded into features)."""
    batch = ws.batch_shape
    if len(batch) == 0:
        ws, batch = ws.unsqueeze(0), (1,)
    n = 1
    for b in batch:
        n *= b
    flat = WeightSpace(ws.spec, {k: v.reshape(n, *ws.spec[k].shape) for k, v in ws.items()})
    return flat, batch[0], tuple(batch[1:])


def statnn_feature_names(spec: WeightSpaceSpec, per_block: bool = True, invariant: bool = False) -> list[str]:
    """Names of the columns of `statnn_features` (for one channel), e.g. ``"q[1].q75"``."""
    blocks = [(t.name, t.block) for t in spec.tensors if not (invariant and t.name in GL_TENSORS)]
    if invariant:
        blocks += [(n, True) for n in GL_PRODUCTS if n in ("qk", "vo") or PRODUCT_BIAS[n] in spec.names]
    names = []
    for name, block in blocks:
        groups = [f"{name}[{i}]" for i in range(spec.n_blocks)] if (block and per_block) else [name]
        names += [f"{g}.{s}" for g in groups for s in STATISTICS]
    return names


GL_TENSORS = ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias")
GL_PRODUCTS = ("qk", "vo", "bq_k", "q_bk", "bv_o")
PRODUCT_BIAS = {"bq_k": "q_bias", "q_bk": "k_bias", "bv_o": "v_bias"}  # the bias each bias product needs


def gl_invariant_products(ws: WeightSpace) -> dict[str, torch.Tensor]:
    """The per-head products that the per-head GL maps leave unchanged, for a batch [N]: ``qk`` = q_h k_h^T
    and ``vo`` = v_h o_h [N, L, H, D, D], and with biases ``bq_k``, ``q_bk``, ``bv_o`` [N, L, H, D].

    They carry everything about attention that the symmetry group does not change; q, k, v, o themselves do not.
    """
    g = ws.spec.group_size
    q, k = ws["q"], ws["k"].repeat_interleave(g, dim=2)
    v, o = ws["v"].repeat_interleave(g, dim=2), ws["o"]
    out = {"qk": q @ k.transpose(-1, -2), "vo": v @ o}
    if "q_bias" in ws:
        out["bq_k"] = (ws["q_bias"].unsqueeze(-2) @ k.transpose(-1, -2)).squeeze(-2)
    if "k_bias" in ws:
        out["q_bk"] = (q @ ws["k_bias"].repeat_interleave(g, dim=2).unsqueeze(-1)).squeeze(-1)
    if "v_bias" in ws:
        out["bv_o"] = (ws["v_bias"].repeat_interleave(g, dim=2).unsqueeze(-2) @ o).squeeze(-2)
    return out


def statnn_features(ws: WeightSpace, per_block: bool = True, tensors: Sequence[str] | None = None,
                    invariant: bool = False) -> torch.Tensor:
    """Statistics of every tensor of ``ws`` (batch dims [B]) -> [B, F], F = 7 x (number of tensors
    (x blocks if ``per_block``)). A ws without batch dims gives [1, F]; batch dims [B, C] give
    [B, C * F] (channel-major). ``tensors`` restricts to the named tensors (default: all, spec order).

    ``invariant=True`` replaces q, k, v, o and their biases by `gl_invariant_products` (appended after the
    other tensors), so the features are invariant under the whole group the Transformer-NFN is built
    for (permutations and per-head GL), not only under permutations.
    """
    if invariant and tensors is not None:
        raise ValueError("statnn_features: choose `tensors` or `invariant=True` (which replaces q/k/v/o), not both")
    flat, B, rest = _batched(ws)
    names = list(tensors) if tensors is not None else list(ws.spec.names)
    columns = [(flat[n], ws.spec[n].block) for n in names if not (invariant and n in GL_TENSORS)]
    if invariant:
        columns += [(x, True) for x in gl_invariant_products(flat).values()]
    feats = []
    for x, block in columns:
        N = x.shape[0]
        if block and per_block:
            feats.append(tensor_statistics(x.reshape(N, x.shape[1], -1)).reshape(N, -1))
        else:
            feats.append(tensor_statistics(x.reshape(N, -1)))
    out = torch.cat(feats, dim=-1)  # [N, F]
    return out.reshape(B, -1)


class FeatureMLP(nn.Module):
    """Fixed features of a weight space -> standardisation -> MLP -> [B, out_dim] (sigmoid by default, for
    accuracies in [0, 1]). Subclasses define `features`; call `fit_normalizer` on the training set first."""

    def __init__(self, n_features: int, hidden: Sequence[int], out_dim: int, dropout: float, sigmoid: bool):
        super().__init__()
        self.n_features = n_features
        self.normalizer = Standardizer(n_features)
        self.mlp = mlp(n_features, hidden, out_dim, dropout)
        self.sigmoid = sigmoid

    def features(self, ws: WeightSpace) -> torch.Tensor:
        raise NotImplementedError

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n_features:
            raise ValueError(f"got {x.shape[-1]} features, expected {self.n_features} (check in_channels)")
        return x.to(self.normalizer.mean.dtype)

    def fit_normalizer(self, data: WeightSpace | torch.Tensor) -> None:
        """Set the feature mean/std from a training batch (a WeightSpace or precomputed features)."""
        self.normalizer.fit(self.features(data) if isinstance(data, WeightSpace) else data)

    def forward(self, ws: WeightSpace | torch.Tensor) -> torch.Tensor:
        """``ws``: a WeightSpace batch, or precomputed `features` [B, F] (cheaper when training)."""
        x = self.features(ws) if isinstance(ws, WeightSpace) else ws.to(self.normalizer.mean.dtype)
        y = self.mlp(self.normalizer(x))
        return torch.sigmoid(y) if self.sigmoid else y


class StatNN(FeatureMLP):
    """STATNN: `statnn_features` -> standardisation -> MLP.

    Args:
        spec: the weight space whose feature layout (`statnn_feature_names`) the model reads: its tensor
            names, and its depth if ``per_block``. With ``per_block=False`` (statistics pooled over the
            blocks) one model reads every width and depth of a family.
        hidden: widths of the MLP's hidden layers.
        in_channels: channels C if the inputs have batch dims [B, C] (features are concatenated).
    """

    def __init__(
        self,
        spec: WeightSpaceSpec,
        hidden: Sequence[int] = (64, 64),
        out_dim: int = 1,
        per_block: bool = True,
        in_channels: int = 1,
        dropout: float = 0.0,
        sigmoid: bool = True,
    ):
        super().__init__(len(statnn_feature_names(spec, per_block)) * in_channels, hidden, out_dim, dropout, sigmoid)
        self.spec = spec
        self.per_block = per_block

    def features(self, ws: WeightSpace) -> torch.Tensor:
        if statnn_feature_names(ws.spec, self.per_block) != statnn_feature_names(self.spec, self.per_block):
            what = "tensor names or depth" if self.per_block else "tensor names"
            raise ValueError(f"StatNN was built for a different weight space ({what} differ; per_block=False "
                             "reads every width and depth of one family)")
        return self._checked(statnn_features(ws, self.per_block))


def _sklearn_ensemble():
    try:
        from sklearn import ensemble
    except ImportError as e:  # optional dependency
        raise ImportError(
            "gradient-boosted trees need scikit-learn, which nfn-plugins does not require: pip install scikit-learn"
        ) from e
    return ensemble


def make_gbt(kind: str = "hist", **kwargs):
    """An unfitted scikit-learn gradient-boosting model: ``kind="hist"`` (HistGradientBoostingRegressor, fast on
    many samples), ``"gbr"`` (GradientBoostingRegressor) or ``"hist-classifier"``. ``kwargs`` go to its
    constructor."""
    ensemble = _sklearn_ensemble()
    if kind == "hist":
        return ensemble.HistGradientBoostingRegressor(**kwargs)
    if kind == "gbr":
        return ensemble.GradientBoostingRegressor(**kwargs)
    if kind == "hist-classifier":  # a yes/no per model, e.g. the gate of the collapse rule (nn/collapse.py)
        return ensemble.HistGradientBoostingClassifier(**kwargs)
    raise ValueError(f"kind must be 'hist', 'gbr' or 'hist-classifier', got {kind!r}")


def _as_numpy_features(data: WeightSpace | torch.Tensor, per_block: bool):
    x = statnn_features(data, per_block) if isinstance(data, WeightSpace) else data
    return x.detach().to("cpu", torch.float64).numpy()


def fit_gbt(data: WeightSpace | torch.Tensor, targets, kind: str = "hist", per_block: bool = True, **kwargs):
    """Fit gradient-boosted trees on STATNN features of ``data`` (WeightSpace batch or features [N, F], e.g.
    ``statnn_features(ws, invariant=True)``) to ``targets`` [N]; returns the fitted regressor (use `predict_gbt`)."""
    model = make_gbt(kind, **kwargs)
    y = targets.detach().cpu().double().reshape(-1).numpy() if isinstance(targets, torch.Tensor) else targets
    model.fit(_as_numpy_features(data, per_block), y)
    return model


def predict_gbt(model, data: WeightSpace | torch.Tensor, per_block: bool = True) -> torch.Tensor:
    """Predictions [N] (float64) of a fitted regressor on a WeightSpace batch or features [N, F]."""
    return torch.as_tensor(model.predict(_as_numpy_features(data, per_block)), dtype=torch.float64)
