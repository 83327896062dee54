"""Invariant features of a weight space, indexed by what the group still permutes.

Every feature here is invariant under the per-head GL maps (it only uses q k^T and v o products, whose
entries are GL-invariant) and under the head permutation (it averages over heads), and is either
indexed by stream coordinate, by MLP unit or by head, so it moves with that permutation. Features are
means over the summed axes, so their scale does not grow with width (what makes the NFN width-agnostic).
Input tensors have batch dims [B, C]; block tensors then have the block axis L.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from ..spec import TensorSpec
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


def _mean_square(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of squares along ``dim`` without a full-size temporary."""
    return torch.linalg.vector_norm(x, dim=dim).square() / x.shape[dim]


class BlockFeatures(NamedTuple):
    stream: torch.Tensor  # [B, C, L, D, len(STREAM_FEATURES)]
    unit: torch.Tensor  # [B, C, L, A, len(UNIT_FEATURES)]
    head: torch.Tensor  # [B, C, L, H, len(HEAD_FEATURES)]


def product_sq_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a b||_F^2 for a [..., D, d], b [..., d, D] without the D x D product: tr((a^T a)(b b^T)).

    The trace cancels heavily when a b is small next to |a| |b| (decayed or near-orthogonal attention), so
    it is summed in float64 and clamped at 0; in float32 it rounds to noise or below zero there.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.double(), b.double()
    sq = ((a.transpose(-1, -2) @ a) * (b @ b.transpose(-1, -2))).sum((-1, -2))
    return sq.clamp_min(0).to(dtype)


def block_features(ws: WeightSpace) -> BlockFeatures:
    """Per-block invariant features by stream coordinate, MLP unit and head (each product computed once)."""
    spec, g = ws.spec, ws.spec.group_size
    q, o = ws["q"], ws["o"]
    k, v = expand_kv(ws["k"], g), expand_kv(ws["v"], g)
    zero_d = _zeros_like_stream(ws)
    zero_a = q.new_zeros(q.shape[:3] + (spec.mlp_width,))
    qk = (q * k).sum(-1)  # diag(q_h k_h^T): [B, C, L, H, D]
    vo = (v * o.transpose(-1, -2)).sum(-1)  # diag(v_h o_h)
    f = {"qk_diag": qk.mean(3), "vo_diag": vo.mean(3)}
    f["bq_k"] = torch.einsum("bclha,bclhia->bcli", ws["q_bias"], k) / spec.n_heads if "q_bias" in ws else zero_d
    f["q_bk"] = (
        torch.einsum("bclhia,bclha->bcli", q, expand_kv(ws["k_bias"], g)) / spec.n_heads if "k_bias" in ws else zero_d
    )
    f["bv_o"] = (
        torch.einsum("bclha,bclhai->bcli", expand_kv(ws["v_bias"], g), o) / spec.n_heads if "v_bias" in ws else zero_d
    )
    u: dict[str, torch.Tensor] = {}
    for name, unit_dim in (("up", -1), ("gate", -1), ("down", -2)):  # the axis of MLP units
        if name not in ws:
            f[f"{name}_mean"] = f[f"{name}_sq"] = zero_d
            u[f"{name}_mean"] = u[f"{name}_sq"] = zero_a
            continue
        x = ws[name]
        stream_dim = -2 if unit_dim == -1 else -1
        f[f"{name}_mean"], f[f"{name}_sq"] = x.mean(unit_dim), _mean_square(x, unit_dim)
        u[f"{name}_mean"], u[f"{name}_sq"] = x.mean(stream_dim), _mean_square(x, stream_dim)
    up_down = ws["up"] * ws["down"].transpose(-1, -2)  # unit j's read-write product, scale-invariant
    f["up_down"], u["up_down"] = up_down.mean(-1), up_down.mean(-2)
    for name in ("o_bias", "down_bias", "norm1_weight", "norm1_bias", "norm2_weight", "norm2_bias"):
        f[name] = ws[name] if name in ws else zero_d
    for name in ("up_bias", "gate_bias"):
        u[name] = ws[name] if name in ws else zero_a
    return BlockFeatures(
        stream=torch.stack([f[n] for n in STREAM_FEATURES], dim=-1),
        unit=torch.stack([u[n] for n in UNIT_FEATURES], dim=-1),
        head=torch.stack([qk.mean(-1), vo.mean(-1)], dim=-1),
    )


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


def summarize_outer(ws: WeightSpace) -> WeightSpace:
    """Replace each non-block tensor by per-stream-coordinate statistics over its free axes.

    Embedding tables and LM heads are most of a model's weights (70% of MiniLM) but carry no symmetry
    beyond the stream's; their mean and RMS over the vocabulary (or classes, positions, pixels) are
    D-vectors that move with the stream, so the NFN reads them at the cost of a D-vector. Larger tensors
    with no stream axis become [mean, rms]. Batch dims must be [B, C].
    """
    tensors: dict[str, torch.Tensor] = {}
    specs: list[TensorSpec] = []
    d = ws.spec.d_model
    for t in ws.spec.tensors:
        ax = stream_axis(t.axes)
        if t.block or t.ndim == 1:  # already small (this also makes the summary idempotent)
            tensors[t.name] = ws[t.name]
            specs.append(t)
            continue
        if ax is None:
            flat = ws[t.name].flatten(2)
            stats = torch.stack([flat.mean(-1), (flat.square().mean(-1) + 1e-12).sqrt()], -1)
            tensors[f"{t.name}:stats"] = stats
            specs.append(TensorSpec(f"{t.name}:stats", (None,), (2,), False, "free"))
            continue
        rows = outer_stream_rows(ws, t.name)
        for stat, value in (("mean", rows.mean(-2)), ("rms", (rows.square().mean(-2) + 1e-12).sqrt())):
            tensors[f"{t.name}:{stat}"] = value
            specs.append(TensorSpec(f"{t.name}:{stat}", (t.axes[ax],), (d,), False, t.role))
    return WeightSpace(replace(ws.spec, tensors=tuple(specs)), tensors)
