"""`NFNOptimizer`: an equivariant learned optimizer for transformers, as a drop-in `torch.optim.Optimizer`.

Block weights (per-head Q/K/V/O, MLP, norms) get

    update = -lr * (base_direction + correction) - lr * weight_decay * W

- The base direction is one of two equivariant steps (``base_direction``):
  "adam": Adam made equivariant under orthogonal maps of a head (plain Adam is element-wise and only
  commutes with permutations and sign flips): the second moment is shared across each head's d_k (d_v)
  coordinates, and the result is whitened along the head dimension by the inverse square root of the head's
  gradient covariance (a d x d EMA, normalised to mean eigenvalue 1). Without the whitening the shared second
  moment lets a head's dominant direction take steps up to sqrt(d) times lr, and training is markedly worse
  than AdamW (final loss 0.50 vs 0.34 on a validation ViT at lr 3e-3); with it, on par.
  "muon": the block matrices (per-head Q/K/V/O, the MLP's) take Muon's direction instead, the first moment
  orthogonalised per matrix (`orthogonalized`); biases and norms keep equivariant Adam. A matrix function of
  the momentum, it commutes with the same group; on validation ViTs it reaches tuned AdamW's 1,000-step loss
  in ~550 steps where equivariant Adam takes ~800 (benchmarks/results/optimizer_validation.md). With
  ``nesterov`` (Muon's default) it orthogonalises the momentum one step ahead, beta1 m + (1 - beta1) g.
- ``correction`` comes from a Transformer-NFN reading (weights, gradient, momentum, base direction) of the
  whole model at once (the tensors outside the blocks with zero momentum and direction: their steps are the
  base optimizer's, and meta-training feeds the same); it is bounded (`bounded`) and scaled by
  per-tensor-type gains that start at 0, so an untrained `LearnedUpdate` is exactly the base step.
- The correction runs at full strength for H steps, then fades linearly to 0 at step 2H, leaving the base
  step; after 2H the NFN is not run at all. Meta-trained on short tasks, it speeds up early training but
  hurts late training (short-horizon bias), so the base step, H and the lr are chosen with the update on
  validation tasks and stored in its metadata (`LearnedUpdate.base_direction`, `horizon`, `recommended_lr`;
  benchmarks/optimizer.py).

Equivariance group (tested in float64): stream permutations, GQA-aware head permutations, orthogonal
maps per head on Q/K and V/O, MLP-unit permutations. Those are the symmetries under which gradients
move like weights; for them update(g.W, g.G) = g.update(W, G).

Everything outside the blocks (embeddings, final norm, task head, parameters no rule knows) goes to a
wrapped base optimizer (AdamW by default) that shares this optimizer's param groups, so LR schedulers,
`state_dict` and `zero_grad` cover both. Token-embedding tables can take their own lr ratio
(``embedding_lr_ratio``; the default update's, 0.1, was chosen on text validation tasks): at the shared lr, 1e-2,
AdamW moves them ten times faster than its tuned lr would.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings

import torch
from torch import nn

from . import checkpoints
from .extract import Binding, bind
from .nn.features import summarize_outer
from .nn.model import TransformerNFNEncoder
from .nn.normalize import normalize_scales
from .spec import BLOCK_AXES
from .weight_space import WeightSpace

logger = logging.getLogger(__name__)
HEAD_DIM_AXIS = {"q": -1, "k": -1, "v": -1, "o": -2, "q_bias": -1, "k_bias": -1, "v_bias": -1}
MATRICES = ("q", "k", "v", "o", "up", "gate", "down")  # a block's weight matrices (per head for q, k, v, o)
BASE_DIRECTIONS = ("adam", "muon")
# the shipped learned update to reach for (the demo's, the README's): one equivariant layer, meta-trained on ViTs and
# the paper's residual-free transformer on MNIST and BERTs on text; `vit-paper-1layer` (no text tasks, the default
# until 2026-11-28) and `vit-mnist` (two layers, ViTs only) ship as well
DEFAULT_LEARNED_UPDATE = "vit-paper-bert-1layer"
MUON_RMS = 0.2  # Muon's step is scaled to this RMS, a typical Adam step's, so that lrs carry over
HEAD_DAMPING = 1e-2  # added to a head's unit-mean covariance spectrum before the inverse square root
INPUTS = ("weight", "grad", "momentum", "base_direction")
Tensors = dict[str, torch.Tensor]


def bounded(xs: list[torch.Tensor], names: tuple[str, ...]) -> list[torch.Tensor]:
    """Squash to [-1, 1] per entry, equivariantly: element-wise tanh where only permutations act, and a radial
    tanh of each head-dimension vector for per-head tensors (its norm is invariant under orthogonal maps).
    Multi-tensor ops: the step's cost on small models is per-op overhead."""
    radial = [i for i, n in enumerate(names) if n in HEAD_DIM_AXIS]
    plain = [i for i in range(len(xs)) if i not in radial]
    out = dict(zip(plain, torch._foreach_tanh([xs[i] for i in plain])))
    norms = [(xs[i].square().sum(HEAD_DIM_AXIS[names[i]], keepdim=True) + 1e-12).sqrt() for i in radial]  # smooth
    factors = torch._foreach_div(torch._foreach_tanh(norms), norms)  # at 0, where x.norm's gradient is not
    out.update(zip(radial, torch._foreach_mul([xs[i] for i in radial], factors)))
    return [out[i] for i in range(len(xs))]


