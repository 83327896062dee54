"""Scale normalisation of NFN inputs by invariant scalars, with the log-scales kept as features.

Weight magnitudes differ by orders of magnitude across tensors, architectures and training (and
gradients are far smaller than weights). Dividing each tensor by a scalar the group leaves unchanged
keeps the NFN exactly equivariant; the log of that scalar goes to the invariant head, so no information
is lost. For q/k (and v/o) no norm of one factor is GL-invariant, so both share the square root of the
mean Frobenius norm of the per-head products q k^T (v o).
"""

from __future__ import annotations

import torch

from ..spec import BLOCK_AXES
from ..weight_space import WeightSpace
from .features import expand_kv, outer_kind, product_sq_norm, summarize_outer

QK_GROUP = ("q", "k", "q_bias", "k_bias")
VO_GROUP = ("v", "o", "v_bias")
OUTER_SLOTS = ("embed", "readout", "gain", "bias", "free")
SCALE_SLOTS = (*BLOCK_AXES, *OUTER_SLOTS)
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
    out: dict[str, torch.Tensor] = {}
    outer_rms: dict[str, list[torch.Tensor]] = {}
    for t in ws.spec.tensors:
        x = ws[t.name]
        if t.name in QK_GROUP:
            s = n_qk.sqrt()
        elif t.name in VO_GROUP:
            s = n_vo.sqrt()
        else:
            s = (x.square().flatten(2).mean(-1) + EPS).sqrt()
        out[t.name] = x / s.reshape(s.shape + (1,) * t.ndim)
        if t.block:
            scales[t.name] = s
        else:
            outer_rms.setdefault(outer_kind(t), []).append(s)
    for kind, values in outer_rms.items():
        scales[kind] = torch.stack(values).mean(0)
    logs = torch.stack([scales[k].log() if k in scales else zero for k in SCALE_SLOTS], -1)
    return WeightSpace(ws.spec, out), logs


def log_scale_features(ws: WeightSpace) -> torch.Tensor:
    """ws [B, C] -> [B, C * len(SCALE_SLOTS)]: the invariant log-scales of the NFN's (summarised) input."""
    return normalize_scales(summarize_outer(ws))[1].flatten(1)
