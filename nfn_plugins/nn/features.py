"""Invariant features of a weight space, indexed by what the group still permutes.

Every feature here is invariant under the per-head GL maps (it only uses q k^T and v o products, whose
entries are GL-invariant) and under the head permutation (it averages over heads), and is either
indexed by stream coordinate, by MLP unit or by head, so it moves with that permutation. Features are
means over the summed axes, so their scale does not grow with width (what makes the NFN width-agnostic).
Input tensors have batch dims [B, C]; block tensors then have the block axis L.
"""

from __future__ import annotations

import torch

from ..weight_space import WeightSpace

STREAM_FEATURES = (
    "qk_diag", "vo_diag", "bq_k", "q_bk", "bv_o",
    "up_mean", "up_sq", "down_mean", "down_sq", "up_down", "gate_mean", "gate_sq",
    "o_bias", "down_bias", "norm1_weight", "norm1_bias", "norm2_weight", "norm2_bias",
)  # fmt: skip
UNIT_FEATURES = ("up_mean", "up_sq", "down_mean", "down_sq", "up_down", "gate_mean", "gate_sq", "up_bias", "gate_bias")
GLOBAL_FEATURES = ("embed_mean", "embed_sq", "readout_mean", "readout_sq", "gain_mean", "bias_mean")
HEAD_FEATURES = ("qk_trace", "vo_trace")


def expand_kv(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Key-value-head tensor [B, C, L, H_kv, ...] -> per query head [B, C, L, H, ...]."""
    return x if group_size == 1 else x.repeat_interleave(group_size, dim=3)


def group_mean(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per query head [B, C, L, H, ...] -> mean over each key-value group [B, C, L, H_kv, ...]."""
    if group_size == 1:
        return x
    s = x.shape
    return x.reshape(s[:3] + (s[3] // group_size, group_size) + s[4:]).mean(4)


def _zeros_like_stream(ws: WeightSpace) -> torch.Tensor:
    q = ws["q"]
    return q.new_zeros(q.shape[:3] + (ws.spec.d_model,))


def stream_features(ws: WeightSpace) -> torch.Tensor:
    """[B, C, L, D, len(STREAM_FEATURES)]: per block, per stream coordinate."""
    spec, g = ws.spec, ws.spec.group_size
    q, o = ws["q"], ws["o"]
    k, v = expand_kv(ws["k"], g), expand_kv(ws["v"], g)
    zero = _zeros_like_stream(ws)
    f = {
        "qk_diag": (q * k).sum(-1).mean(3),
        "vo_diag": (v * o.transpose(-1, -2)).sum(-1).mean(3),
    }
    f["bq_k"] = torch.einsum("bclha,bclhia->bcli", ws["q_bias"], k) / spec.n_heads if "q_bias" in ws else zero
    f["q_bk"] = (
        torch.einsum("bclhia,bclha->bcli", q, expand_kv(ws["k_bias"], g)) / spec.n_heads if "k_bias" in ws else zero
    )
    f["bv_o"] = (
        torch.einsum("bclha,bclhai->bcli", expand_kv(ws["v_bias"], g), o) / spec.n_heads if "v_bias" in ws else zero
    )
    up, down = ws["up"], ws["down"]
    f.update(up_mean=up.mean(-1), up_sq=up.square().mean(-1), down_mean=down.mean(-2), down_sq=down.square().mean(-2))
    f["up_down"] = (up * down.transpose(-1, -2)).mean(-1)
    f["gate_mean"] = ws["gate"].mean(-1) if "gate" in ws else zero
    f["gate_sq"] = ws["gate"].square().mean(-1) if "gate" in ws else zero
    for name in ("o_bias", "down_bias", "norm1_weight", "norm1_bias", "norm2_weight", "norm2_bias"):
        f[name] = ws[name] if name in ws else zero
    return torch.stack([f[n] for n in STREAM_FEATURES], dim=-1)


def unit_features(ws: WeightSpace) -> torch.Tensor:
    """[B, C, L, A, len(UNIT_FEATURES)]: per block, per MLP hidden unit."""
    up, down = ws["up"], ws["down"]
    zero = up.new_zeros(up.shape[:3] + (ws.spec.mlp_width,))
    f = dict(up_mean=up.mean(-2), up_sq=up.square().mean(-2), down_mean=down.mean(-1), down_sq=down.square().mean(-1))
    f["up_down"] = (up * down.transpose(-1, -2)).mean(-2)
    f["gate_mean"] = ws["gate"].mean(-2) if "gate" in ws else zero
    f["gate_sq"] = ws["gate"].square().mean(-2) if "gate" in ws else zero
    f["up_bias"] = ws["up_bias"] if "up_bias" in ws else zero
    f["gate_bias"] = ws["gate_bias"] if "gate_bias" in ws else zero
    return torch.stack([f[n] for n in UNIT_FEATURES], dim=-1)


def head_features(ws: WeightSpace) -> torch.Tensor:
    """[B, C, L, H, len(HEAD_FEATURES)]: tr(q k^T)/D and tr(v o)/D per query head (GL-invariant)."""
    g = ws.spec.group_size
    q, o = ws["q"], ws["o"]
    k, v = expand_kv(ws["k"], g), expand_kv(ws["v"], g)
    return torch.stack([(q * k).sum(-1).mean(-1), (v * o.transpose(-1, -2)).sum(-1).mean(-1)], dim=-1)


def stream_axis(axes) -> int | None:
    for i, a in enumerate(axes):
        if a in ("stream", "stream_gain"):
            return i
    return None


def outer_stream_rows(ws: WeightSpace, name: str) -> torch.Tensor:
    """An outer tensor as [B, C, N, D]: stream axis last, free axes flattened into N."""
    t = ws.spec[name]
    x = ws[name]
    moved = x.movedim(x.dim() - t.ndim + stream_axis(t.axes), -1)
    return moved.reshape(moved.shape[:2] + (-1, moved.shape[-1]))


def outer_kind(t) -> str:
    """Parameter-sharing class of an outer tensor: embed / readout / gain / bias / free."""
    if t.role == "vector":
        return "gain" if "stream_gain" in t.axes else "bias"
    if stream_axis(t.axes) is None:
        return "free"
    return t.role


def global_features(ws: WeightSpace) -> torch.Tensor:
    """[B, C, D, len(GLOBAL_FEATURES)]: what the embeddings, heads and outer norms say per stream coordinate."""
    sums: dict[str, list[torch.Tensor]] = {"embed": [], "readout": [], "gain": [], "bias": []}
    for t in ws.spec.tensors:
        if t.block or outer_kind(t) == "free":
            continue
        rows = outer_stream_rows(ws, t.name)
        sums[outer_kind(t)].append(rows)
    q = ws["q"]
    zero = q.new_zeros(q.shape[:2] + (ws.spec.d_model,))

    def pooled(kind: str, fn) -> torch.Tensor:
        rows = sums[kind]
        return torch.stack([fn(r).mean(-2) for r in rows]).mean(0) if rows else zero

    f = [
        pooled("embed", lambda r: r),
        pooled("embed", torch.square),
        pooled("readout", lambda r: r),
        pooled("readout", torch.square),
        pooled("gain", lambda r: r),
        pooled("bias", lambda r: r),
    ]
    return torch.stack(f, dim=-1)
