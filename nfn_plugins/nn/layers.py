"""Transformer-NFN layers: equivariant (weight space -> weight space) and invariant (weight space -> vector).

Design (why it is exact, width- and depth-agnostic, and linear in the weight count):
- Every learned map mixes channels only, or is a small MLP applied pointwise to invariant features indexed
  by a stream coordinate, an MLP unit or a head (`features.py`). Pointwise maps commute with
  permutations of that index, and no parameter's shape depends on D, d_k, d_v, heads, MLP width or depth.
- Tensors acted on by per-head GL maps (q, k, v, o and their biases) are only ever combined linearly per
  head, rescaled by invariant scalars, or multiplied from the stream side by GL-invariant operators
  (q k^T, v o, their transposes), normalised by their Frobenius norms so the update stays degree 1.
  Those products cost D d^2 per head (never a D x D matrix) and run on a few projected channels.
- Permutation-only tensors (MLP, norms, embeddings, heads) get DeepSets-style broadcasts of the features.
Equivariance group: stream permutations, GQA-aware head permutations, per-head GL on Q/K and on V/O,
MLP-unit permutations. The per-unit MLP scalings and the stream sign flips of RMSNorm models are
symmetries of the model that these layers do not build in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import WeightSpaceSpec
from ..weight_space import WeightSpace
from .features import (
    GLOBAL_FEATURES,
    HEAD_FEATURES,
    OUTER_KINDS,
    STREAM_FEATURES,
    UNIT_FEATURES,
    block_features,
    block_slices,
    expand_kv,
    global_features,
    group_mean,
    outer_kind,
    outer_stream_rows,
    per_matrix,
    product_sq_norm,
    soft_clip,
    stream_axis,
)

GL_TENSORS = ("q", "k", "v", "o")
GL_BIASES = ("q_bias", "k_bias", "v_bias")
STREAM_VECTORS = ("o_bias", "down_bias", "norm1_weight", "norm1_bias", "norm2_weight", "norm2_bias")
MLP_MATRICES = ("up", "gate", "down")
MLP_BIASES = ("up_bias", "gate_bias")

STREAM_USES = (
    *(f"{t}_mod" for t in GL_TENSORS), *(f"{t}_bc" for t in GL_TENSORS),
    *(f"{b}_outer" for b in GL_BIASES), *(f"{b}_in" for b in GL_BIASES),
    *MLP_MATRICES, *STREAM_VECTORS,
)  # fmt: skip
UNIT_USES = (*MLP_MATRICES, *MLP_BIASES)
HEAD_USES = (*GL_TENSORS, *GL_BIASES)
# Mixing views per GL tensor: identity, stream-modulated, stream-mean broadcast, head-modulated, bias source.
VIEWS = {"q": 5, "k": 5, "v": 5, "o": 4, "q_bias": 3, "k_bias": 3, "v_bias": 3}


def _per_output_channel(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [C_out, 1] mixing weight shaped to broadcast against [B, C_out, ...] like x."""
    return weight.view((1, -1) + (1,) * (x.dim() - 2))


def mix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Channel mixing [B, C_in, ...] -> [B, C_out, ...]: the one linear map every symmetry commutes with."""
    b, c = x.shape[:2]
    if c == 1:  # an outer product: a broadcast multiply is much faster than a bmm with inner size 1
        return x.contiguous() * _per_output_channel(weight, x)  # contiguous like the bmm's output
    out = torch.bmm(weight.expand(b, -1, -1), x.reshape(b, c, -1))  # bmm: no transposed copy of x
    return out.reshape((b, weight.shape[0]) + x.shape[2:])


def mix_each(xs: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """`mix` of several same-shape tensors, each by its own weight, as one batched matmul (fewer ops)."""
    x = torch.stack(xs)  # [n, B, C_in, ...]
    n, b, c = x.shape[:3]
    w = torch.stack(weights)[:, None].expand(-1, b, -1, -1).reshape(n * b, -1, c)
    out = torch.bmm(w, x.reshape(n * b, c, -1))
    return list(out.reshape((n, b, w.shape[1]) + x.shape[3:]).unbind(0))


def add_mix_(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``y += mix(x, weight)`` in place (y contiguous [B, C_out, ...]): the matmul accumulates straight into y."""
    b, c = x.shape[:2]
    y.view(b, y.shape[1], -1).baddbmm_(weight.expand(b, -1, -1), x.reshape(b, c, -1))
    return y


