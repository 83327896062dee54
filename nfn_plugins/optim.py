"""`NFNOptimizer`: an equivariant learned optimizer for transformers, as a drop-in `torch.optim.Optimizer`.

Block weights (per-head Q/K/V/O, MLP, norms) get

    update = -lr * (adam_direction + correction) - lr * weight_decay * W

- ``adam_direction`` is Adam with the second moment shared across each head's d_k (d_v) coordinates,
  so that it commutes with orthogonal maps of a head (plain Adam is element-wise and only commutes with
  permutations and sign flips).
- ``correction`` comes from a Transformer-NFN reading (weights, gradient, momentum, Adam direction) of the
  whole model at once; it is bounded (`bounded`) and scaled by per-tensor-type gains that start at 0, so an
  untrained `LearnedUpdate` is exactly the equivariant Adam above.

Equivariance group (tested in float64): stream permutations, GQA-aware head permutations, orthogonal
maps per head on Q/K and V/O, MLP-unit permutations. Those are the symmetries under which gradients
move like weights; for them update(g.W, g.G) = g.update(W, G).

Everything outside the blocks (embeddings, final norm, task head, parameters no rule knows) goes to a
wrapped base optimizer (AdamW by default) that shares this optimizer's param group, so LR schedulers,
`state_dict` and `zero_grad` cover both.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .extract import Binding, bind
from .nn.features import summarize_outer
from .nn.model import TransformerNFNEncoder
from .nn.normalize import normalize_scales
from .spec import BLOCK_AXES
from .weight_space import WeightSpace

logger = logging.getLogger(__name__)
FORMAT = "nfn-plugins-learned-update/1"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
HEAD_DIM_AXIS = {"q": -1, "k": -1, "v": -1, "o": -2, "q_bias": -1, "k_bias": -1, "v_bias": -1}
INPUTS = ("weight", "grad", "momentum", "adam_direction")


def bounded(name: str, x: torch.Tensor) -> torch.Tensor:
    """Squash to [-1, 1] per entry, equivariantly: element-wise tanh where only permutations act, and a radial
    tanh of each head-dimension vector for per-head tensors (its norm is invariant under orthogonal maps)."""
    if name not in HEAD_DIM_AXIS:
        return torch.tanh(x)
    norm = x.norm(dim=HEAD_DIM_AXIS[name], keepdim=True)
    return x * (torch.tanh(norm) / norm.clamp_min(1e-12))


def head_pooled_square(name: str, g: torch.Tensor) -> torch.Tensor:
    """g^2, averaged over the head dimension for per-head tensors (invariant under orthogonal head maps)."""
    sq = g.square()
    return sq.mean(HEAD_DIM_AXIS[name], keepdim=True).expand_as(sq) if name in HEAD_DIM_AXIS else sq


class LearnedUpdate(nn.Module):
    """The learned part: an equivariant NFN from 4 channels (see INPUTS) to a bounded correction."""

    def __init__(self, channels: int = 8, n_layers: int = 2, hidden: int = 16, product_channels: int = 2,
                 max_correction: float = 1.0):
        super().__init__()
        self.config = dict(channels=channels, n_layers=n_layers, hidden=hidden, product_channels=product_channels,
                           max_correction=max_correction)
        self.encoder = TransformerNFNEncoder(len(INPUTS), channels, n_layers, hidden, product_channels,
                                             final_activation=False, out_channels=1)
        self.gain = nn.Parameter(torch.zeros(len(BLOCK_AXES)))  # per block-tensor type; 0 = plain equivariant Adam
        self.max_correction = max_correction

    def forward(self, inputs: WeightSpace) -> dict[str, torch.Tensor]:
        """inputs [1, 4] -> {block tensor: correction (unbatched)}, each entry bounded by max_correction."""
        x, _ = normalize_scales(summarize_outer(inputs))
        out = self.encoder(x)
        gains = torch.tanh(self.gain) * self.max_correction
        return {name: gains[i] * bounded(name, out[name][0, 0]) for i, name in enumerate(BLOCK_AXES) if name in out}

    def save_pretrained(self, directory: str | os.PathLike, **meta) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous() for k, v in self.state_dict().items()}, str(d / ".tmp.safetensors"))
        os.replace(d / ".tmp.safetensors", d / "model.safetensors")
        (d / ".tmp.json").write_text(json.dumps({"format": FORMAT, "config": self.config, "meta": meta}, indent=2))
        os.replace(d / ".tmp.json", d / "config.json")

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike) -> "LearnedUpdate":
        from safetensors.torch import load_file

        d = Path(name_or_dir)
        if not (d / "config.json").exists():
            d = PRETRAINED_DIR / str(name_or_dir)
        if not (d / "config.json").exists():
            shipped = sorted(p.name for p in PRETRAINED_DIR.glob("*") if (p / "config.json").exists())
            raise FileNotFoundError(f"no learned optimizer at {name_or_dir!r} (shipped: {', '.join(shipped) or 'none'})")
        cfg = json.loads((d / "config.json").read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{d} does not hold an nfn-plugins learned update (format {cfg.get('format')!r})")
        model = cls(**cfg["config"])
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        return model


class NFNOptimizer(torch.optim.Optimizer):
    """Drop-in replacement for AdamW that needs the model (to know which tensors form each block).

    Args:
        model: the model (HF, torch, PEFT-, DDP- or accelerate-wrapped).
        lr, betas, eps, weight_decay: as in AdamW, for every parameter.
        learned: a `LearnedUpdate` (None: equivariant Adam only).
        nonfinite: "skip" (warn and skip the whole step when any gradient is NaN/inf) or "raise".
        base_optimizer: class for the parameters outside the blocks (AdamW by default).
        extra_axes: see `extract_weights`.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, learned: LearnedUpdate | None = None,
                 nonfinite: str = "skip", base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
                 base_kwargs: dict | None = None, extra_axes=None):
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.binding: Binding = bind(model, extra_axes, strict=False)
        block = [h.param for h in self.binding.block_handles if h.param.requires_grad]
        if not block:
            raise ValueError("no trainable transformer block parameters found (are they frozen?)")
        ids = {id(p) for p in block}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        super().__init__([{"params": block, "name": "nfn_blocks"}],
                         dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.learned = learned
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.base = None
        if others:
            self.base = base_optimizer(others, lr=lr, weight_decay=weight_decay, **(base_kwargs or {}))
            self.base.param_groups[0]["name"] = "base"
            self.param_groups.append(self.base.param_groups[0])  # shared: schedulers and state_dict see both
        unmatched = ", ".join(h.name for h in self.binding.unmatched) or "none"
        logger.info("NFNOptimizer: %d block tensors (%d weights) -> learned equivariant update; %d other tensors "
                    "(%d weights) -> %s; unrecognised parameters sent to the base optimizer: %s",
                    len(block), sum(p.numel() for p in block), len(others), sum(p.numel() for p in others),
                    base_optimizer.__name__, unmatched)

    @classmethod
    def from_pretrained(cls, name: str, model: nn.Module, **kwargs) -> "NFNOptimizer":
        """An optimizer whose learned update ships with the package (or lives in directory ``name``)."""
        return cls(model, learned=LearnedUpdate.from_pretrained(name), **kwargs)

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
        if self.base is not None:
            if base_state is not None:
                self.base.load_state_dict({"state": base_state, "param_groups": self.base.state_dict()["param_groups"]})
            self.base.param_groups = [self.param_groups[1]]  # re-share: torch rebuilt the group dicts

    # -- the step ------------------------------------------------------------------------------------
    def _check_finite(self) -> bool:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(type(p.grad).__name__ == "DTensor" for p in params[:1]):
            raise RuntimeError("NFNOptimizer needs whole block matrices, but the gradients are DTensor shards "
                               "(FSDP). Use DDP (or plain data parallelism); FSDP is not supported.")
        finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
        if finite:
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError("non-finite gradient: NFNOptimizer refused to step (nonfinite='raise')")
        self.skipped_steps += 1
        warnings.warn(f"non-finite gradient: step skipped, weights unchanged ({self.skipped_steps} skipped so far)")
        return False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._check_finite():
            return loss
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        b = self.binding
        active = {id(p) for p in group["params"]}

        def grad_of(h):
            g = h.param.grad
            return torch.zeros_like(h.param) if g is None else g.to(h.param.dtype)

        grads = b.read(grad_of)
        squares = {n: head_pooled_square(n, grads[n]) for n in BLOCK_AXES if n in grads}
        directions: dict[int, torch.Tensor] = {}
        for handle, sq in b.to_parameters(squares, blocks_only=True):
            p = handle.param
            if id(p) not in active:
                continue
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float64)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            t = float(st["step"])
            st["exp_avg"].lerp_(grad_of(handle), 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).add_(sq, alpha=1 - beta2)
            m_hat = st["exp_avg"] / (1 - beta1**t)
            v_hat = st["exp_avg_sq"] / (1 - beta2**t)
            directions[id(p)] = m_hat / (v_hat.sqrt() + eps)
        if self.learned is not None:
            for handle, corr in b.to_parameters(self._correction(grads, directions), blocks_only=True):
                if id(handle.param) in directions:
                    directions[id(handle.param)] += corr.to(handle.param.dtype)
        for p in group["params"]:
            if id(p) in directions:
                p.mul_(1 - lr * wd).add_(directions[id(p)], alpha=-lr)
        if self.base is not None:
            self.base.step()
        return loss

    def _correction(self, grads: WeightSpace, directions: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The learned correction from (weights, gradient, momentum, Adam direction); outer tensors carry
        zeros in the two moment channels (their moments live in the base optimizer)."""
        dtype = next(self.learned.parameters()).dtype

        def source(key: str):
            def read(h) -> torch.Tensor:
                if key == "adam_direction":
                    return directions.get(id(h.param), torch.zeros_like(h.param))
                st = self.state.get(h.param)
                return st[key] if st and h.name not in self.binding.outer else torch.zeros_like(h.param)
            return read

        channels = [self.binding.read(), grads, self.binding.read(source("exp_avg")),
                    self.binding.read(source("adam_direction"))]
        return self.learned(WeightSpace.stack([c.to(dtype) for c in channels]).unsqueeze(0))
