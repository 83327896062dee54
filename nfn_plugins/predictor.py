"""`AccuracyPredictor`: a trained network's test accuracy, predicted from its weights alone.

Invariant Transformer-NFN features + a small head, trained with binary cross-entropy on accuracies in
[0, 1] (as in the paper). Symmetric copies of a network get the same prediction by construction; the
symmetries the NFN does not build in (MLP-unit scales, RMSNorm stream signs) can be taught by
augmentation with random group elements. With ``n_classes`` a collapse head (`nn.collapse`) ranks the
members that predict one class for every input by the class their output bias picks. With ``probes`` the heads
also read each network's outputs on learned probe images (`nfn_plugins.probes`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import checkpoints
from .extract import extract_weights
from .group import SymmetryGroup
from .metrics import regression_report
from .nn import TransformerNFN
from .nn.collapse import CollapseHead, output_bias
from .nn.normalize import log_scale_features
from .probes import ProbeFeatures
from .weight_space import WeightSpace


Group = tuple[WeightSpace, torch.Tensor]  # weight spaces [N] of one architecture, labels [N]


@dataclass
class PredictorConfig:
    channels: int = 16
    n_layers: int = 2
    hidden: int = 32
    product_channels: int = 4
    invariant_dim: int = 32
    head_hidden: int = 64
    head_layers: int = 2  # hidden layers of the head; with 1, ~300 zoo members left it undertrained after 20 epochs
    feature_limit: float | None = 10.0  # see TransformerNFN: collapsed zoo members gave logits of ~1e3 without it
    # 2: a head on the log-scales alone, corrected by the NFN's (see TransformerNFN): tau +0.03 on held-out zoo
    # members, but worse on models trained by recipes outside the zoo (benchmarks/results/predictor_recipes.md)
    scale_head_layers: int = 0
    # > 0: a collapse head for classifiers of this many classes (nn/collapse.py); fit needs to know which
    # training members collapsed (a Zoo tells). mnist-paper (second build), 10 splits at 0%: tau 0.668 -> 0.827.
    # Off by default: its gate is trained on zoo members, and in eval mode a wrong call predicts a working
    # model at a class frequency
    n_classes: int = 0
    # > 0: features of the networks' outputs on this many learned probe images (`ProbeFeatures`) join the NFN's,
    # for the architectures ``probe_archs`` (a zoo's ``arch`` dicts; the predictor then reads only those);
    # exactly invariant, see nfn_plugins/probes.py.
    # Off by default: with the collapse head on mnist-paper (third build, 10 splits) 16 probes gave tau 0.795, 0.828
    # without
    probes: int = 0
    probe_archs: list[dict] | None = None


@dataclass
class FitConfig:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-3  # with 1e-3 the best validation epoch was often the last of 20 (mnist-paper zoo)
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    augment: bool = True  # random group elements (incl. the unit scales the NFN does not build in)
    seed: int = 0
    restore_best: bool = True  # with validation data: end with the weights of the best-validation-tau epoch
    max_grad_norm: float | None = 1.0  # clip the global gradient norm: one outlier item can give norms of ~1e3


def as_groups(data) -> list[Group]:
    """Training data as one (weights, labels) pair per architecture.

    Accepts a `nfn_plugins.zoo.Zoo` (label: test accuracy), a ``(WeightSpace [N], labels [N])`` pair, or a
    list of such pairs.
    """
    if hasattr(data, "by_arch") and hasattr(data, "labels"):
        return [(z.weights(), z.labels()) for z in data.by_arch().values() if len(z)]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], WeightSpace):
        data = [data]
    groups = []
    for ws, y in data:
        y = torch.as_tensor(y, dtype=torch.float32).flatten()
        if len(ws.batch_shape) != 1 or ws.batch_shape[0] != len(y):
            raise ValueError(f"weights with batch shape {ws.batch_shape} do not match {len(y)} labels")
        if not torch.isfinite(y).all() or (y < 0).any() or (y > 1).any():
            raise ValueError("labels must be finite accuracies in [0, 1]")
        groups.append((ws, y))
    if not groups:
        raise ValueError("no training data")
    return groups


def collapsed_masks(data) -> list[torch.Tensor]:
    """Per `as_groups` group of a Zoo: which members collapsed (`Zoo.at_class_frequency`; loads the dataset)."""
    if not (hasattr(data, "by_arch") and hasattr(data, "at_class_frequency")):
        raise ValueError("a predictor with a collapse head (n_classes > 0) must know which training members "
                         "collapsed: fit on a Zoo, or pass collapsed=[a bool mask per (weights, labels) pair]")
    flags = dict(zip(map(id, data.records), data.at_class_frequency().tolist()))
    return [torch.tensor([flags[id(r)] for r in z.records]) for z in data.by_arch().values() if len(z)]


def _checked_log_scales(ws: WeightSpace, chunk: int = 256) -> torch.Tensor:
    """`log_scale_features` of training weights [N] (in float32, as trained); refuses non-finite weights."""
    x = torch.cat([log_scale_features(ws.map(lambda t: t[i : i + chunk].float()).unsqueeze(1))
                   for i in range(0, ws.batch_shape[0], chunk)])
    bad = (~torch.isfinite(x).all(1)).nonzero().flatten().tolist()
    if bad:
        raise _non_finite("weight norms", bad, ws)
    return x


def _non_finite(what: str, items: list[int], ws: WeightSpace) -> FloatingPointError:
    return FloatingPointError(f"non-finite {what} for training items {items} (indices within the "
                              f"{ws.spec.family} architecture's data; check those weights for inf/NaN or overflow)")


class AccuracyPredictor(checkpoints.Pretrained, nn.Module):
    """Predicts accuracy in [0, 1] from weights; one instance handles any width, depth and supported family."""

    FORMAT = "nfn-plugins-accuracy-predictor/1"
    WHAT = "accuracy predictor"

    def __init__(self, config: PredictorConfig | None = None):
        super().__init__()
        self.config = config or PredictorConfig()
        c = self.config
        if c.probes and not c.probe_archs:
            raise ValueError("probe features (probes > 0) run the members' forward: give probe_archs (a zoo's "
                             "arch dicts)")
        self.probe = ProbeFeatures(c.probe_archs, c.probes) if c.probes else None
        extra = self.probe.out_dim if self.probe is not None else 0
        self.nfn = TransformerNFN(in_channels=1, channels=c.channels, n_layers=c.n_layers, hidden=c.hidden,
                                  product_channels=c.product_channels, invariant_dim=c.invariant_dim,
                                  head_hidden=c.head_hidden, out_dim=1, feature_limit=c.feature_limit,
                                  head_layers=c.head_layers, scale_head_layers=c.scale_head_layers,
                                  extra_features=extra)
        self.collapse = CollapseHead(self.nfn.feature_dim + extra, c.n_classes) if c.n_classes else None
        self.meta: dict = {}

    def forward(self, ws: WeightSpace, with_gate: bool = False):
        """Logits [B] for weight spaces with batch dims [B] or [B, 1]; ``with_gate``: (logits, collapse-gate
        logits or None) (through forward, so that DDP sees the gate's gradients)."""
        if len(ws.batch_shape) == 2 and ws.batch_shape[1] == 1:
            ws = ws.map(lambda t: t.squeeze(1))
        features = self.nfn.features(ws.unsqueeze(1))
        if self.probe is not None:
            features = torch.cat([features, self.probe(ws)], -1)
        logit, gate = self.nfn.readout(features).squeeze(-1), None
        if self.collapse is not None:
            logit, gate = self.collapse(features, output_bias(ws, self.collapse.n_classes), logit)
        return (logit, gate) if with_gate else logit

    @torch.no_grad()
    def predict(self, x, batch_size: int = 64) -> torch.Tensor:
        """Predicted accuracies for a model, a `WeightSpace` (unbatched or [N]) or a zoo (one per record)."""
        if isinstance(x, nn.Module):
            x = extract_weights(x)
        if hasattr(x, "by_arch"):
            preds = torch.empty(len(x))
            index = {id(r): i for i, r in enumerate(x.records)}
            for sub in x.by_arch().values():
                p = self.predict(sub.weights(), batch_size)
                preds[torch.tensor([index[id(r)] for r in sub.records])] = p
            return preds
        if not isinstance(x, WeightSpace):
            raise TypeError(f"predict takes an nn.Module, a WeightSpace or a Zoo, not {type(x).__name__}")
        single = x.batch_shape == ()
        ws = x.unsqueeze(0) if single else x
        param = next(self.parameters())  # the weights come to the predictor's device and dtype
        was_training = self.training
        self.eval()
        out = torch.cat([torch.sigmoid(self(ws.map(lambda t: t[i : i + batch_size].to(param.device, param.dtype))))
                         for i in range(0, ws.batch_shape[0], batch_size)])
        self.train(was_training)
        return out[0] if single else out

    def evaluate(self, data) -> dict[str, float]:
        """Kendall's tau, R^2 and L1 error on held-out data (a Zoo or (weights, labels) pairs)."""
        groups = as_groups(data)
        pred = torch.cat([self.predict(ws) for ws, _ in groups])
        return regression_report(pred, torch.cat([y for _, y in groups]))

    def fit(self, train, val=None, config: FitConfig | None = None, accelerator=None, progress: bool = True,
            collapsed: list[torch.Tensor] | None = None) -> list[dict]:
        """Train on ``train``; report validation metrics per epoch. Returns the history.

        With ``val`` and ``config.restore_best``, the model ends with the weights of the epoch with the best
        validation Kendall tau (the row has ``"best": True``), as the baselines of the benchmark do.

        With an `accelerate.Accelerator` (e.g. under ``accelerate launch``), each process takes every
        world_size-th mini-batch and gradients are averaged (the NFN leaves parameters unused for tensors a
        family lacks: create the Accelerator with ``DistributedDataParallelKwargs(find_unused_parameters=True)``).

        The first fit of a predictor with a scale head sets its log-scale standardiser from ``train`` (under
        accelerate every process must pass the whole training set: each fits the same standardiser); later
        fits keep it, so that training can continue where it stopped. A collapse head sets its class scores
        from ``train`` on every fit, and its gate learns ``collapsed`` (one bool mask per training group; read
        off a Zoo when not given) alongside the accuracy loss. Augmentation samples MLP-unit scales,
        which a scale head reads as shifted up/down norms (with a scale head and without augmentation:
        tau +0.014 on mnist-paper, -0.014 on mnist-vit; see README).
        """
        cfg = config or FitConfig()
        groups = as_groups(train)
        val_groups = as_groups(val) if val is not None else None
        if self.nfn.scale_norm is not None and not self.nfn.scale_norm.fitted:
            self.nfn.scale_norm.fit(torch.cat([_checked_log_scales(ws) for ws, _ in groups]))
        masks = None
        if collapsed is not None and self.collapse is None:
            raise ValueError("collapsed masks train a collapse head; this predictor has none (n_classes=0)")
        if self.collapse is not None:
            masks = [torch.as_tensor(m, dtype=torch.bool).flatten()
                     for m in (collapsed if collapsed is not None else collapsed_masks(train))]
            if [len(m) for m in masks] != [len(y) for _, y in groups]:
                raise ValueError(f"collapsed masks of lengths {[len(m) for m in masks]} do not match the training "
                                 f"groups of {[len(y) for _, y in groups]} members")
            self.collapse.fit(torch.cat([output_bias(ws, self.collapse.n_classes).float() for ws, _ in groups]),
                              torch.cat([y for _, y in groups]), torch.cat(masks))
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        steps_per_epoch = sum(math.ceil(len(y) / cfg.batch_size) for _, y in groups) // world
        total = max(1, steps_per_epoch * cfg.epochs)
        warmup = max(1, int(cfg.warmup_fraction * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
        model = self
        if accelerator is not None:
            model, opt = accelerator.prepare(self, opt)
        groups_of = {id(ws.spec): SymmetryGroup(ws.spec) for ws, _ in groups}
        history: list[dict] = []
        best: tuple[float, dict] | None = None  # (val tau, state) of the best epoch so far
        for epoch in range(cfg.epochs):
            start, losses = time.perf_counter(), []
            batches = [(gi, idx) for gi, (_, y) in enumerate(groups)
                       for idx in torch.randperm(len(y), generator=gen).split(cfg.batch_size)]
            order = torch.randperm(len(batches), generator=gen).tolist()
            mine = [batches[i] for i in order][rank::world][:steps_per_epoch]
            self.train()
            for gi, idx in mine:
                ws, y = groups[gi]
                xb = ws.map(lambda t: t[idx].float())
                if cfg.augment:
                    xb = groups_of[id(ws.spec)].sample(gen, dtype=torch.float32).act(xb)
                logits, gate = model(xb, with_gate=True)
                if not torch.isfinite(logits).all():
                    raise _non_finite("predictions", idx[~torch.isfinite(logits.detach())].tolist(), ws)
                loss = nn.functional.binary_cross_entropy_with_logits(logits, y[idx])
                if gate is not None:  # masks is set whenever there is a collapse head
                    loss = loss + nn.functional.binary_cross_entropy_with_logits(gate, masks[gi][idx].float())
                opt.zero_grad()
                (accelerator.backward(loss) if accelerator else loss.backward())
                if cfg.max_grad_norm is not None:
                    clip = accelerator.clip_grad_norm_ if accelerator else nn.utils.clip_grad_norm_
                    clip(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                losses.append(loss.item())
            row = {"epoch": epoch + 1, "train_bce": sum(losses) / max(1, len(losses)),
                   "seconds": time.perf_counter() - start}
            if val_groups is not None:
                row.update({f"val_{k}": v for k, v in self.evaluate(val_groups).items()})
                tau = row["val_kendall_tau"]
                if cfg.restore_best and math.isfinite(tau) and (best is None or tau > best[0]):
                    best = (tau, {k: v.detach().clone() for k, v in self.state_dict().items()})
            history.append(row)
            if progress and rank == 0:
                print("[predictor] " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in row.items()), flush=True)
        if best is not None:
            self.load_state_dict(best[1])
            next(r for r in history if r.get("val_kendall_tau") == best[0])["best"] = True
        return history

    # -- persistence -------------------------------------------------------------------------------
    @classmethod
    def _from_config(cls, config: dict) -> "AccuracyPredictor":
        # saved before these options existed: load them unchanged (no limit, one hidden layer, no scale head)
        config = {"feature_limit": None, "head_layers": 1, "scale_head_layers": 0, **config}
        return cls(PredictorConfig(**config))