def add_outer_sum_(y: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``y[..., i, j] += rows[..., i] + cols[..., j]`` in one pass: the rank-2 product [rows, 1] @ [1; cols]."""
    n, m = y.shape[-2:]
    left = torch.stack([rows, torch.ones_like(rows)], -1).reshape(-1, n, 2)
    right = torch.stack([torch.ones_like(cols), cols], -2).reshape(-1, 2, m)
    y.view(-1, n, m).baddbmm_(left, right)
    return y


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """[B, C, *idx, F] -> [B, *idx, C*F] for pointwise MLPs over an index."""
    return x.movedim(1, -2).flatten(-2)


def _uses(y: torch.Tensor, names: tuple[str, ...], c_out: int) -> dict[str, torch.Tensor]:
    """[B, *idx, U*C_out] -> {use: [B, C_out, *idx]}."""
    y = y.unflatten(-1, (len(names), c_out)).movedim(-1, 1)
    return dict(zip(names, y.unbind(-1)))


class PointwiseMLP(nn.Sequential):
    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def _init_mix(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) / shape[-1] ** 0.5)


class EquivariantLayer(nn.Module):
    """Weight space with ``c_in`` channels -> weight space with ``c_out`` channels, for any architecture."""

    def __init__(self, c_in: int, c_out: int, hidden: int = 32, product_channels: int = 4):
        super().__init__()
        self.c_in, self.c_out, self.p = c_in, c_out, product_channels
        names = (*GL_TENSORS, *GL_BIASES, *MLP_MATRICES, *MLP_BIASES, *STREAM_VECTORS)
        self.mix = nn.ParameterDict({n: _init_mix(VIEWS.get(n, 1) * c_out, c_in) for n in names})
        self.outer_mix = nn.ParameterDict({k: _init_mix(c_out, c_in) for k in OUTER_KINDS})
        self.free_bias = nn.Parameter(torch.zeros(c_out))
        self.prod_in = nn.ParameterDict({n: _init_mix(product_channels, c_in) for n in GL_TENSORS})
        self.prod_out = nn.ParameterDict({n: _init_mix(c_out, 2 * product_channels) for n in GL_TENSORS})
        n_s, n_u, n_h, n_g = len(STREAM_FEATURES), len(UNIT_FEATURES), len(HEAD_FEATURES), len(GLOBAL_FEATURES)
        self.stream_ctx = PointwiseMLP(c_in * (2 * n_s + n_g), hidden, len(STREAM_USES) * c_out)
        self.unit_ctx = PointwiseMLP(c_in * n_u, hidden, len(UNIT_USES) * c_out)
        self.head_ctx = PointwiseMLP(c_in * n_h + 2 * product_channels, hidden, len(HEAD_USES) * c_out)
        self.global_ctx = PointwiseMLP(c_in * (n_s + n_g), hidden, len(OUTER_KINDS) * c_out)

    def _views(self, ws: WeightSpace, name: str) -> list[torch.Tensor]:
        return list(mix(ws[name], self.mix[name]).chunk(VIEWS.get(name, 1), dim=1))

    def _gl_update(self, x: torch.Tensor, name: str, s_mod: torch.Tensor, s_bc: torch.Tensor,
                   hs: torch.Tensor) -> torch.Tensor:
        """Linear part of the update of a GL tensor (q, k, v: stream rows; o: stream columns): identity,
        stream-modulated, stream-mean-broadcast and head-modulated views from one mix, combined in place; a
        few blocks at a time when the four views of every block would make large temporaries (MiniLM)."""
        stream_dim = -1 if name == "o" else -2
        along = (lambda v: v[:, :, :, None, None, :]) if name == "o" else (lambda v: v[:, :, :, None, :, None])
        w = self.mix[name][: 4 * self.c_out]  # views 0-3 (view 4, the bias source, is `_bias_rows`')
        scales = (along(s_mod), along(s_bc), hs[..., None, None])

        def combined(xs: torch.Tensor, mod: torch.Tensor, bc: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
            ident, by_stream, stream_mean, by_head = mix(xs, w).chunk(4, dim=1)
            y = torch.addcmul(ident, by_stream, mod)  # fresh: autograd forbids writing into a chunk
            # the mean of a mix is the mix of the mean
            return y.addcmul_(by_head, head).addcmul_(bc, stream_mean.mean(stream_dim, keepdim=True))

        slices = block_slices(4 * x[:, :1, :1].numel() * self.c_out * x.element_size(), x.shape[2])
        if len(slices) == 1:
            return combined(x, *scales).contiguous()  # no copy unless B > 1 made it strided
        y = x.new_empty((x.shape[0], self.c_out) + x.shape[2:])
        for s in slices:
            y[:, :, s] = combined(x[:, :, s], *(v[:, :, s] for v in scales))
        return y

    def _bias_rows(self, x: torch.Tensor, s_in: torch.Tensor, name: str) -> torch.Tensor:
        """Bias update from its matrix ``name`` (q, k or v): the stream-weighted mean of its rows [B, co, L, H, d]."""
        w = self.mix[name].view(VIEWS[name], self.c_out, self.c_in)[4]
        s_per_matrix = s_in.transpose(1, 2)[:, None, :, None]  # [B, 1, L, 1, co, D]: broadcast over channels, heads
        rows = per_matrix(torch.matmul, s_per_matrix, x) / x.shape[-2]  # [B, C, L, H, co, d]
        mixed = (rows * w.T[:, None, None, :, None]).sum(1)  # sum over input channels: [B, L, H, co, d]
        return mixed.permute(0, 3, 1, 2, 4)

    def _products(self, ws: WeightSpace) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
        """GL-equivariant cubic terms (QK q, VO q, ...) on ``p`` projected channels each, and the norms used.

        Returns, per GL tensor, the two product terms (each [B, p, ...], to be mixed by halves of
        ``prod_out``); the norms divide the small d x d factors, never the full-size products.
        """
        g = ws.spec.group_size
        q, o = mix(ws["q"], self.prod_in["q"]), mix(ws["o"], self.prod_in["o"])
        k, v = expand_kv(mix(ws["k"], self.prod_in["k"]), g), expand_kv(mix(ws["v"], self.prod_in["v"]), g)
        gram = lambda a, b: a.transpose(-1, -2) @ b  # noqa: E731  sums over the stream axis
        n_qk = (product_sq_norm(q, k.transpose(-1, -2)) + 1e-12).sqrt()  # ||q k^T||_F
        n_vo = (product_sq_norm(v, o) + 1e-12).sqrt()  # ||v o||_F
        nqk, nvo = n_qk[..., None, None], n_vo[..., None, None]
        oq = o @ q
        kq, kv, ov, ok = gram(k, q) / nqk, gram(k, v) / nqk, o @ v / nvo, o @ k / nvo
        out = {
            "q": [q @ kq, v @ (oq / nvo)],
            "k": [group_mean(k @ kq.transpose(-1, -2), g), group_mean(v @ ok, g)],
            "v": [group_mean(v @ ov, g), group_mean(q @ kv, g)],
            "o": [ov @ o, (oq / nqk) @ k.transpose(-1, -2)],
        }
        return out, torch.stack([n_qk, n_vo], -1)

    def forward(self, ws: WeightSpace, blocks_only: bool = False) -> WeightSpace:
        """``blocks_only``: return only the block tensors (a learned optimizer's last layer: it updates
        nothing else), skipping the outer tensors' maps."""
        spec: WeightSpaceSpec = ws.spec
        if len(ws.batch_shape) != 2 or ws.batch_shape[1] != self.c_in:
            raise ValueError(f"expected batch dims [B, {self.c_in}], got {ws.batch_shape}")
        g, L, co = spec.group_size, spec.n_blocks, self.c_out
        feats, G = block_features(ws), global_features(ws)
        S = feats.stream
        s_in = torch.cat([_channels_last(S), _channels_last(S.mean(2, keepdim=True).expand_as(S)),
                          _channels_last(G).unsqueeze(1).expand(-1, L, -1, -1)], -1)
        s = _uses(self.stream_ctx(s_in), STREAM_USES, co)  # each [B, co, L, D]
        u = _uses(self.unit_ctx(_channels_last(feats.unit)), UNIT_USES, co)  # [B, co, L, A]
        prods, norms = self._products(ws)
        h_in = torch.cat([_channels_last(feats.head), _channels_last(soft_clip(norms))], -1)
        h = _uses(self.head_ctx(h_in), HEAD_USES, co)  # [B, co, L, H]

        out: dict[str, torch.Tensor] = {}
        for t in GL_TENSORS:
            hs = h[t] if t in ("q", "o") else group_mean(h[t].unsqueeze(-1), g).squeeze(-1)
            bias = f"{t}_bias" if t != "o" else None  # o_bias lives on the stream, not on a head
            out[t] = self._gl_update(ws[t], t, s[f"{t}_mod"], s[f"{t}_bc"], hs)
            add_mix_(out[t], torch.cat(prods[t], 1), self.prod_out[t])  # both product terms in one matmul
            if bias in ws:
                b_id, b_h, b_outer = self._views(ws, bias)
                out[t].addcmul_(s[f"{bias}_outer"][:, :, :, None, :, None], b_outer.unsqueeze(-2))
                hb = h[bias] if t == "q" else group_mean(h[bias].unsqueeze(-1), g).squeeze(-1)
                out[bias] = b_id + hb[..., None] * b_h + self._bias_rows(ws[t], s[f"{bias}_in"], t)

        for t in ("up", "gate"):  # the largest tensors: one in-place pass adds the stream and unit terms
            if t in ws:
                out[t] = add_outer_sum_(mix(ws[t], self.mix[t]), s[t], u[t])
        out["down"] = add_outer_sum_(mix(ws["down"], self.mix["down"]), u["down"], s["down"])
        for t in MLP_BIASES:
            if t in ws:
                out[t] = mix(ws[t], self.mix[t]) + u[t]
        vectors = [t for t in STREAM_VECTORS if t in ws]  # all [B, C, L, D]
        if vectors:
            mixed = mix_each([ws[t] for t in vectors], [self.mix[t] for t in vectors])
            out.update(zip(vectors, torch._foreach_add(mixed, [s[t] for t in vectors])))

        if blocks_only:
            return WeightSpace(spec.with_tensors(tuple(t for t in spec.tensors if t.block)), out)
        glob = _uses(self.global_ctx(torch.cat([_channels_last(S.mean(2)), _channels_last(G)], -1)), OUTER_KINDS, co)
        for t in spec.tensors:
            if t.block:
                continue
            kind = outer_kind(t)
            y = mix(ws[t.name], self.outer_mix[kind])
            if kind == "free":
                y = y + self.free_bias.reshape((1, -1) + (1,) * t.ndim)
            else:
                ax = stream_axis(t.axes)
                shape = [1] * t.ndim
                shape[ax] = spec.d_model
                y = y + glob[kind].reshape(glob[kind].shape[:2] + tuple(shape))
            out[t.name] = y
        return WeightSpace(spec, out)


class EquivariantReLU(nn.Module):
    """ReLU on tensors with no per-head GL axis (a pointwise ReLU on q/k/v/o would break GL equivariance).

    ``inplace=True`` overwrites the input's tensors (for layer outputs nothing else holds: saves a
    full-size copy of every MLP matrix).
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.relu = torch.relu_ if inplace else torch.relu

    def forward(self, ws: WeightSpace) -> WeightSpace:
        gl_axes = {"qk", "qk*", "vo", "vo*"}
        return WeightSpace(
            ws.spec, {t.name: ws[t.name] if gl_axes & set(t.axes) else self.relu(ws[t.name]) for t in ws.spec.tensors}
        )


class InvariantLayer(nn.Module):
    """Weight space with ``c_in`` channels -> [B, 3 * out_dim]: per-block pooled invariants (shared map),
    aggregated over blocks by mean and max (depth-agnostic), plus pooled outer tensors."""

    def __init__(self, c_in: int, out_dim: int = 32):
        super().__init__()
        n_block = 2 * (len(STREAM_FEATURES) + len(UNIT_FEATURES) + len(HEAD_FEATURES))
        self.block = nn.Linear(c_in * n_block, out_dim)
        self.outer = nn.Linear(c_in * (2 * len(GLOBAL_FEATURES) + 2), out_dim)
        self.out_dim = 3 * out_dim

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        def mean_rms(x: torch.Tensor, dim: int) -> list[torch.Tensor]:
            return [x.mean(dim), (x.square().mean(dim) + 1e-12).sqrt()]

        per_block = torch.cat(
            [_channels_last(f) for x in block_features(ws) for f in mean_rms(x, 3)],
            -1,
        )  # [B, L, C * n_block]
        z = self.block(per_block)
        G = global_features(ws)
        free = [outer_stream_rows(ws, t.name) if stream_axis(t.axes) is not None else ws[t.name].flatten(2)
                for t in ws.spec.tensors if not t.block and outer_kind(t) == "free"]
        free_flat = torch.cat([f.flatten(2) for f in free], -1) if free else G.new_zeros(G.shape[:2] + (1,))
        outer_in = torch.cat([*(_channels_last(f) for f in mean_rms(G, 2)),
                              *(f.unsqueeze(-1).flatten(1) for f in mean_rms(free_flat, 2))], -1)
        return torch.cat([z.mean(1), z.amax(1), self.outer(outer_in)], -1)
