"""Baselines our Transformer-NFN is benchmarked against (all `nn.Module`s taking WeightSpace batches).

- `PaperTransformerNFN`: the Transformer-NFN paper's own layer scheme (one fixed architecture,
  width-specific tensors, parameters growing as D^3).
- `StatNN` / `statnn_features` / `fit_gbt`: per-tensor weight statistics (Unterthiner et al. 2020) with
  an MLP head or gradient-boosted trees (scikit-learn, optional); with ``invariant=True`` on the
  per-head products q k^T, v o instead of q, k, v, o (invariant under the NFN's whole group).
- `ScaleMLP`: only the log-norms of the tensor types (the NFN's invariant rescaling scalars) into an MLP.
- `FlatMLP`: the flattened weights (optionally a fixed random subset) into an MLP.
- `ProbeMLP`: the networks' outputs on learned probe images into an MLP (probing; image models only).
"""

from ..nn.head import Standardizer
from .flat import FlatMLP
from .paper_nfn import PaperEquivariantLayer, PaperInvariantLayer, PaperTransformerNFN
from .probe import ProbeMLP
from .scales import ScaleMLP
from .statnn import (
    STATISTICS,
    StatNN,
    fit_gbt,
    gl_invariant_products,
    make_gbt,
    predict_gbt,
    statnn_feature_names,
    statnn_features,
    tensor_statistics,
)

__all__ = [
    "STATISTICS",
    "FlatMLP",
    "PaperEquivariantLayer",
    "PaperInvariantLayer",
    "PaperTransformerNFN",
    "ProbeMLP",
    "ScaleMLP",
    "StatNN",
    "Standardizer",
    "fit_gbt",
    "gl_invariant_products",
    "make_gbt",
    "predict_gbt",
    "statnn_feature_names",
    "statnn_features",
    "tensor_statistics",
]
