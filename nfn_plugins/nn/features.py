"""Invariant features of a weight space, indexed by what the group still permutes.

Every feature here is invariant under the per-head GL maps (it only uses q k^T and v o products, whose
entries are GL-invariant) and under the head permutation (it averages over heads), and is either
indexed by stream coordinate, by MLP unit or by head, so it moves with that permutation. Features are
means over the summed axes, so their scale does not grow with width (what makes the NFN width-agnostic).
Input tensors have batch dims [B, C]; block tensors then have the block axis L.
"""

from __future__ import annotations

import math
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


FEATURE_LIMIT = 1e4


def soft_clip(x: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """Identity on [-limit, limit], logarithmic beyond: invariant features stay invariant (it is elementwise).

    Features of trained checkpoints stay far below the limit (the shipped NFNs give bit-identical outputs
    with and without it). Degenerate checkpoints (say a dead head whose v o is ~0 while
    v and o are not) are inflated by the invariant rescaling and would feed features of 1e4 and more to the
    pointwise MLPs, whose outputs multiply tensors: two layers of that overflow float32.
    """
    limit = FEATURE_LIMIT if limit is None else limit
    excess = torch.log1p((x.abs() - limit).clamp_min(0))  # exactly 0 within the limit
    return x.clamp(-limit, limit) + excess.copysign(x)  # no cancellation for huge x


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


CHUNK_BYTES = 16 * 2**20  # under glibc's largest mmap threshold (32 MiB): such temporaries reuse heap memory


def block_slices(per_block_bytes: int, n_blocks: int) -> list[slice]:
    """Slices of the block axis whose temporaries stay under CHUNK_BYTES (at least one block each).

    Full-size temporaries of MiniLM-sized inputs are mmapped fresh on every call, and their page faults
    cost more than the arithmetic on them; chunk-sized ones are served from memory glibc keeps.
    """
    step = max(1, CHUNK_BYTES // max(1, per_block_bytes))
    return [slice(i, i + step) for i in range(0, n_blocks, step)]


def per_matrix(fn, *xs: torch.Tensor):
    """``fn(*xs)`` for inputs [B, C, L, ...] whose (batch, channel, block) entries are independent
    matrices, evaluated a few matrices at a time so its temporaries stay under CHUNK_BYTES.

    ``fn`` maps tensors with any leading dims (which broadcast) to tensors or tuples with the same leading
    dims; inputs that fit one chunk go to it as they are (the common case for small models).
    """
    lead = tuple(max(sizes) for sizes in zip(*(x.shape[:3] for x in xs)))  # broadcast (sizes are 1 or n)
    n = lead[0] * lead[1] * lead[2]
    step = max(1, CHUNK_BYTES // max(math.prod(x.shape[3:]) * 8 for x in xs))  # sized for float64 temporaries
    if step >= n:
        return fn(*xs)
    flat = [x.expand(lead + x.shape[3:]).reshape((-1,) + x.shape[3:]) for x in xs]
    parts = [fn(*(x[i : i + step] for x in flat)) for i in range(0, n, step)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p).unflatten(0, lead) for p in zip(*parts))
    return torch.cat(parts).unflatten(0, lead)


def _product_sq_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.double(), b.double()
    sq = ((a.transpose(-1, -2) @ a) * (b @ b.transpose(-1, -2))).sum((-1, -2))
    return sq.clamp_min(0).to(dtype)


def product_sq_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a b||_F^2 for a [B, C, ..., D, d], b [B, C, ..., d, D] without the D x D product: tr((a^T a)(b b^T)).

    The trace cancels heavily when a b is small next to |a| |b| (decayed or near-orthogonal attention), so
    it is summed in float64 and clamped at 0; in float32 it rounds to noise or below zero there.
    """
    return per_matrix(_product_sq_norm, a, b)


def _read_write_means(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = up * down.transpose(-1, -2)
    return p.mean(-1), p.mean(-2)


def _row_col_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, R, K] -> per row (mean, mean square) over K, stacked [n, R, 2]; per column the same [n, K, 2]."""
    sq = x.square()
    return torch.stack([x.mean(-1), sq.mean(-1)], -1), torch.stack([x.mean(-2), sq.mean(-2)], -1)


def _mlp_features(ws: WeightSpace) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean and mean square of up/gate/down per stream row and per unit, and the mean of unit j's
    read-write product up[i, j] down[j, i] (scale-invariant) both ways.

    Matrix by matrix (`per_matrix`), so that each is read from memory once for all four moments.
    """
    f: dict[str, torch.Tensor] = {}
    u: dict[str, torch.Tensor] = {}
    for name in ("up", "gate", "down"):
        if name in ws:
            rows, cols = per_matrix(_row_col_moments, ws[name])  # (mean, mean square) over rows / columns
            stream, unit = (cols, rows) if name == "down" else (rows, cols)  # down is [units, stream]
            f[f"{name}_mean"], f[f"{name}_sq"] = stream.unbind(-1)
            u[f"{name}_mean"], u[f"{name}_sq"] = unit.unbind(-1)
    f["up_down"], u["up_down"] = per_matrix(_read_write_means, ws["up"], ws["down"])
    return f, u


def block_features(ws: WeightSpace) -> BlockFeatures:
    """Per-block invariant features by stream coordinate, MLP unit and head (each product computed once)."""
    spec, g = ws.spec, ws.spec.group_size
    q, o = ws["q"], ws["o"]
    k, v = expand_kv(ws["k"], g), expand_kv(ws["v"], g)
    zero_d = _zeros_like_stream(ws)
    zero_a = q.new_zeros(q.shape[:3] + (spec.mlp_width,))
    # full-size temporaries (products, einsum's permuted copies) are made a few matrices at a time
    qk = per_matrix(lambda a, b: (a * b).sum(-1), q, k)  # diag(q_h k_h^T): [B, C, L, H, D]
    vo = per_matrix(lambda a, b: (a * b.transpose(-1, -2)).sum(-1), v, o)  # diag(v_h o_h)
    f = {"qk_diag": qk.mean(3), "vo_diag": vo.mean(3)}

    def head_mean(bias: str, x: torch.Tensor, stream_rows: bool) -> torch.Tensor:
        """Mean over heads of x_h b_h (x [..., H, D, d], stream rows) or b_h x_h (x [..., H, d, D]): a D-vector."""
        if bias not in ws:
            return zero_d
        b = ws[bias] if bias == "q_bias" else expand_kv(ws[bias], g)  # k/v biases live on key-value heads

        def contract(bm: torch.Tensor, xm: torch.Tensor) -> torch.Tensor:
            return (xm @ bm.unsqueeze(-1) if stream_rows else bm.unsqueeze(-2) @ xm).flatten(-2).sum(-2)

        return per_matrix(contract, b, x) / spec.n_heads

    f["bq_k"] = head_mean("q_bias", k, stream_rows=True)
    f["q_bk"] = head_mean("k_bias", q, stream_rows=True)
    f["bv_o"] = head_mean("v_bias", o, stream_rows=False)
    mlp_stream, u = _mlp_features(ws)
    f.update(mlp_stream)
    for name in ("gate_mean", "gate_sq"):
        f.setdefault(name, zero_d)
        u.setdefault(name, zero_a)
    for name in ("o_bias", "down_bias", "norm1_weight", "norm1_bias", "norm2_weight", "norm2_bias"):
        f[name] = ws[name] if name in ws else zero_d
    for name in ("up_bias", "gate_bias"):
        u[name] = ws[name] if name in ws else zero_a
    return BlockFeatures(
        stream=soft_clip(torch.stack([f[n] for n in STREAM_FEATURES], dim=-1)),
        unit=soft_clip(torch.stack([u[n] for n in UNIT_FEATURES], dim=-1)),
        head=soft_clip(torch.stack([qk.mean(-1), vo.mean(-1)], dim=-1)),
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


OUTER_KINDS = ("embed", "readout", "gain", "bias", "free")


def outer_kind(t) -> str:
    """Parameter-sharing class of an outer tensor: one of OUTER_KINDS."""
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
    return soft_clip(torch.stack(f, dim=-1))


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
            stats = torch.stack([flat.mean(-1), (_mean_square(flat, -1) + 1e-12).sqrt()], -1)
            tensors[f"{t.name}:stats"] = stats
            specs.append(TensorSpec(f"{t.name}:stats", (None,), (2,), False, "free"))
            continue
        rows = outer_stream_rows(ws, t.name)
        for stat, value in (("mean", rows.mean(-2)), ("rms", (_mean_square(rows, -2) + 1e-12).sqrt())):
            tensors[f"{t.name}:{stat}"] = value
            specs.append(TensorSpec(f"{t.name}:{stat}", (t.axes[ax],), (d,), False, t.role))
    return WeightSpace(replace(ws.spec, tensors=tuple(specs)), tensors)
