"""`WeightSpace`: the batched container of one architecture's weights, a pytree for `torch.func`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils import _pytree as pytree

from .spec import WeightSpaceSpec


class WeightSpace:
    """Tensors of one architecture in canonical layout, keyed by name, with any leading batch dims.

    A tensor's trailing dims are given by its ``TensorSpec.shape``; whatever precedes them is batch
    (for NFN layers: ``[batch, channels]``). ``extract_weights`` returns a WeightSpace with no batch dims.
    """

    def __init__(self, spec: WeightSpaceSpec, tensors: dict[str, torch.Tensor]):
        if len(tensors) != len(spec.tensors) or not all(t.name in tensors for t in spec.tensors):
            missing, extra = set(spec.names) - set(tensors), set(tensors) - set(spec.names)
            raise ValueError(f"tensors do not match the spec: missing {sorted(missing)}, unexpected {sorted(extra)}")
        batch_shape = None
        for t in spec.tensors:  # runs on every NFN layer output: kept to plain tuple comparisons
            shape = tensors[t.name].shape
            n_batch = len(shape) - len(t.shape)
            if n_batch < 0 or shape[n_batch:] != t.shape:
                raise ValueError(f"tensor {t.name!r} has shape {tuple(shape)}; its trailing dims must be {t.shape}")
            if batch_shape is None:
                batch_shape = shape[:n_batch]
            elif shape[:n_batch] != batch_shape:
                raise ValueError(f"tensor {t.name!r} has batch shape {tuple(shape[:n_batch])}, "
                                 f"others have {tuple(batch_shape)}")
        self.spec = spec
        self.tensors = {name: tensors[name] for name in spec.names}

    @property
    def batch_shape(self) -> tuple[int, ...]:
        first = self.spec.tensors[0]
        x = self.tensors[first.name]
        return tuple(x.shape[: x.dim() - first.ndim]) if isinstance(x, torch.Tensor) else ()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def items(self):
        return self.tensors.items()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())
        return f"WeightSpace({self.spec.family}, batch={self.batch_shape}, {shapes})"

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "WeightSpace":
        return WeightSpace(self.spec, {k: fn(v) for k, v in self.tensors.items()})

    def zip_map(self, other: "WeightSpace", fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> "WeightSpace":
        if other.spec != self.spec:
            raise ValueError("weight spaces of different architectures cannot be combined")
        return WeightSpace(self.spec, {k: fn(v, other[k]) for k, v in self.tensors.items()})

    def to(self, *args, **kwargs) -> "WeightSpace":
        return self.map(lambda x: x.to(*args, **kwargs))

    def double(self) -> "WeightSpace":
        return self.to(torch.float64)

    def float(self) -> "WeightSpace":
        return self.to(torch.float32)

    def detach(self) -> "WeightSpace":
        return self.map(torch.Tensor.detach)

    def unsqueeze(self, dim: int = 0) -> "WeightSpace":
        """Add a batch dim at position ``dim`` (counted among the batch dims)."""
        if not -len(self.batch_shape) - 1 <= dim <= len(self.batch_shape):
            raise IndexError(f"batch dim {dim} out of range for batch shape {self.batch_shape}")
        d = dim if dim >= 0 else len(self.batch_shape) + 1 + dim
        return self.map(lambda x: x.unsqueeze(d))

    def as_features(self) -> "WeightSpace":
        """Shape ``[batch, channels]`` as NFN layers expect: () -> (1, 1), (B,) -> (B, 1)."""
        ws = self
        while len(ws.batch_shape) < 2:
            ws = ws.unsqueeze(-1) if ws.batch_shape else ws.unsqueeze(0)
        if len(ws.batch_shape) != 2:
            raise ValueError(f"expected at most 2 batch dims, got batch shape {self.batch_shape}")
        return ws

    @staticmethod
    def stack(spaces: Sequence["WeightSpace"], dim: int = 0) -> "WeightSpace":
        """Stack along a new batch dim ``dim`` (counted among the batch dims, like `unsqueeze`)."""
        if not spaces:
            raise ValueError("cannot stack an empty list of weight spaces")
        spec = spaces[0].spec
        for i, ws in enumerate(spaces):
            if ws.spec != spec:
                raise ValueError(
                    f"weight space {i} is a different architecture ({ws.spec.family}, D={ws.spec.d_model}) "
                    f"from weight space 0 ({spec.family}, D={spec.d_model}); only equal architectures stack"
                )
        n_batch = len(spaces[0].batch_shape)
        if not -n_batch - 1 <= dim <= n_batch:
            raise IndexError(f"batch dim {dim} out of range for batch shape {spaces[0].batch_shape}")
        d = dim if dim >= 0 else n_batch + 1 + dim
        return WeightSpace(spec, {k: torch.stack([ws[k] for ws in spaces], d) for k in spec.names})

    def __add__(self, other: "WeightSpace") -> "WeightSpace":
        return self.zip_map(other, torch.add)

    def __sub__(self, other: "WeightSpace") -> "WeightSpace":
        return self.zip_map(other, torch.sub)

    def __mul__(self, c: float) -> "WeightSpace":
        return self.map(lambda x: x * c)

    __rmul__ = __mul__

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def numel(self) -> int:
        return sum(v.numel() for v in self.tensors.values())


def _flatten(ws: WeightSpace):
    return list(ws.tensors.values()), ws.spec


def _unflatten(values, spec: WeightSpaceSpec) -> WeightSpace:
    """No validation: torch.func unflattens trees of non-tensors (e.g. vmap's in_dims) through here."""
    ws = WeightSpace.__new__(WeightSpace)
    ws.spec, ws.tensors = spec, dict(zip(spec.names, values))
    return ws


pytree.register_pytree_node(
    WeightSpace,
    _flatten,
    _unflatten,
    serialized_type_name="nfn_plugins.WeightSpace",
    flatten_with_keys_fn=lambda ws: ([(pytree.MappingKey(k), v) for k, v in ws.tensors.items()], ws.spec),
)
