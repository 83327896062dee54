"""The exact symmetry group of a transformer weight space: sampling, action, inverse, composition.

An element acts slot-wise on every symmetric axis: ``new[i] = old[perm[i]] @ M[i]`` (``* s[i]`` for
scalar slots). Axes labelled with a ``*`` (``qk*``, ``vo*``, ``mlp~*``) take the inverse transpose, so
that every product the network computes (q k^T, v o, up-unit * down-unit, stream reads and writes)
is unchanged. Which axis takes which factor comes from the labels in `spec.BLOCK_AXES`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .spec import WeightSpaceSpec
from .weight_space import WeightSpace


def _invert_perm(perm: torch.Tensor) -> torch.Tensor:
    return torch.argsort(perm, dim=-1)


def _gather(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` indexed along leading dim ``dim`` by ``index`` (shape [..., n]), batched over index's leading dims."""
    return torch.gather(x, dim, index.reshape(index.shape + (1,) * (x.dim() - index.dim())).expand(
        index.shape + x.shape[index.dim():]))


@dataclass(frozen=True)
class GroupElement:
    """One element of `SymmetryGroup`. Per-block factors carry a leading block axis L.

    stream_perm, stream_scale: [D] (scale is +-1 for RMSNorm models, else 1)
    head_perm: [L, H] (query heads, GQA-consistent); kv_perm: [L, H_kv]
    qk: [L, H_kv, d_k, d_k]; vo: [L, H_kv, d_v, d_v]
    mlp_perm: [L, A]; mlp_scale: [L, A] (1 where the activation admits no scaling)
    """

    spec: WeightSpaceSpec
    stream_perm: torch.Tensor
    stream_scale: torch.Tensor
    head_perm: torch.Tensor
    kv_perm: torch.Tensor
    qk: torch.Tensor
    vo: torch.Tensor
    mlp_perm: torch.Tensor
    mlp_scale: torch.Tensor

    # -- group structure -------------------------------------------------------------------------
    def compose(self, other: "GroupElement") -> "GroupElement":
        """``self ∘ other``: acting with the result equals acting with ``other``, then with ``self``."""
        g, h = self, other

        def mats(mh: torch.Tensor, mg: torch.Tensor) -> torch.Tensor:
            return _gather(mh, g.kv_perm, 1) @ mg

        return replace(
            g,
            stream_perm=h.stream_perm[g.stream_perm],
            stream_scale=h.stream_scale[g.stream_perm] * g.stream_scale,
            head_perm=torch.gather(h.head_perm, 1, g.head_perm),
            kv_perm=torch.gather(h.kv_perm, 1, g.kv_perm),
            qk=mats(h.qk, g.qk),
            vo=mats(h.vo, g.vo),
            mlp_perm=torch.gather(h.mlp_perm, 1, g.mlp_perm),
            mlp_scale=torch.gather(h.mlp_scale, 1, g.mlp_perm) * g.mlp_scale,
        )

    __matmul__ = compose

    def inverse(self) -> "GroupElement":
        inv_stream, inv_kv, inv_mlp = (_invert_perm(p) for p in (self.stream_perm, self.kv_perm, self.mlp_perm))
        return replace(
            self,
            stream_perm=inv_stream,
            stream_scale=(1 / self.stream_scale)[inv_stream],
            head_perm=_invert_perm(self.head_perm),
            kv_perm=inv_kv,
            qk=_gather(torch.linalg.inv(self.qk), inv_kv, 1),
            vo=_gather(torch.linalg.inv(self.vo), inv_kv, 1),
            mlp_perm=inv_mlp,
            mlp_scale=torch.gather(1 / self.mlp_scale, 1, inv_mlp),
        )

    def to(self, dtype: torch.dtype) -> "GroupElement":
        return replace(self, stream_scale=self.stream_scale.to(dtype), qk=self.qk.to(dtype), vo=self.vo.to(dtype),
                       mlp_scale=self.mlp_scale.to(dtype))

    # -- action ----------------------------------------------------------------------------------
    def act(self, ws: WeightSpace) -> WeightSpace:
        """The transformed weight space (same batch dims); the model it describes computes the same function."""
        if replace(ws.spec, tensors=()) != replace(self.spec, tensors=()):
            raise ValueError(
                f"group element of {self.spec.family} (D={self.spec.d_model}, {self.spec.n_blocks} blocks) cannot act "
                f"on a weight space of {ws.spec.family} (D={ws.spec.d_model}, {ws.spec.n_blocks} blocks)"
            )
        return WeightSpace(ws.spec, {t.name: self._act_tensor(ws[t.name], t.axes, t.block) for t in ws.spec.tensors})

    def _act_tensor(self, x: torch.Tensor, axes, block: bool) -> torch.Tensor:
        dt = x.dtype
        lead = x.dim() - len(axes)  # batch dims (+ block axis, which is the last of them)
        heads = "head" if "head" in axes else "kv_head" if "kv_head" in axes else None
        for i, axis in enumerate(axes):
            d = lead + i
            if axis is None:
                continue
            if axis == "stream":
                x = x.index_select(d, self.stream_perm) * _along(self.stream_scale.to(dt), x.dim(), d)
            elif axis == "stream_gain":  # a diagonal map of the stream: signs cancel
                x = x.index_select(d, self.stream_perm)
            elif axis in ("head", "kv_head"):
                perm = self.head_perm if axis == "head" else self.kv_perm
                x = _permute_blocks(x, perm, lead - 1, d)
            elif axis.startswith("mlp"):
                x = _permute_blocks(x, self.mlp_perm, lead - 1, d)
                if axis != "mlp":
                    s = self.mlp_scale.to(dt) if axis == "mlp~" else 1 / self.mlp_scale.to(dt)
                    shape = [1] * x.dim()
                    shape[lead - 1], shape[d] = s.shape
                    x = x * s.reshape(shape)
        for i, axis in enumerate(axes):  # per-head matrices act after the head permutation
            if axis in ("qk", "qk*", "vo", "vo*"):
                mats = (self.qk if axis.startswith("qk") else self.vo).to(dt)
                if axis.endswith("*"):
                    mats = torch.linalg.inv(mats).transpose(-1, -2)
                if heads == "head":
                    mats = mats.repeat_interleave(self.spec.group_size, dim=1)
                x = _right_multiply(x, mats, lead + i, lead + axes.index(heads))
        return x


