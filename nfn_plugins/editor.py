"""`WeightEditor`: an equivariant map from a transformer's weights to a bounded edit of its block weights.

The edit is ``W + delta(W)`` where ``delta`` is a Transformer-NFN encoder's output (block tensors only),
rescaled to each tensor's magnitude and bounded. Uses: train an editor to move models towards lower loss
(or any target), then apply it to new models in place or as a LoRA adapter that can be switched off.

Symmetry: ``delta(g.W) = g.delta(W)`` for stream permutations, GQA-aware head permutations, per-head GL maps
on Q/K and on V/O and MLP-unit permutations (the group the NFN layers build in). Under this group, symmetric
copies of a model are edited into symmetric copies: the edited models compute the same function. MLP-unit
scalings and the stream sign flips of RMSNorm models are symmetries of the model that the edit does not respect.

Only the block tensors (q, k, v, o, the MLP matrices, their biases and the block norms) are edited: the
encoder summarises embeddings, task heads and outer norms, so it has no per-entry output for them.

Bound (per block, per head for Q/K/V/O): each delta changes what its tensor computes for unit-RMS inputs
by less than ``max_rel`` times what the tensor computes, in norms the group leaves unchanged:

- q, k: ||dq_h k_h^T||_F and (summed over a key-value group) ||q_h dk^T||_F against ||q_h k_h^T||_F;
  v, o: ||dv o_h||_F, ||v do_h||_F against ||v o_h||_F (the only GL-invariant magnitudes of one factor);
- q/k/v biases: ||db k^T||, ||q db^T||, ||db o|| against the same products; o_bias against sqrt(sum_h ||v o_h||^2);
- MLP matrices and norm gains: ||dW||_F < max_rel ||W||_F; MLP biases against their matrix (||W||_F,
  the typical pre-activation size), norm biases against the norm's gain.

Usage::

    editor = WeightEditor()  # the identity edit until trained: the per-tensor gains start at 0
    opt = torch.optim.Adam(editor.parameters(), lr=1e-2)
    model.requires_grad_(False)  # only the editor learns
    for batch in batches:  # a loss of the edited model; the model itself is not modified
        loss = torch.func.functional_call(model, editor.edited_parameters(model), kwargs=batch).loss
        opt.zero_grad(); loss.backward(); opt.step()
    delta = editor.edit(model)  # in place; returns the delta (a WeightSpace)
    peft_model = editor.as_peft_adapter(model)  # or as a LoRA adapter: train with targets=MATRICES for this
    editor.save_pretrained("my-editor"); editor = WeightEditor.from_pretrained("my-editor")
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import checkpoints
from .extract import Binding, ExtraAxes, bind
from .integrations.peft import tuner_kind
from .params import root_model
from .nn.features import expand_kv, group_mean, product_sq_norm, summarize_outer
from .nn.model import TransformerNFNEncoder
from .nn.normalize import SCALE_SLOTS, normalize_scales
from .spec import BLOCK_AXES, REQUIRED_BLOCK_TENSORS
from .weight_space import WeightSpace

if TYPE_CHECKING:
    from peft import PeftModel

MATRICES = ("q", "k", "v", "o", "up", "gate", "down")  # the block tensors a LoRA adapter can hold
TINY = 1e-30  # keeps the bound smooth and finite at zero deltas and degenerate (all-zero) weights

# Tensors bounded by the Frobenius norm of a tensor of the same block: name -> reference tensor.
FROBENIUS_REFERENCE = {
    "up": "up", "gate": "gate", "down": "down", "up_bias": "up", "gate_bias": "gate", "down_bias": "down",
    "norm1_weight": "norm1_weight", "norm1_bias": "norm1_weight",
    "norm2_weight": "norm2_weight", "norm2_bias": "norm2_weight",
}  # fmt: skip

SqMeasure = Callable[[torch.Tensor], torch.Tensor]


def _sq_frobenius(x: torch.Tensor) -> torch.Tensor:
    """Per block: x [B, C, L, ...] -> [B, C, L]."""
    return x.double().square().flatten(3).sum(-1)


def _sq_measures(ws: WeightSpace) -> dict[str, tuple[SqMeasure, torch.Tensor]]:
    """Per block tensor: (squared invariant size of a delta, squared reference size) as in the module docstring.

    Products of per-head factors are never formed (`product_sq_norm`: d x d Gram traces in float64).
    """
    g = ws.spec.group_size
    per_kv = lambda x: group_mean(x, g) * g  # noqa: E731  per query head -> summed over each key-value group
    q, o = ws["q"], ws["o"]
    k_t, v = expand_kv(ws["k"], g).transpose(-1, -2), expand_kv(ws["v"], g)  # per query head
    ref_q, ref_o = product_sq_norm(q, k_t), product_sq_norm(v, o)  # ||q_h k_h^T||^2, ||v_h o_h||^2
    out: dict[str, tuple[SqMeasure, torch.Tensor]] = {
        "q": (lambda d: product_sq_norm(d, k_t), ref_q),
        "k": (lambda d: per_kv(product_sq_norm(q, expand_kv(d, g).transpose(-1, -2))), per_kv(ref_q)),
        "v": (lambda d: per_kv(product_sq_norm(expand_kv(d, g), o)), per_kv(ref_o)),
        "o": (lambda d: product_sq_norm(v, d), ref_o),
        "q_bias": (lambda d: product_sq_norm(d.unsqueeze(-2), k_t), ref_q),
        "k_bias": (lambda d: per_kv(product_sq_norm(q, expand_kv(d, g).unsqueeze(-1))), per_kv(ref_q)),
        "v_bias": (lambda d: per_kv(product_sq_norm(expand_kv(d, g).unsqueeze(-2), o)), per_kv(ref_o)),
        "o_bias": (_sq_frobenius, ref_o.sum(-1)),
    }
    for name, ref in FROBENIUS_REFERENCE.items():
        if ref in ws:
            out[name] = (_sq_frobenius, _sq_frobenius(ws[ref]))
    return out


def _bounded(x: torch.Tensor, sq_measure: torch.Tensor, sq_ref: torch.Tensor, limit: float) -> torch.Tensor:
    """x rescaled so that its measure m becomes limit * ref * tanh(m / (limit * ref)) < limit * ref.

    The factor tanh(z)/z is an invariant scalar per block (or head), so the bound keeps equivariance, and it is
    ~1 for small deltas: those pass unchanged."""
    z = (sq_measure + TINY).sqrt() / (limit * sq_ref.sqrt() + TINY)
    factor = (torch.tanh(z) / z).to(x.dtype)
    return x * factor.reshape(factor.shape + (1,) * (x.dim() - factor.dim()))


class WeightEditor(checkpoints.Pretrained, nn.Module):
    """Weights -> a symmetry-consistent, bounded delta of the block weights (see the module docstring).

    ``max_rel``: the bound on each delta relative to its tensor. ``targets``: the block tensors to edit (all by
    default; `MATRICES` for deltas a LoRA adapter can express); the others get zero deltas. The per-tensor gains
    start at 0, so a fresh editor is the identity edit; the gain tanh(g) in (-1, 1) keeps the bound.
    """

    FORMAT = "nfn-plugins-weight-editor/1"
    WHAT = "weight editor"

    def __init__(self, channels: int = 8, n_layers: int = 2, hidden: int = 16, product_channels: int = 2,
                 max_rel: float = 0.1, targets: Sequence[str] | None = None):
        super().__init__()
        targets = tuple(BLOCK_AXES) if targets is None else tuple(targets)
        unknown = sorted(set(targets) - set(BLOCK_AXES))
        if not targets:
            raise ValueError(f"targets is empty: give some of the block tensors {tuple(BLOCK_AXES)} (None: all)")
        if unknown:
            raise ValueError(f"targets must be block tensors {tuple(BLOCK_AXES)}; unknown: {unknown}")
        if not max_rel > 0:
            raise ValueError(f"max_rel must be positive, got {max_rel}")
        self.config = dict(channels=channels, n_layers=n_layers, hidden=hidden, product_channels=product_channels,
                           max_rel=max_rel, targets=list(targets))
        self.encoder = TransformerNFNEncoder(1, channels, n_layers, hidden, product_channels,
                                             final_activation=False, out_channels=1)
        self.gain = nn.Parameter(torch.zeros(len(BLOCK_AXES)))  # per block-tensor type, indexed like BLOCK_AXES
        self.max_rel = max_rel
        self.targets = targets
        self.meta: dict = {}

    def forward(self, ws: WeightSpace) -> WeightSpace:
        """ws (unbatched or batch [B]) -> delta with the same spec and batch shape: zeros outside the targets."""
        missing = [n for n in REQUIRED_BLOCK_TENSORS if n not in ws]
        if missing or len(ws.batch_shape) > 1:
            raise ValueError(f"expected the weight space of one model (unbatched) or of a batch [B] with the block "
                             f"tensors {REQUIRED_BLOCK_TENSORS}; got batch shape {ws.batch_shape}, missing {missing}")
        x = ws.to(self.gain.device, self.gain.dtype).as_features()  # [B, 1]; unbatched -> [1, 1]
        normalized, log_scales = normalize_scales(summarize_outer(x))
        out = self.encoder(normalized)
        measures = _sq_measures(x)
        gains = torch.tanh(self.gain)
        delta = {}
        for t in ws.spec.tensors:
            if t.block and t.name in self.targets:
                scale = log_scales[..., SCALE_SLOTS.index(t.name)].exp()  # back to the tensor's units
                raw = out[t.name] * scale.reshape(scale.shape + (1,) * t.ndim)
                sq_measure, sq_ref = measures[t.name]
                d = gains[list(BLOCK_AXES).index(t.name)] * _bounded(raw, sq_measure(raw), sq_ref, self.max_rel)
            else:
                d = torch.zeros_like(x[t.name])
            delta[t.name] = d[:, 0].reshape(ws[t.name].shape).to(ws[t.name])  # its dtype and device
        return WeightSpace(ws.spec, delta)

    # -- applying edits to models ------------------------------------------------------------------
    def edited_parameters(self, model: nn.Module, extra_axes: ExtraAxes | None = None) -> dict[str, torch.Tensor]:
        """See the module function `edited_parameters` (which also takes a DDP-wrapped editor)."""
        return edited_parameters(self, model, extra_axes)

    @torch.no_grad()
    def edit(self, model: nn.Module, extra_axes: ExtraAxes | None = None) -> WeightSpace:
        """Add the delta to the model's block weights in place; returns the delta (canonical layout).
        For an edit that can be switched off, use `as_peft_adapter`."""
        binding = bind(model, extra_axes)
        ws = binding.read()
        delta = self(ws)
        binding.write(ws + delta, blocks_only=True)
        return delta

    def as_peft_adapter(self, model: nn.Module, adapter_name: str = "nfn_edit", rank: int | None = None,
                        extra_axes: ExtraAxes | None = None) -> "PeftModel":
        """A ``peft.PeftModel`` whose LoRA adapter ``adapter_name`` holds the delta of every edited block matrix.

        ``rank=None``: exact (each delta is factored by its SVD at full rank). An int: truncated SVD, an
        approximation; the largest relative (Frobenius) truncation error is reported as a warning. lora_alpha =
        r, so the LoRA scaling is 1. The model's linear layers are wrapped in place (as by ``get_peft_model``).
        Given a ``PeftModel``, the delta is computed from its base weights (adapters disabled) and added as a new
        adapter, which becomes the active one. Only deltas of separate ``nn.Linear`` matrices are supported: bias
        and norm deltas (build the editor with ``targets=MATRICES``) and fused layouts (GPT-2's Conv1D, torch's
        in_proj) are refused.
        """
        from peft import LoraConfig, PeftModel, get_peft_model

        if rank is not None and rank < 1:
            raise ValueError(f"rank must be a positive int or None (exact), got {rank}")
        existing = model if isinstance(model, PeftModel) else None
        with existing.disable_adapter() if existing is not None else nullcontext(), torch.no_grad():
            binding = bind(model, extra_axes)
            delta = self(binding.read())
        deltas = _lora_deltas(binding, delta)
        r = rank or max(min(d.shape) for d in deltas.values())
        config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(deltas), lora_dropout=0.0)
        if existing is not None:
            existing.add_adapter(adapter_name, config)
            existing.set_adapter(adapter_name)
            peft_model = existing
        else:
            peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        errors = {}
        with torch.no_grad():
            for path, d in deltas.items():
                layer = peft_model.get_base_model().get_submodule(path)
                a, b, errors[path] = _lora_factors(d, r)
                layer.lora_A[adapter_name].weight.copy_(a)
                layer.lora_B[adapter_name].weight.copy_(b)
        worst = max(errors, key=errors.get)
        if rank is not None and errors[worst] > 0:
            warnings.warn(f"rank {rank} LoRA adapter approximates the edit: largest relative truncation error "
                          f"{errors[worst]:.3g} (in {worst}); use rank=None for an exact adapter", stacklevel=2)
        return peft_model


def edited_parameters(editor: nn.Module, model: nn.Module, extra_axes: ExtraAxes | None = None) -> dict[str, torch.Tensor]:
    """The edited block parameters of a plain ``model``, by its parameter names, differentiable in the editor's
    parameters: train with ``torch.func.functional_call(model, params, ...)``, the model frozen
    (``requires_grad_(False)``) so that only the editor collects gradients.

    ``editor``: a `WeightEditor`, or one wrapped by DDP / ``accelerator.prepare`` (its forward runs, so the
    wrapper averages the editor's gradients across processes; create the Accelerator with
    ``DistributedDataParallelKwargs(static_graph=True)``: a family without, e.g., gate tensors leaves some of
    the editor's parameters unused, and DDP's search for them cannot see into the WeightSpace it returns).
    Wrapped or adapter-holding *models* are refused: the names are the plain model's. ``extra_axes``: as
    for `extract_weights`.
    """
    if root_model(model) is not model or any(tuner_kind(m) for m in model.modules()):
        raise ValueError("edited_parameters needs the plain model (no DDP/compile/PEFT wrapper, no adapter "
                         "layers): its names are the plain model's, for functional_call on that model")
    binding = bind(model, extra_axes)
    ws = binding.read()
    delta = editor(ws)
    edited = {n: ws[n] + delta[n] for n in ws if ws.spec[n].block}
    return {h.name: value for h, value in binding.to_parameters(edited, blocks_only=True)}


def _lora_deltas(binding: Binding, delta: WeightSpace) -> dict[str, torch.Tensor]:
    """Per nn.Linear module path: its weight's delta [out, in]. Refuses deltas LoRA cannot hold."""
    block = [n for n in delta if delta.spec[n].block and bool(delta[n].ne(0).any())]
    vectors = [n for n in block if n not in MATRICES]
    if vectors:
        raise ValueError(f"LoRA adapters hold matrix deltas only, but this edit changes {vectors}; build the editor "
                         f"with targets=MATRICES {MATRICES} or apply it in place with edit()")
    fused = sorted({f"{bp.rule.path} ({bp.rule.layout})" for bp in binding.block_params
                    if bp.rule.layout != "linear" and set(bp.rule.parts) & set(block)})
    if fused:
        raise ValueError(f"{binding.spec.family}: {fused} are not separate nn.Linear matrices; as_peft_adapter "
                         "supports families with one nn.Linear per matrix (bert, vit, llama); use edit() instead")
    if not block:
        raise ValueError("the edit is zero (an untrained editor, or none of its targets are in this model): "
                         "there is nothing to put in an adapter")
    params = binding.to_parameters({n: delta[n] for n in delta if delta.spec[n].block}, blocks_only=True)
    return {h.module_path: value for h, value in params if bool(value.ne(0).any())}


def _lora_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [rank, in], B [out, rank], relative truncation error) with B A = delta's best rank-``rank``
    approximation; zero-padded when delta's rank is lower."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = delta.new_zeros(rank, delta.shape[1])
    b = delta.new_zeros(delta.shape[0], rank)
    a[:k] = (root[:, None] * vh[:k]).to(delta.dtype)
    b[:, :k] = (u[:, :k] * root).to(delta.dtype)
    error = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt().clamp_min(1e-300))
    return a, b, error
