"""Scale normalisation of NFN inputs by invariant scalars, with the log-scales kept as features.

Weight magnitudes differ by orders of magnitude across tensors, architectures and training (and
gradients are far smaller than weights). Dividing each tensor by a scalar the group leaves unchanged
keeps the NFN exactly equivariant; the log of that scalar goes to the invariant head, so no information
is lost. For q/k (and v/o) no norm of one factor is GL-invariant, so both share the square root of the
mean Frobenius norm of the per-head products q k^T (v o).
"""

from __future__ import annotations

import math

import torch

from ..spec import BLOCK_AXES
from ..weight_space import WeightSpace
from .features import OUTER_KINDS, expand_kv, outer_kind, product_sq_norm, summarize_outer

QK_GROUP = ("q", "k", "q_bias", "k_bias")
VO_GROUP = ("v", "o", "v_bias")
SCALE_SLOTS = (*BLOCK_AXES, *OUTER_KINDS)
EPS = 1e-12


def _product_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over blocks and heads of ||a_h b_h||_F; a: [..., D, d], b: [..., d, D]."""
    return (product_sq_norm(a, b) + EPS).sqrt().flatten(2).mean(-1)


def normalize_scales(ws: WeightSpace) -> tuple[WeightSpace, torch.Tensor]:
    """ws [B, C] -> (rescaled ws, log-scales [B, C, len(SCALE_SLOTS)]; 0 for absent slots)."""
    g = ws.spec.group_size
    zero = ws["q"].new_zeros(ws.batch_shape)
    scales: dict[str, torch.Tensor] = {}
    n_qk = _product_norm(ws["q"], expand_kv(ws["k"], g).transpose(-1, -2))
    n_vo = _product_norm(expand_kv(ws["v"], g), ws["o"])
    # RMS of every other tensor with multi-tensor ops: on small models the cost is per-op overhead
    own = [t for t in ws.spec.tensors if t.name not in QK_GROUP and t.name not in VO_GROUP]
    sq_norms = [torch.linalg.vector_norm(ws[t.name].flatten(2), dim=-1) for t in own]
    mean_sq = torch._foreach_div(torch._foreach_mul(sq_norms, sq_norms), [float(math.prod(t.shape)) for t in own])
    rms = dict(zip((t.name for t in own), torch._foreach_sqrt(torch._foreach_add(mean_sq, EPS))))
    shared = {**dict.fromkeys(QK_GROUP, n_qk.sqrt()), **dict.fromkeys(VO_GROUP, n_vo.sqrt())}
    s_of = {t.name: rms[t.name] if t.name in rms else shared[t.name] for t in ws.spec.tensors}
    divided = torch._foreach_div([ws[t.name] for t in ws.spec.tensors],
                                 [s_of[t.name].reshape(s_of[t.name].shape + (1,) * t.ndim) for t in ws.spec.tensors])
    out = dict(zip(ws.spec.names, divided))
    outer_rms: dict[str, list[torch.Tensor]] = {}
    for t in ws.spec.tensors:
        if t.block:
            scales[t.name] = s_of[t.name]
        else:
            outer_rms.setdefault(outer_kind(t), []).append(s_of[t.name])
    for kind, values in outer_rms.items():
        scales[kind] = torch.stack(values).mean(0)
    logs = torch.stack([scales[k].log() if k in scales else zero for k in SCALE_SLOTS], -1)
    return WeightSpace(ws.spec, out), logs


def log_scale_features(ws: WeightSpace) -> torch.Tensor:
    """ws [B, C] -> [B, C * len(SCALE_SLOTS)]: the invariant log-scales of the NFN's (summarised) input."""
    return normalize_scales(summarize_outer(ws))[1].flatten(1)