def _along(v: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = v.shape[0]
    return v.reshape(shape)


def _permute_blocks(x: torch.Tensor, perm: torch.Tensor, block_dim: int, dim: int) -> torch.Tensor:
    """Permute ``dim`` with a different permutation per block (perm: [L, n], block axis at ``block_dim``)."""
    shape = [1] * x.dim()
    shape[block_dim], shape[dim] = perm.shape
    return torch.take_along_dim(x, perm.reshape(shape), dim=dim)


def _right_multiply(x: torch.Tensor, mats: torch.Tensor, dim: int, head_dim: int) -> torch.Tensor:
    """x[..., l, h, ..., i(dim), ...] -> sum_i x[..., i, ...] mats[l, h, i, j]; head axis right after block axis."""
    moved = x.movedim(dim, -1)  # [..., L, H, rest..., d]
    lead = head_dim + 1
    rest = moved.shape[lead:-1]
    flat = moved.reshape(moved.shape[:lead] + (-1, moved.shape[-1]))
    out = torch.matmul(flat, mats)
    return out.reshape(moved.shape[:lead] + rest + (mats.shape[-1],)).movedim(-1, dim)


class SymmetryGroup:
    """The symmetry group of one architecture (see `WeightSpaceSpec.describe_group`)."""

    def __init__(self, spec: WeightSpaceSpec):
        self.spec = spec

    @classmethod
    def for_model(cls, model, extra_axes=None) -> "SymmetryGroup":
        from .extract import bind

        return cls(bind(model, extra_axes).spec)

    def __repr__(self) -> str:
        return f"SymmetryGroup(\n{self.spec.describe_group()}\n)"

    def identity(self, dtype: torch.dtype = torch.float64) -> GroupElement:
        s = self.spec
        L = s.n_blocks
        eye = lambda d: torch.eye(d, dtype=dtype).expand(L, s.n_kv_heads, d, d).clone()  # noqa: E731
        return GroupElement(
            spec=s,
            stream_perm=torch.arange(s.d_model),
            stream_scale=torch.ones(s.d_model, dtype=dtype),
            head_perm=torch.arange(s.n_heads).expand(L, -1).clone(),
            kv_perm=torch.arange(s.n_kv_heads).expand(L, -1).clone(),
            qk=eye(s.head_dim_qk),
            vo=eye(s.head_dim_vo),
            mlp_perm=torch.arange(s.mlp_width).expand(L, -1).clone(),
            mlp_scale=torch.ones(L, s.mlp_width, dtype=dtype),
        )

    def sample(
        self,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        permutations_only: bool = False,
        orthogonal: bool = False,
        unit_scales: bool = True,
    ) -> GroupElement:
        """A random element. ``permutations_only``: the permutation subgroup (no GL, no scales, no signs);
        ``orthogonal``: orthogonal head maps and +-1 scales (the part under which gradients move like weights);
        ``unit_scales=False``: no MLP-unit scales and no stream signs, neither per coordinate (RMSNorm) nor
        global (LayerNorm): the group the NFN layers are built for."""
        s, L = self.spec, self.spec.n_blocks
        g = generator

        def perm(n: int) -> torch.Tensor:
            return torch.randperm(n, generator=g)

        kv_perm = torch.stack([perm(s.n_kv_heads) for _ in range(L)])
        inner = torch.stack([torch.stack([perm(s.group_size) for _ in range(s.n_kv_heads)]) for _ in range(L)])
        head_perm = (kv_perm.unsqueeze(-1) * s.group_size + inner).reshape(L, s.n_heads)
        e = self.identity(dtype)
        if permutations_only:
            return replace(e, stream_perm=perm(s.d_model), head_perm=head_perm, kv_perm=kv_perm,
                           mlp_perm=torch.stack([perm(s.mlp_width) for _ in range(L)]))
        qk = _rotary_maps(s, L, g, dtype, orthogonal) if s.rotary else _gl(L, s.n_kv_heads, s.head_dim_qk, g, dtype, orthogonal)
        vo = _gl(L, s.n_kv_heads, s.head_dim_vo, g, dtype, orthogonal)
        signs = lambda *shape: torch.randint(0, 2, shape, generator=g).to(dtype) * 2 - 1  # noqa: E731
        mlp_scale = torch.ones(L, s.mlp_width, dtype=dtype)
        if unit_scales and s.mlp_scale == "nonzero":
            mlp_scale = signs(L, s.mlp_width)
        if unit_scales and s.mlp_scale != "none" and not orthogonal:
            mlp_scale = mlp_scale * torch.exp(torch.rand(L, s.mlp_width, generator=g, dtype=dtype) - 0.5)
        if not unit_scales:
            stream_scale = e.stream_scale
        elif s.stream_signs:
            stream_scale = signs(s.d_model)
        else:  # LayerNorm is odd once its bias flips too: a global sign of the stream
            stream_scale = signs(1).expand(s.d_model).clone()
        return GroupElement(s, perm(s.d_model), stream_scale, head_perm, kv_perm, qk, vo,
                            torch.stack([perm(s.mlp_width) for _ in range(L)]), mlp_scale)


def _orthogonal(shape: tuple[int, ...], g, dtype) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(shape, generator=g, dtype=dtype))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def _gl(L: int, n: int, d: int, g, dtype, orthogonal: bool) -> torch.Tensor:
    """Random invertible maps U diag(exp(u)) V with condition number <= e (well conditioned in float64)."""
    u = _orthogonal((L, n, d, d), g, dtype)
    if orthogonal:
        return u
    v = _orthogonal((L, n, d, d), g, dtype)
    scales = torch.exp(torch.rand(L, n, d, generator=g, dtype=dtype) - 0.5)
    return u @ torch.diag_embed(scales) @ v


def _rotary_maps(s: WeightSpaceSpec, L: int, g, dtype, orthogonal: bool) -> torch.Tensor:
    """Per rotary pair (i, i + d/2), multiplication by a complex scalar: the maps commuting with every rotation."""
    half = s.head_dim_qk // 2
    angle = torch.rand(L, s.n_kv_heads, half, generator=g, dtype=dtype) * 2 * torch.pi
    radius = torch.ones_like(angle) if orthogonal else torch.exp(torch.rand(angle.shape, generator=g, dtype=dtype) - 0.5)
    a, b = radius * torch.cos(angle), radius * torch.sin(angle)
    m = torch.zeros(L, s.n_kv_heads, 2 * half, 2 * half, dtype=dtype)
    idx = torch.arange(half)
    m[..., idx, idx] = a
    m[..., idx + half, idx + half] = a
    m[..., idx, idx + half] = b
    m[..., idx + half, idx] = -b
    return m
