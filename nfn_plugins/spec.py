"""The one description of a transformer weight space: which symmetry acts on which axis of each tensor.

Everything else (extraction, the symmetry group's action, the NFN's parameter sharing) is derived from
the axis labels below instead of being hand-written per architecture family.

Conventions: every block matrix is stored in right-multiplication form (y = x W), per head where the
tensor has heads. Axis labels:

- ``stream``  the residual stream (width D): one signed permutation for the whole model (RMSNorm models:
  any signs; LayerNorm models: one global sign, as LayerNorm is odd once its bias flips too).
- ``stream_gain``  a norm's gain: a diagonal map of the stream, so it is permuted but takes no signs.
- ``head`` / ``kv_head``  query heads (H) / key-value heads (H_kv, grouped-query attention).
- ``qk`` / ``qk*``  a head's query/key dimension, acted on by A / A^-T (so q k^T is unchanged).
- ``vo`` / ``vo*``  a head's value dimension, acted on by B / B^-T (so v o is unchanged).
- ``mlp``  MLP hidden units, permutation only (the gate of a gated MLP).
- ``mlp~`` / ``mlp~*``  MLP hidden units, permutation times a per-unit scale s / 1/s.
- ``None``  a free axis no symmetry acts on (vocabulary, positions, classes, pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Axis = Literal["stream", "stream_gain", "head", "kv_head", "qk", "qk*", "vo", "vo*", "mlp", "mlp~", "mlp~*"] | None
MlpScale = Literal["none", "positive", "nonzero"]

# Canonical per-block tensors: name -> trailing axes (after the block axis).
BLOCK_AXES: dict[str, tuple[Axis, ...]] = {
    "q": ("head", "stream", "qk"),
    "k": ("kv_head", "stream", "qk*"),
    "v": ("kv_head", "stream", "vo"),
    "o": ("head", "vo*", "stream"),
    "q_bias": ("head", "qk"),
    "k_bias": ("kv_head", "qk*"),
    "v_bias": ("kv_head", "vo"),
    "o_bias": ("stream",),
    "up": ("stream", "mlp~"),
    "up_bias": ("mlp~",),
    "gate": ("stream", "mlp"),
    "gate_bias": ("mlp",),
    "down": ("mlp~*", "stream"),
    "down_bias": ("stream",),
    "norm1_weight": ("stream_gain",),
    "norm1_bias": ("stream",),
    "norm2_weight": ("stream_gain",),
    "norm2_bias": ("stream",),
}
REQUIRED_BLOCK_TENSORS = ("q", "k", "v", "o", "up", "down")

NON_BLOCK_ROLES = ("embed", "readout", "vector", "free")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the weight space: its axes, its shape (without batch dims) and whether it is per block."""

    name: str
    axes: tuple[Axis, ...]
    shape: tuple[int, ...]
    block: bool
    role: str  # block tensors: their canonical name; others: one of NON_BLOCK_ROLES

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class WeightSpaceSpec:
    """Static description of one architecture's weight space and the facts its symmetry group depends on."""

    family: str
    n_blocks: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim_qk: int
    head_dim_vo: int
    mlp_width: int
    gated_mlp: bool
    mlp_scale: MlpScale  # which per-unit scalings of the MLP are symmetries
    rotary: bool  # rotary positions: Q/K maps must commute with the rotations
    stream_signs: bool  # RMSNorm models: sign flips of the stream are symmetries too
    tensors: tuple[TensorSpec, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rotary and self.head_dim_qk % 2:
            raise ValueError(f"rotary models need an even head_dim, got {self.head_dim_qk}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def group_size(self) -> int:
        """Query heads per key-value head."""
        return self.n_heads // self.n_kv_heads

    def __getitem__(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"{name!r} is not a tensor of this {self.family} weight space; it has {self.names}")

    def axis_size(self, axis: Axis) -> int:
        sizes = {
            "stream": self.d_model,
            "stream_gain": self.d_model,
            "head": self.n_heads,
            "kv_head": self.n_kv_heads,
            "qk": self.head_dim_qk,
            "qk*": self.head_dim_qk,
            "vo": self.head_dim_vo,
            "vo*": self.head_dim_vo,
            "mlp": self.mlp_width,
            "mlp~": self.mlp_width,
            "mlp~*": self.mlp_width,
        }
        return sizes[axis]

    def block_tensor(self, name: str) -> TensorSpec:
        """The spec of canonical block tensor ``name``; its shape follows from the axis sizes."""
        axes = BLOCK_AXES[name]
        shape = (self.n_blocks, *(self.axis_size(a) for a in axes))
        return TensorSpec(name=name, axes=axes, shape=shape, block=True, role=name)

    def with_tensors(self, tensors: tuple[TensorSpec, ...]) -> "WeightSpaceSpec":
        return replace(self, tensors=tensors)

    def describe_group(self) -> str:
        """A human-readable statement of the exact symmetry group of this architecture."""
        stream = "signed permutations" if self.stream_signs else "permutations"
        sign = "" if self.stream_signs else " times a global sign (LayerNorm is odd once its bias flips),"
        if self.n_kv_heads == self.n_heads:
            heads = f"S_{self.n_heads} on heads"
        else:
            heads = (
                f"S_{self.n_kv_heads} on key-value groups and S_{self.group_size} inside each group "
                f"({self.n_heads} query heads)"
            )
        qk = (
            f"(C^*)^{self.head_dim_qk // 2} per key-value head (scaled rotations of each rotary pair)"
            if self.rotary
            else f"GL({self.head_dim_qk}) per key-value head"
        )
        scale = {"none": "", "positive": " x positive per-unit scales", "nonzero": " x non-zero scales of the up projection"}
        lines = [
            f"{self.family}: {self.n_blocks} blocks, D={self.d_model}, {self.n_heads} heads "
            f"({self.n_kv_heads} key-value), d_k={self.head_dim_qk}, d_v={self.head_dim_vo}, MLP {self.mlp_width}"
            f"{' gated' if self.gated_mlp else ''}",
            f"  residual stream : {stream} of the {self.d_model} stream coordinates,{sign} shared by every block",
            f"  heads (per block): {heads}",
            f"  Q/K  (per block): {qk}",
            f"  V/O  (per block): GL({self.head_dim_vo}) per key-value head",
            f"  MLP  (per block): S_{self.mlp_width} on hidden units{scale[self.mlp_scale]}",
        ]
        return "\n".join(lines)
