"""`extract_weights` / `load_weights`: between a model's parameters and its canonical `WeightSpace`.

Both go through one `Binding` (which family, which parameter holds which canonical tensor), so the two
directions cannot drift apart. Conversions are only transposes, reshapes and splits: round trips are
bit-exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import families as _families
from .families import BlockRule, Family, mlp_scale, supported_families
from .params import ParamHandle, parameter_table, root_model
from .spec import BLOCK_AXES, REQUIRED_BLOCK_TENSORS, Axis, TensorSpec, WeightSpaceSpec
from .weight_space import WeightSpace

ExtraAxes = dict[str, tuple[str, tuple[Axis, ...]]]  # clean name -> (role, axes)


@dataclass
class _BlockParam:
    rule: BlockRule
    handles: list[ParamHandle]  # one per block


@dataclass
class Binding:
    spec: WeightSpaceSpec
    block_params: list[_BlockParam]
    outer: dict[str, ParamHandle]
    unmatched: list[ParamHandle] = field(default_factory=list)  # only with strict=False

    @property
    def block_handles(self) -> list[ParamHandle]:
        return [h for bp in self.block_params for h in bp.handles]

    # -- canonical <-> stored conversions -------------------------------------------------------
    def _part_width(self, name: str) -> int:
        """Width of canonical tensor ``name`` along the split axis of its stored (matrix or vector) form."""
        s = self.spec
        widths = {"q": s.n_heads * s.head_dim_qk, "k": s.n_kv_heads * s.head_dim_qk, "v": s.n_kv_heads * s.head_dim_vo}
        return widths[name.removesuffix("_bias")] if name.removesuffix("_bias") in widths else -1

    def _split(self, x: torch.Tensor, parts: tuple[str, ...]) -> list[torch.Tensor]:
        if len(parts) == 1:
            return [x]
        return list(torch.split(x, [self._part_width(p) for p in parts], dim=-1))

    def _to_canonical(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One part of the stacked stored parameters [L, matrix in right-multiplication form, or vector] ->
        canonical [L, ...]."""
        s, n_blocks = self.spec, x.shape[0]
        if name in ("q", "k", "v"):
            n = s.n_heads if name == "q" else s.n_kv_heads
            return x.reshape(n_blocks, x.shape[1], n, -1).transpose(1, 2)
        if name == "o":
            return x.reshape(n_blocks, s.n_heads, s.head_dim_vo, x.shape[-1])
        if name in ("q_bias", "k_bias", "v_bias"):
            return x.reshape(n_blocks, s.axis_size(BLOCK_AXES[name][0]), -1)
        return x

    def _from_canonical(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name in ("q", "k", "v"):
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
        if name in ("o", "q_bias", "k_bias", "v_bias"):
            return x.reshape(x.shape[0], -1, *x.shape[3:])
        return x

    @staticmethod
    def _as_matrix(layout: str, w: torch.Tensor) -> torch.Tensor:
        return w if layout in ("conv1d", "vector") else w.transpose(-1, -2)

    # -- the two directions ----------------------------------------------------------------------
    def read(self, source: Callable[[ParamHandle], torch.Tensor] | None = None,
             blocks_only: bool = False) -> WeightSpace | dict[str, torch.Tensor]:
        """The canonical weight space of the parameters, or of any per-parameter tensors ``source(handle)``
        in parameter layout (gradients, optimizer moments). Each kind of block parameter is converted once,
        stacked over the blocks: per-op overhead dominates on small models and grows with depth.
        Block tensors are fresh memory but may be strided views of it (copying them contiguous would cost a
        pass per tensor); ``blocks_only``: a dict of the block tensors alone (the outer ones, embeddings above
        all, can be most of a model's weights)."""
        source = source or ParamHandle.read
        tensors = {}
        for bp in self.block_params:
            stacked = self._as_matrix(bp.rule.layout, torch.stack([source(h) for h in bp.handles]))
            for part, x in zip(bp.rule.parts, self._split(stacked, bp.rule.parts)):
                x = self._to_canonical(part, x)  # the parts of one fused parameter get memory of their own
                tensors[part] = x.clone(memory_format=torch.contiguous_format) if len(bp.rule.parts) > 1 \
                    else x
        if blocks_only:
            return tensors
        tensors.update({name: source(h).clone() for name, h in self.outer.items()})
        return WeightSpace(self.spec, tensors)

    def to_parameters(self, ws: WeightSpace | dict[str, torch.Tensor],
                      blocks_only: bool = False) -> list[tuple[ParamHandle, torch.Tensor]]:
        """Canonical tensors back in parameter layout, one entry per parameter (the inverse of `read`).
        With ``blocks_only`` a dict of the block tensors is enough."""
        if isinstance(ws, WeightSpace) and ws.batch_shape:
            raise ValueError(f"expected one weight space, got batch shape {ws.batch_shape}; index it first")
        out: list[tuple[ParamHandle, torch.Tensor]] = []
        for bp in self.block_params:
            pieces = [self._from_canonical(p, ws[p]) for p in bp.rule.parts]
            stacked = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
            out += zip(bp.handles, self._as_matrix(bp.rule.layout, stacked).unbind(0))
        if not blocks_only:
            out += [(h, ws[name]) for name, h in self.outer.items()]
        return out

    def write(self, ws: WeightSpace, blocks_only: bool = False) -> None:
        """Write ``ws`` into the model's parameters (every one checked first); ``blocks_only``: leave the
        parameters outside the blocks as they are (they may then be frozen or adapter-wrapped)."""
        if ws.spec != self.spec:
            raise ValueError(_spec_difference(ws.spec, self.spec))
        planned = self.to_parameters(ws, blocks_only)
        for handle, value in planned:  # validate everything before writing anything
            if value.shape != handle.param.shape or value.dtype != handle.param.dtype:
                raise ValueError(
                    f"{handle.name} ({handle.module_type}): model has {tuple(handle.param.shape)} {handle.param.dtype}, "
                    f"weight space gives {tuple(value.shape)} {value.dtype}; convert with ws.to(dtype) first"
                )
            handle.check_writable()
        for handle, value in planned:
            handle.write(value.to(handle.param.device))


def _spec_difference(a: WeightSpaceSpec, b: WeightSpaceSpec) -> str:
    fields = [f for f in a.__dataclass_fields__ if getattr(a, f) != getattr(b, f) and f != "tensors"]
    detail = ", ".join(f"{f}: {getattr(a, f)} vs model {getattr(b, f)}" for f in fields)
    if not fields:
        sa, sb = {t.name: t.shape for t in a.tensors}, {t.name: t.shape for t in b.tensors}
        detail = ", ".join(f"{k}: {sa.get(k)} vs model {sb.get(k)}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k))
    return f"weight space does not fit this model ({detail})"


def _find_blocks(root: nn.Module, table: dict[str, ParamHandle]) -> tuple[Family, str, int]:
    lists = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for family in _families.FAMILIES:  # looked up now: families registered after import count too
        required = [r.path for r in family.block_rules if set(r.parts) & set(REQUIRED_BLOCK_TENSORS)]
        for name, mlist in lists:
            if re.fullmatch(family.block_list, name) and all(f"{name}.0.{p}" in table for p in required):
                return family, name, len(mlist)
    found = ", ".join(f"{n} ({type(m[0]).__name__} x{len(m)})" for n, m in lists) or "no nn.ModuleList at all"
    raise ValueError(
        f"{type(root).__name__}: no supported stack of transformer blocks found (module lists: {found}). "
        f"Supported families: {supported_families()}"
    )


def bind(model: nn.Module, extra_axes: ExtraAxes | None = None, strict: bool = True) -> Binding:
    """Work out which parameter of ``model`` holds which canonical tensor, and the weight-space spec.

    ``strict=False``: parameters outside the blocks that no rule knows are listed in ``Binding.unmatched``
    instead of raising (an optimizer can hand them to a plain optimizer)."""
    root = root_model(model)
    table = parameter_table(model)
    family, list_name, n_blocks = _find_blocks(root, table)
    block0 = getattr(root.get_submodule(list_name), "0")
    dims = family.dims(root, block0)

    block_params: list[_BlockParam] = []
    used: set[str] = set()
    for rule in family.block_rules:
        names = [f"{list_name}.{i}.{rule.path}" for i in range(n_blocks)]
        present = [n in table for n in names]
        if not any(present):
            continue
        if not all(present):
            missing = [n for n, p in zip(names, present) if not p]
            raise ValueError(f"{family.name}: blocks differ, {missing[0]} is missing while block 0 has it")
        block_params.append(_BlockParam(rule, [table[n] for n in names]))
        used.update(names)

    stray = [n for n in table if n.startswith(f"{list_name}.") and n not in used]
    if stray:
        h = table[stray[0]]
        raise ValueError(
            f"{h.name} in {h.module_path} ({h.module_type}) is not part of the {family.name} block layout "
            f"({', '.join(family.block_rule_paths())}); blocks with extra parameters (e.g. per-head q/k norms) "
            f"are not supported. Supported families: {supported_families()}"
        )

    first = {bp.rule.parts[0]: bp for bp in block_params}
    q_matrix = Binding._as_matrix(first["q"].rule.layout, first["q"].handles[0].param)
    d_model = q_matrix.shape[0]
    up = first["up"]
    mlp_width = Binding._as_matrix(up.rule.layout, up.handles[0].param).shape[-1]
    spec = WeightSpaceSpec(
        family=family.name,
        n_blocks=n_blocks,
        d_model=d_model,
        n_heads=dims.n_heads,
        n_kv_heads=dims.n_kv_heads,
        head_dim_qk=dims.head_dim,
        head_dim_vo=dims.head_dim,
        mlp_width=mlp_width,
        gated_mlp="gate" in first,
        mlp_scale=mlp_scale(dims.mlp_act, "gate" in first),
        rotary=dims.rotary,
        stream_signs=dims.rms_norm,
    )
    block_names = [n for n in BLOCK_AXES if any(n in bp.rule.parts for bp in block_params)]
    tensors = [spec.block_tensor(n) for n in block_names]

    outer: dict[str, ParamHandle] = {}
    unmatched: list[ParamHandle] = []
    extra_axes = extra_axes or {}
    for name, handle in table.items():
        if name in used:
            continue
        if name in extra_axes:
            role, axes = extra_axes[name]
        else:
            rule = next((r for r in family.outer_rules if re.fullmatch(r.pattern, name)), None)
            if rule is None and not strict:
                unmatched.append(handle)
                continue
            if rule is None:
                raise ValueError(
                    f"{name} in {handle.module_path} ({handle.module_type}) is outside the {family.name} blocks and "
                    f"not a known part (embeddings, norms, pooler, classifier or LM head). Pass "
                    f"extra_axes={{'{name}': (role, axes)}} with role in embed/readout/vector/free and "
                    "'stream' on the axis that reads or writes the residual stream. "
                    f"Supported families: {supported_families()}"
                )
            role, axes = rule.role, rule.axes
        shape = tuple(handle.param.shape)
        axes = axes if axes is not None else (None,) * len(shape)
        if len(axes) != len(shape) or any(a in ("stream", "stream_gain") and n != d_model for a, n in zip(axes, shape)):
            raise ValueError(f"{name}: axes {axes} do not fit its shape {shape} (stream width {d_model})")
        tensors.append(TensorSpec(name=name, axes=tuple(axes), shape=shape, block=False, role=role))
        outer[name] = handle
    _check_block_shapes(spec, block_params)
    return Binding(spec.with_tensors(tuple(tensors)), block_params, outer, unmatched)


def _check_block_shapes(spec: WeightSpaceSpec, block_params: list[_BlockParam]) -> None:
    for bp in block_params:
        for h in bp.handles:
            m = Binding._as_matrix(bp.rule.layout, h.param)
            widths = {"q": spec.n_heads * spec.head_dim_qk, "k": spec.n_kv_heads * spec.head_dim_qk}
            expected = sum(widths.get(p.removesuffix("_bias"), 0) for p in bp.rule.parts)
            if expected and len(bp.rule.parts) == 1 and m.shape[-1] != expected:
                raise ValueError(
                    f"{h.name} ({h.module_type}) has shape {tuple(h.param.shape)}, which does not fit "
                    f"{spec.n_heads} heads x head_dim {spec.head_dim_qk} ({spec.n_kv_heads} key-value heads)"
                )


def extract_weights(model: nn.Module, extra_axes: ExtraAxes | None = None) -> WeightSpace:
    """The model's weights as a `WeightSpace` (copies; no batch dims)."""
    return bind(model, extra_axes).read()


def load_weights(model: nn.Module, ws: WeightSpace, extra_axes: ExtraAxes | None = None) -> None:
    """Write ``ws`` into ``model`` in place. Every shape and dtype is checked before anything is written."""
    bind(model, extra_axes).write(ws)