def head_pooled_square(name: str, g: torch.Tensor) -> torch.Tensor:
    """g^2, averaged over the head dimension for per-head tensors (invariant under orthogonal head maps)."""
    sq = g.square()
    return sq.mean(HEAD_DIM_AXIS[name], keepdim=True).expand_as(sq) if name in HEAD_DIM_AXIS else sq


def _head_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """A per-head tensor as [..., rows, d]: head dimension last, a bias as one row."""
    x = x.transpose(-1, -2) if HEAD_DIM_AXIS[name] == -2 else x
    return x.unsqueeze(-2) if name.endswith("_bias") else x


def _from_head_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    x = x.squeeze(-2) if name.endswith("_bias") else x
    return x.transpose(-1, -2) if HEAD_DIM_AXIS[name] == -2 else x


def head_covariance(name: str, g: torch.Tensor) -> torch.Tensor:
    """g^T g / rows along the head dimension: [..., d, d]; moves as R^T C R under an orthogonal head map R."""
    rows = _head_rows(name, g)
    return rows.transpose(-1, -2) @ rows / rows.shape[-2]


def head_inverse_sqrt(covs: Tensors) -> Tensors:
    """(cov / mean eigenvalue + HEAD_DAMPING)^(-1/2) of every head covariance [..., d, d] (a matrix function of
    cov, so it commutes with orthogonal head maps). Normalising to mean eigenvalue 1 makes whitening scale-free:
    it reshapes a step across the head's directions without changing its overall size; a zero covariance gives
    the identity. One batched eigendecomposition per head size: on small models per-call overhead dominates."""
    by_size: dict[int, list[str]] = {}
    for name, cov in covs.items():
        by_size.setdefault(cov.shape[-1], []).append(name)
    out = {}
    for d, names in by_size.items():
        c = torch.cat([covs[n].reshape(-1, d, d) for n in names]).double()
        mean = c.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
        eye = torch.eye(d, dtype=c.dtype, device=c.device)
        c = torch.where(mean > 0, c / torch.where(mean > 0, mean, 1.0), eye)
        evals, evecs = torch.linalg.eigh(c)
        inv_sqrt = (evecs * (evals.clamp_min(0) + HEAD_DAMPING).rsqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)
        inv_sqrt = torch.where(mean > 0, inv_sqrt, eye)
        pieces = inv_sqrt.split([math.prod(covs[n].shape[:-2]) for n in names])
        out.update({n: piece.reshape(covs[n].shape) for n, piece in zip(names, pieces)})
    return out


def whiten(name: str, x: torch.Tensor, inv_sqrt: torch.Tensor) -> torch.Tensor:
    """x @ inv_sqrt along the head dimension (inv_sqrt from `head_inverse_sqrt`)."""
    return _from_head_rows(name, _head_rows(name, x) @ inv_sqrt.to(x.dtype))


def orthogonalized(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's direction for a stack of matrices [..., m, n]: pushed towards the nearest semi-orthogonal matrix
    (Muon's quintic Newton-Schulz iteration; singular values end near 1), scaled to RMS ~MUON_RMS. An odd
    polynomial in x x^T times x after a norm-invariant scaling, so orthogonal maps of rows and columns commute
    with it."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = x.shape[-2] <= x.shape[-1]
    X = x if wide else x.transpose(-1, -2)  # iterate on the smaller Gram matrix
    X = X / (X.square().sum((-2, -1), keepdim=True).sqrt() + 1e-7)
    X = X.reshape(-1, *X.shape[-2:])  # baddbmm fuses each step's scalings and sums into its matmuls
    for _ in range(steps):
        gram = X @ X.transpose(-1, -2)
        X = torch.baddbmm(X, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    X = X.reshape(x.shape if wide else x.transpose(-1, -2).shape)
    X = X if wide else X.transpose(-1, -2)
    return X * (MUON_RMS * math.sqrt(max(x.shape[-2], x.shape[-1])))


def orthogonalized_all(xs: Tensors) -> Tensors:
    """`orthogonalized` of every tensor, one batched iteration per matrix shape up to transposition (q, k, v
    and o share one, the MLP's another): on small models the step's cost is per-op overhead."""
    def is_wide(x: torch.Tensor) -> bool:
        return x.shape[-2] <= x.shape[-1]

    def as_wide(x: torch.Tensor) -> torch.Tensor:
        return x if is_wide(x) else x.transpose(-1, -2)

    by_shape: dict[torch.Size, list[str]] = {}
    for name, x in xs.items():
        by_shape.setdefault(as_wide(x).shape[-2:], []).append(name)
    out = {}
    for shape, names in by_shape.items():
        flat = torch.cat([as_wide(xs[n]).reshape(-1, *shape) for n in names])
        pieces = orthogonalized(flat).split([math.prod(xs[n].shape[:-2]) for n in names])
        for name, piece in zip(names, pieces):
            x = xs[name]
            out[name] = piece.view(as_wide(x).shape) if is_wide(x) else piece.view(as_wide(x).shape).transpose(-1, -2)
    return out


def _check_base_direction(base_direction: str) -> str:
    if base_direction not in BASE_DIRECTIONS:
        raise ValueError(f"base_direction must be one of {BASE_DIRECTIONS}, got {base_direction!r}")
    return base_direction


class LearnedUpdate(checkpoints.Pretrained, nn.Module):
    """The learned part: an equivariant NFN from 4 channels (see INPUTS) to a bounded correction."""

    FORMAT = "nfn-plugins-learned-update/1"
    WHAT = "learned optimizer"

    def __init__(self, channels: int = 8, n_layers: int = 2, hidden: int = 16, product_channels: int = 2,
                 max_correction: float = 1.0):
        super().__init__()
        self.config = dict(channels=channels, n_layers=n_layers, hidden=hidden, product_channels=product_channels,
                           max_correction=max_correction)
        self.encoder = TransformerNFNEncoder(len(INPUTS), channels, n_layers, hidden, product_channels,
                                             final_activation=False, out_channels=1)
        self.gain = nn.Parameter(torch.zeros(len(BLOCK_AXES)))  # per block-tensor type; 0 = the base step alone
        self.max_correction = max_correction
        self.meta: dict = {}

    @property
    def horizon(self) -> float | None:
        """Steps of full-strength correction: the horizon validated for this update (metadata
        ``correction_horizon``), else its longest meta-training task; None if neither is recorded."""
        if "correction_horizon" in self.meta:
            return float(self.meta["correction_horizon"])
        steps = self.meta.get("meta_config", {}).get("task_steps")
        return int(steps[1]) if steps else None

    @property
    def base_direction(self) -> str:
        """The base step this update is validated with (metadata ``base_direction``), else the one it was
        meta-trained on ("adam" before the choice existed)."""
        return self.meta.get("base_direction", self.meta.get("meta_config", {}).get("base_direction", "adam"))

    @property
    def nesterov(self) -> bool:
        """Whether Muon's direction used Nesterov momentum when this update was validated (metadata
        ``nesterov``), else when it was meta-trained (False before the choice existed)."""
        return bool(self.meta.get("nesterov", self.meta.get("meta_config", {}).get("nesterov", False)))

    @property
    def embedding_lr_ratio(self) -> float:
        """The lr multiplier for token-embedding tables validated with this update (metadata
        ``embedding_lr_ratio``), else 1."""
        return float(self.meta.get("embedding_lr_ratio", 1.0))

    @property
    def recommended_lr(self) -> float:
        """The NFN optimizer's lr chosen for this update on validation tasks (metadata), else AdamW's default."""
        return float(self.meta.get("recommended_lr", 1e-3))

    def forward(self, inputs: WeightSpace) -> dict[str, torch.Tensor]:
        """inputs [1, 4] -> {block tensor: correction (unbatched)}, each entry bounded by max_correction."""
        x, _ = normalize_scales(summarize_outer(inputs))
        out = self.encoder(x, blocks_only=True)  # only block tensors get a correction
        gains = (torch.tanh(self.gain) * self.max_correction).unbind()
        names, scales = zip(*((n, gains[i]) for i, n in enumerate(BLOCK_AXES) if n in out))
        return dict(zip(names, torch._foreach_mul(bounded([out[n][0, 0] for n in names], names), scales)))


class NFNOptimizer(torch.optim.Optimizer):
    """Drop-in replacement for AdamW that needs the model (to know which tensors form each block).

    Args:
        model: the model (HF, torch, PEFT-, DDP- or accelerate-wrapped).
        lr, betas, eps, weight_decay: as in AdamW, for every parameter.
        learned: a `LearnedUpdate` (None: the base step only).
        correction_horizon: steps H of full learned correction; it then fades linearly to 0 at step 2H.
            None: ``learned.horizon`` (validated with the update, else its meta-training task length; never
            fades if unknown); ``math.inf``: never fade.
        base_direction: "adam" (equivariant Adam) or "muon" (orthogonalised momentum for the block matrices);
            None: ``learned.base_direction`` (the one validated with the update), else "adam".
        nesterov: Nesterov momentum for Muon's direction (no effect on the Adam base); None:
            ``learned.nesterov`` (the one validated with the update), else True (Muon's default).
        nonfinite: "skip" (warn and skip the whole step when any gradient is NaN/inf) or "raise".
        base_optimizer: class (or factory) for the parameters outside the blocks (AdamW by default); each of
            its param groups joins this optimizer's.
        base_kwargs: more arguments for it. ``lr`` and ``weight_decay`` here override the shared ones for those
            parameters; ``betas`` and ``eps`` default to this optimizer's, and ``foreach`` to True, where it takes
            them (one multi-tensor op per moment instead of one op per tensor, which torch leaves off on CPU; same
            arithmetic).
        embedding_lr_ratio: token-embedding tables (``nn.Embedding`` weights) step at the base optimizer's lr
            times this, in a param group of their own ("base_embeddings"; the base optimizer then receives two
            groups). None: ``learned.embedding_lr_ratio`` (validated with the update on text tasks), else 1.
        extra_axes: see `extract_weights`.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, learned: LearnedUpdate | None = None,
                 nonfinite: str = "skip", base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
                 base_kwargs: dict | None = None, extra_axes=None, correction_horizon: float | None = None,
                 base_direction: str | None = None, nesterov: bool | None = None,
                 embedding_lr_ratio: float | None = None):
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.binding: Binding = bind(model, extra_axes, strict=False)
        block = [h.param for h in self.binding.block_handles if h.param.requires_grad]
        if not block:
            raise ValueError("no trainable transformer block parameters found (are they frozen?)")
        ids = {id(p) for p in block}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        if base_direction is None:
            base_direction = learned.base_direction if learned is not None else "adam"
        if nesterov is None:
            nesterov = learned.nesterov if learned is not None else True
        if embedding_lr_ratio is None:
            embedding_lr_ratio = learned.embedding_lr_ratio if learned is not None else 1.0
        if not (math.isfinite(embedding_lr_ratio) and embedding_lr_ratio > 0):
            raise ValueError(f"embedding_lr_ratio must be a positive number, got {embedding_lr_ratio!r}")
        super().__init__([{"params": block, "name": "nfn_blocks"}],
                         dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              base_direction=_check_base_direction(base_direction), nesterov=bool(nesterov)))
        self.learned = learned
        self.embedding_lr_ratio = embedding_lr_ratio  # in effect only for a "base_embeddings" group
        horizon = correction_horizon if correction_horizon is not None else (learned.horizon if learned else None)
        if horizon is not None and not horizon > 0:
            raise ValueError(f"correction_horizon must be a positive number of steps (or math.inf), got {horizon!r}")
        self.correction_horizon = math.inf if horizon is None else horizon
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.base = None
        if others:
            base_kwargs = dict(base_kwargs or {})
            takes = inspect.signature(base_optimizer).parameters
            for key, value in (("foreach", True), ("betas", betas), ("eps", eps)):
                if key in takes:
                    base_kwargs.setdefault(key, value)
            base_kwargs = {"lr": lr, "weight_decay": weight_decay, **base_kwargs}
            tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
            params: list = others
            if embedding_lr_ratio != 1 and any(id(p) in tables for p in others):
                groups = [{"params": [p for p in others if id(p) not in tables]},
                          {"params": [p for p in others if id(p) in tables], "name": "base_embeddings",
                           "lr": base_kwargs["lr"] * embedding_lr_ratio}]
                params = [g for g in groups if g["params"]]
            self.base = base_optimizer(params, **base_kwargs)
            for i, base_group in enumerate(self.base.param_groups):  # a factory may make several groups
                base_group.setdefault("name", "base" if i == 0 else f"base_{i}")
                self.param_groups.append(base_group)  # shared: schedulers, zero_grad and state_dict see them all
        unmatched = ", ".join(h.name for h in self.binding.unmatched) or "none"
        embeddings = next((g for g in self.param_groups if g["name"] == "base_embeddings"), None)
        logger.info("NFNOptimizer: %d block tensors (%d weights) -> learned equivariant update; %d other tensors "
                    "(%d weights) -> %s%s; unrecognised parameters sent to the base optimizer: %s",
                    len(block), sum(p.numel() for p in block), len(others), sum(p.numel() for p in others),
                    getattr(base_optimizer, "__name__", repr(base_optimizer)),
                    f" ({len(embeddings['params'])} token-embedding tables at lr x{embedding_lr_ratio:g})"
                    if embeddings else "", unmatched)

    @classmethod
    def from_pretrained(cls, name: str, model: nn.Module, **kwargs) -> "NFNOptimizer":
        """An optimizer whose learned update ships with the package (or lives in directory ``name``); ``lr``
        defaults to the update's validated lr (`LearnedUpdate.recommended_lr`)."""
        learned = LearnedUpdate.from_pretrained(name)
        return cls(model, learned=learned, **{"lr": learned.recommended_lr, **kwargs})

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        if self.base is not None:
            sd["base_state"] = self.base.state_dict()["state"]
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_state", None)
        self.skipped_steps = state_dict.pop("skipped_steps", 0)
        super().load_state_dict(state_dict)
        self.param_groups[0].setdefault("base_direction", "adam")  # saved before these choices existed
        self.param_groups[0].setdefault("nesterov", False)
        if self.base is not None:
            if base_state is not None:
                self.base.load_state_dict({"state": base_state, "param_groups": self.base.state_dict()["param_groups"]})
            self.base.param_groups = self.param_groups[1:]  # re-share: torch rebuilt the group dicts

    # -- the step ------------------------------------------------------------------------------------
    def _check_finite(self) -> bool:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(type(p.grad).__name__ == "DTensor" for p in params[:1]):
            raise RuntimeError("NFNOptimizer needs whole block matrices, but the gradients are DTensor shards "
                               "(FSDP). Use DDP (or plain data parallelism); FSDP is not supported.")
        # one fused reduction and one sync: NaN/inf in any gradient makes its norm non-finite (a finite
        # gradient whose norm overflows is caught by the exact per-tensor check that follows)
        grads = [p.grad for p in params]
        if not grads:
            return True
        norms = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads)])
        if bool(norms.isfinite().all()) or all(bool(torch.isfinite(g).all()) for g in grads):
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError("non-finite gradient: NFNOptimizer refused to step (nonfinite='raise')")
        self.skipped_steps += 1
        warnings.warn(f"non-finite gradient: step skipped, weights unchanged ({self.skipped_steps} skipped so far)")
        return False

    @property
    def _head_cov_slots(self) -> list[tuple]:
        """(per-head tensor, block index, handle) of every head covariance the current base direction uses."""
        parts = whitened(self.param_groups[0]["base_direction"])
        return [(part, i, h) for bp in self.binding.block_params for part in bp.rule.parts if part in parts
                for i, h in enumerate(bp.handles)]

    def _head_covariances(self, slots: list[tuple]) -> Tensors:
        """The head covariances [L, H, d, d], stacked from the parameters' state (zeros for frozen ones)."""
        per_part: dict[str, list[torch.Tensor]] = {}
        for part, _, h in slots:
            st, key = self.state.get(h.param, {}), f"head_cov_{part}"  # .get: no state entry for a frozen parameter
            per_part.setdefault(part, []).append(st[key] if key in st else self._zero_head_covariance(part, h.param))
        return {part: torch.stack(cs) for part, cs in per_part.items()}

    def _zero_head_covariance(self, part: str, like: torch.Tensor) -> torch.Tensor:
        axes, spec = BLOCK_AXES[part], self.binding.spec
        d = spec.axis_size(axes[HEAD_DIM_AXIS[part]])
        return like.new_zeros(spec.axis_size(axes[0]), d, d)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._check_finite():
            return loss
        group = self.param_groups[0]
        b = self.binding
        active = {id(p) for p in group["params"]}
        for p in group["params"]:
            if not self.state[p]:
                self.state[p].update(step=torch.zeros((), dtype=torch.float64), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        slots = self._head_cov_slots
        for part, _, h in slots:
            if id(h.param) in active and f"head_cov_{part}" not in self.state[h.param]:
                self.state[h.param][f"head_cov_{part}"] = self._zero_head_covariance(part, h.param)
        torch._foreach_add_([self.state[p]["step"] for p in group["params"]], 1)

        def source(key: str):
            def read(h) -> torch.Tensor:
                if key == "grad":
                    return torch.zeros_like(h.param) if h.param.grad is None else h.param.grad.to(h.param.dtype)
                value = self.state.get(h.param, {}).get(key)  # .get: no state for a frozen parameter
                return torch.zeros_like(h.param) if value is None else value
            return read

        step = int(self.state[group["params"][0]]["step"])
        fade = min(1.0, max(0.0, 2.0 - step / self.correction_horizon))
        learned = self.learned if fade > 0 else None  # past 2H: the base step alone, the NFN is not run
        blocks_only = learned is None  # the NFN reads the whole model; the base step only the blocks
        weights, grads = b.read(None, blocks_only), b.read(source("grad"), blocks_only)
        exp_avg, exp_avg_sq = (b.read(source(key), blocks_only=True) for key in ("exp_avg", "exp_avg_sq"))
        *new, covs = block_update(learned, weights, grads, exp_avg, exp_avg_sq,
                                  self._head_covariances(slots), step, group["lr"], group["betas"], group["eps"],
                                  group["weight_decay"], fade, group["base_direction"], group["nesterov"])
        targets, values = [], []
        for key, tensors in zip(("weight", "exp_avg", "exp_avg_sq"), new):
            for handle, value in b.to_parameters(tensors, blocks_only=True):
                if id(handle.param) in active:
                    targets.append(handle.param if key == "weight" else self.state[handle.param][key])
                    values.append(value)
        for part, i, handle in slots:
            if id(handle.param) in active:
                targets.append(self.state[handle.param][f"head_cov_{part}"])
                values.append(covs[part][i])
        torch._foreach_copy_(targets, values)  # one fused op instead of one copy per tensor
        if self.base is not None:
            self.base.step()
        return loss


def muon_parts(base_direction: str) -> tuple[str, ...]:
    """The block tensors that take Muon's direction (none on the Adam base)."""
    return MATRICES if _check_base_direction(base_direction) == "muon" else ()


def whitened(base_direction: str) -> tuple[str, ...]:
    """The per-head tensors whose Adam direction is whitened (Muon's matrices need no whitening)."""
    return tuple(n for n in HEAD_DIM_AXIS if n not in muon_parts(base_direction))


def block_update(learned: LearnedUpdate | None, weights: WeightSpace | Tensors, grads: WeightSpace | Tensors,
                 exp_avg: WeightSpace | Tensors, exp_avg_sq: WeightSpace | Tensors, head_cov: Tensors, step: int,
                 lr: float, betas: tuple[float, float], eps: float, weight_decay: float, correction_scale: float = 1.0,
                 base_direction: str = "adam", nesterov: bool = False) -> tuple[Tensors, Tensors, Tensors, Tensors]:
    """One update of the block tensors in canonical layout: (new weights, first and second moments, head
    covariances).

    Pure and differentiable in ``learned``'s parameters: `NFNOptimizer.step` and meta-training share it.
    Only the block tensors are updated and only their moments are read (dicts of block tensors are enough);
    ``learned`` reads the whole model's weights and gradients (weight spaces), with zeros as the momentum and
    base direction of the tensors outside the blocks (the base optimizer's business). ``head_cov``
    maps each per-head tensor to its gradient covariance EMA [L, H, d, d] (missing: zeros, a first step).
    ``correction_scale`` multiplies the learned correction (the optimizer's fade); ``base_direction`` picks
    equivariant Adam or Muon for the block matrices (see the module docstring); ``nesterov``: Muon's Nesterov
    momentum (the Adam direction ignores it).
    """
    beta1, beta2 = betas
    names = [n for n in BLOCK_AXES if n in weights]
    g = [grads[n] for n in names]
    # Adam's moments and direction with fused multi-tensor ops (the same arithmetic as per tensor, far fewer
    # dispatches: on small models the optimizer step is dominated by per-op overhead). No autograd needed:
    # gradients and moments are data, only the new weights carry the learned correction's graph.
    sq = [head_pooled_square(n, x) for n, x in zip(names, g)]
    m_list = torch._foreach_add(torch._foreach_mul([exp_avg[n] for n in names], beta1),
                                torch._foreach_mul(g, 1 - beta1))
    v_list = torch._foreach_add(torch._foreach_mul([exp_avg_sq[n] for n in names], beta2),
                                torch._foreach_mul(sq, 1 - beta2))
    m, v = dict(zip(names, m_list)), dict(zip(names, v_list))
    muon = [n for n in names if n in muon_parts(base_direction)]
    adam = [n for n in names if n not in muon]  # Adam's direction only where it is used
    denom = torch._foreach_add(torch._foreach_sqrt(torch._foreach_div([v[n] for n in adam], 1 - beta2**step)), eps)
    direction = dict(zip(adam, torch._foreach_div(torch._foreach_div([m[n] for n in adam], 1 - beta1**step), denom)))
    cov = {}
    whitened_parts = whitened(base_direction)
    for n in (n for n in names if n in whitened_parts):  # no bias correction: whitening is scale-free
        new_cov = head_covariance(n, grads[n])
        cov[n] = new_cov * (1 - beta2) + (head_cov[n] * beta2 if n in head_cov else 0.0)
    for n, inv_sqrt in head_inverse_sqrt(cov).items():
        direction[n] = whiten(n, direction[n], inv_sqrt)
    # Nesterov: Muon orthogonalises beta1 * m + (1 - beta1) * g, the momentum one step ahead
    ahead = [m[n] for n in muon]
    if nesterov and muon:
        ahead = torch._foreach_lerp([grads[n] for n in muon], ahead, beta1)
    direction.update(orthogonalized_all(dict(zip(muon, ahead))))  # scale-free: no bias correction either
    if learned is not None:
        dtype = next(learned.parameters()).dtype
        outer_zeros = {n: torch.zeros_like(x) for n, x in weights.items() if n not in m}
        inputs = [weights, grads, *(WeightSpace(weights.spec, {**outer_zeros, **x}) for x in (m, direction))]
        with torch.inference_mode(not torch.is_grad_enabled()):  # in a plain step: less autograd bookkeeping
            stacked = WeightSpace.stack([x if x.dtype == dtype else x.to(dtype) for x in inputs])  # no copies if equal
            correction = learned(stacked.unsqueeze(0))
        corrections = [correction[n].to(direction[n].dtype) for n in names]
        direction = dict(zip(names, torch._foreach_add([direction[n] for n in names], corrections,
                                                       alpha=correction_scale)))
    current = [weights[n] for n in names]
    decayed = torch._foreach_mul(current, 1 - lr * weight_decay) if weight_decay else current
    new = dict(zip(names, torch._foreach_add(decayed, [direction[n] for n in names], alpha=-lr)))
    return new, m, v, cov
