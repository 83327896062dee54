"""Building and loading transformer zoos: many small models trained at once, checkpoints written as shards.

How a zoo is built (`build_zoo`):

- Every member ``i`` gets its architecture, hyperparameters, initial weights, training subset and
  mini-batch order from generators seeded by ``(seed, i)``, so it is the same member whatever the batch,
  process count or run it is trained in (only dropout masks come from the batch's generator).
- Members with the same architecture are trained together: their parameters are stacked
  (`torch.func.stack_module_state`), the forward pass is ``vmap(functional_call(...))`` with every member
  on its own mini-batch, and `StackedOptimizer` updates the stacked tensors with per-member optimizer
  type, learning rate and weight decay. Dropout rates differ per member too (the paper model keeps its
  rate in a buffer); HF models are additionally grouped by dropout rate (a module attribute).
- An "epoch" is ``steps_per_epoch`` steps of ``batch_size`` samples drawn from the member's own training
  subset (its ``train_fraction`` of the training split). At each epoch of ``checkpoint_epochs`` the member
  is evaluated (test accuracy / loss on a fixed test subset, train accuracy / loss on its own training
  data) and its weights are snapshotted as a canonical `WeightSpace`.
- A batch of members becomes one shard ``shards/shard-m<first member>-n<count>.safetensors``: one tensor
  per weight-space tensor, ``[rows, ...]``, and the shard's metadata JSON (spec, one record per row)
  in the safetensors header. It is written to a temp file and moved into place with ``os.replace``, so a
  shard is either complete or absent. Finished members are read back from the shards on every start:
  rerunning after a kill only trains the members that are missing. At the end ``manifest.json`` (finished
  members -> shard) and ``metadata.jsonl`` (one line per checkpoint) are rewritten from the shards.
- Members of the optimizer "nfn" (the package's learned optimizer, `NFNOptimizer` with the learned update
  ``ZOO_LEARNED_UPDATE``, which needs the model and cannot be vmapped) train one by one, in batches of their
  own; their shards and records are like the others'. A zoo with them covers models trained the way the
  package trains them.
- Under ``accelerate launch`` process ``rank`` takes the members with ``i % world_size == rank``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import struct
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import TensorSpec, WeightSpaceSpec
from ..weight_space import WeightSpace
from .family import zoo_binding
from .models import BERT, PAPER, VIT, arch_key, build_model, init_weights, prepare_inputs

STACKED_OPTIMIZERS = ("adam", "rmsprop", "sgd", "sgd_momentum")  # the paper's grid; trained batched
SEQUENTIAL_OPTIMIZERS = ("nfn",)  # trained one member at a time (see the module docstring)
# the learned update of "nfn" members, pinned (not the package's moving default) so that a rebuild or a resumed
# build trains the same members
ZOO_LEARNED_UPDATE = "vit-paper-bert-1layer"
OPTIMIZERS = STACKED_OPTIMIZERS + SEQUENTIAL_OPTIMIZERS
SHARD_FORMAT = "nfn-plugins-zoo-shard/1"
_DATASET_FOR = {"image": ("mnist", "fashion_mnist"), "text": ("movie_reviews", "ag_news")}


class ZooError(RuntimeError):
    """A zoo cannot be built or read as asked (bad config, corrupt or conflicting shards)."""


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------
@dataclass
class HyperGrid:
    """The values each member's hyperparameters are drawn from (uniformly, independently, per member).

    Defaults follow the paper's Small Transformer Zoo: Adam / RMSprop learning rates 3e-4 ... 5e-2,
    SGD (with or without momentum 0.9) 1e-3 ... 7e-2, init std 0.1-0.5, weight decay 1e-8 ... 1e-2,
    train fraction 1 / 0.9 / 0.8 / 0.7, dropout 0 ... 0.2.
    """

    optimizer: list[str] = field(default_factory=lambda: list(STACKED_OPTIMIZERS))
    lr: dict[str, list[float]] = field(
        default_factory=lambda: {
            "adam": [3e-4, 6e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2],
            "rmsprop": [3e-4, 6e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2],
            "sgd": [1e-3, 3e-3, 7e-3, 1e-2, 2e-2, 4e-2, 7e-2],
            "sgd_momentum": [1e-3, 3e-3, 7e-3, 1e-2, 2e-2, 4e-2, 7e-2],
        }
    )
    init_std: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5])
    weight_decay: list[float] = field(default_factory=lambda: [1e-8, 1e-6, 1e-4, 1e-3, 1e-2])
    train_fraction: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 0.7])
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2])

    def validate(self) -> None:
        unknown = [o for o in self.optimizer if o not in OPTIMIZERS]
        if unknown:
            raise ZooError(f"unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}")
        for name in ("optimizer", "init_std", "weight_decay", "train_fraction", "dropout"):
            if not list(getattr(self, name)):
                raise ZooError(f"empty hyperparameter grid: '{name}' has no values")
        for opt in self.optimizer:
            if not self.lr.get(opt):
                raise ZooError(f"empty hyperparameter grid: no learning rates for optimizer '{opt}'")
        for name, lo, hi in (("train_fraction", 0, 1), ("dropout", 0, 0.99)):
            bad = [v for v in getattr(self, name) if not (lo < v <= hi if name == "train_fraction" else lo <= v <= hi)]
            if bad:
                raise ZooError(f"{name} values {bad} are out of range")
        if any(v <= 0 for vs in self.lr.values() for v in vs) or any(v <= 0 for v in self.init_std):
            raise ZooError("learning rates and init stds must be positive")
        if any(v < 0 for v in self.weight_decay):
            raise ZooError("weight decays must be >= 0")

    def sample(self, g: torch.Generator) -> dict:
        def pick(values: Sequence):
            return values[int(torch.randint(len(values), (1,), generator=g))]

        opt = pick(self.optimizer)
        return {
            "optimizer": opt,
            "lr": float(pick(self.lr[opt])),
            "init_std": float(pick(self.init_std)),
            "weight_decay": float(pick(self.weight_decay)),
            "train_fraction": float(pick(self.train_fraction)),
            "dropout": float(pick(self.dropout)),
        }


@dataclass
class ZooConfig:
    """Everything that determines a zoo. ``archs``: architectures the members are drawn from (uniformly);
    fields the dataset fixes (classes, vocabulary size, image size) are filled in automatically."""

    name: str
    dataset: str = "mnist"
    dataset_kwargs: dict = field(default_factory=dict)
    archs: list[dict] = field(default_factory=lambda: [{"family": PAPER}])
    grid: HyperGrid = field(default_factory=HyperGrid)
    n_members: int = 100
    checkpoint_epochs: list[int] = field(default_factory=lambda: [1, 2, 4])
    steps_per_epoch: int = 16
    batch_size: int = 64
    eval_test_size: int = 2000
    eval_train_size: int = 1000
    members_per_batch: int = 32
    seed: int = 0
    threads: int | None = None  # torch threads per process (default 1: use processes for more cores)

    # fields that may change between runs of the same zoo (they do not change any member's result)
    _RUNTIME = ("n_members", "members_per_batch", "threads")

    def validate(self) -> None:
        self.grid.validate()
        if self.n_members < 1:
            raise ZooError(f"n_members must be >= 1, got {self.n_members}")
        if not self.archs:
            raise ZooError("empty grid: no architectures in 'archs'")
        if not self.checkpoint_epochs or any(int(e) != e or e < 0 for e in self.checkpoint_epochs):
            raise ZooError(f"checkpoint_epochs must be a non-empty list of integers >= 0, got {self.checkpoint_epochs}")
        if len(set(self.checkpoint_epochs)) != len(self.checkpoint_epochs):
            raise ZooError(f"checkpoint_epochs has duplicates: {self.checkpoint_epochs}")
        for name in ("steps_per_epoch", "batch_size", "eval_test_size", "eval_train_size", "members_per_batch"):
            if getattr(self, name) < 1:
                raise ZooError(f"{name} must be >= 1, got {getattr(self, name)}")
        for a in self.archs:
            if a.get("family") not in (PAPER, VIT, BERT):
                raise ZooError(f"unknown model family {a.get('family')!r} in archs; use 'paper', 'vit' or 'bert'")

    @property
    def n_checkpoints(self) -> int:
        return self.n_members * len(self.checkpoint_epochs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ZooConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ZooError(f"unknown zoo config field(s) {sorted(unknown)}; known: {sorted(known)}")
        grid = d.pop("grid", {}) or {}
        if isinstance(grid, dict):
            gknown = {f.name for f in dataclasses.fields(HyperGrid)}
            if set(grid) - gknown:
                raise ZooError(f"unknown grid field(s) {sorted(set(grid) - gknown)}; known: {sorted(gknown)}")
            grid = HyperGrid(**grid)
        return cls(grid=grid, **d)

    @classmethod
    def from_json(cls, s: str) -> "ZooConfig":
        return cls.from_dict(json.loads(s))

    def identity(self) -> dict:
        """The fields that define the members (a rerun must agree on these)."""
        return {k: v for k, v in self.to_dict().items() if k not in self._RUNTIME}


@dataclass(frozen=True)
class Member:
    id: int
    arch: dict  # complete (dataset fields filled in)
    hparams: dict

    @property
    def arch_key(self) -> str:
        return arch_key(self.arch)

    def group_key(self) -> tuple:
        """Members sharing this key can be trained in one batch (optimizers mix freely; the paper model
        keeps its dropout rate in a tensor, HF models in a module attribute)."""
        drop = self.hparams["dropout"] if self.arch["family"] != PAPER else None
        return (self.arch_key, drop)


def complete_arch(arch: dict, data) -> dict:
    """Fill in what the dataset fixes: classes, image geometry or vocabulary size / sequence length."""
    a = dict(arch)
    fam = a.get("family")
    if fam not in (PAPER, VIT, BERT):
        raise ZooError(f"unknown model family {fam!r}; use 'paper', 'vit' or 'bert'")
    if fam == BERT and data.kind != "text" or fam == VIT and data.kind != "image":
        raise ZooError(f"model family {fam!r} does not fit the {data.kind} dataset {data.name!r}")
    a["n_classes"] = data.n_classes
    if data.kind == "image":
        _, c, h, _ = data.train_x.shape
        if fam == PAPER:
            a["modality"] = "image"
        a.update(channels=c, image_size=h)
    else:
        if fam == PAPER:
            a["modality"] = "text"
        a.update(vocab_size=len(data.vocab), max_len=data.train_x.shape[1])
    if fam == PAPER:
        from .models import paper_arch

        a = paper_arch(**{k: v for k, v in a.items() if k != "family"})
    return a


def plan_members(cfg: ZooConfig, data) -> list[Member]:
    """All members of the zoo, each fixed by ``(seed, id)`` alone."""
    archs = [complete_arch(a, data) for a in cfg.archs]
    out = []
    for i in range(cfg.n_members):
        g = _generator(cfg.seed, i, "hparams")
        arch = archs[int(torch.randint(len(archs), (1,), generator=g))]
        out.append(Member(i, arch, cfg.grid.sample(g)))
    return out


# ---------------------------------------------------------------------------------------------------
# optimizers on stacked parameters
# ---------------------------------------------------------------------------------------------------
class StackedOptimizer:
    """Optimizers over stacked parameters ``[M, ...]``: per-member optimizer type, lr and weight decay.

    ``kinds[j]`` is member j's optimizer; each type updates its own members (indexed along dim 0), so one
    batch can mix optimizers. Update rules are those of ``torch.optim`` with default settings (weight
    decay as L2 added to the gradient): Adam (0.9, 0.999, eps 1e-8), RMSprop (alpha 0.99, eps 1e-8), SGD,
    SGD with momentum 0.9.
    """

    def __init__(self, kinds: Sequence[str] | str, params: list[torch.Tensor], lr: torch.Tensor, weight_decay: torch.Tensor):
        n = len(lr)
        kinds = [kinds] * n if isinstance(kinds, str) else list(kinds)
        unknown = sorted({k for k in kinds if k not in OPTIMIZERS})
        if unknown:
            raise ZooError(f"unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}")
        sequential = sorted({k for k in kinds if k in SEQUENTIAL_OPTIMIZERS})
        if sequential:
            raise ZooError(f"optimizer(s) {sequential} need the model and train one member at a time "
                           f"(SequentialTrainer); stacked optimizers: {', '.join(STACKED_OPTIMIZERS)}")
        if len(kinds) != n or len(weight_decay) != n:
            raise ValueError(f"{len(kinds)} optimizer kinds, {n} learning rates, {len(weight_decay)} weight decays")
        self.params = params
        self.t = 0
        self.groups = []  # (kind, member index, lr [m], wd [m], per-parameter state)
        for kind in STACKED_OPTIMIZERS:
            idx = torch.tensor([j for j, k in enumerate(kinds) if k == kind], dtype=torch.long)
            if len(idx):
                self.groups.append((kind, idx, lr[idx], weight_decay[idx], [{} for _ in params]))

    @staticmethod
    def _per_member(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    @staticmethod
    def _direction(kind: str, g: torch.Tensor, st: dict, t: int) -> tuple[torch.Tensor, float]:
        """The update direction u and a scalar factor c: p <- p - lr * c * u."""
        if kind == "sgd":
            return g, 1.0
        if kind == "sgd_momentum":
            buf = st.get("momentum")
            buf = g.clone() if buf is None else buf.mul_(0.9).add_(g)
            st["momentum"] = buf
            return buf, 1.0
        if kind == "adam":
            b1, b2 = 0.9, 0.999
            m = st.setdefault("exp_avg", torch.zeros_like(g)).mul_(b1).add_(g, alpha=1 - b1)
            v = st.setdefault("exp_avg_sq", torch.zeros_like(g)).mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(1e-8)
            return m / denom, 1 / (1 - b1**t)
        v = st.setdefault("square_avg", torch.zeros_like(g)).mul_(0.99).addcmul_(g, g, value=0.01)  # rmsprop
        return g / v.sqrt().add_(1e-8), 1.0

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        self.t += 1
        for kind, idx, lr, wd, states in self.groups:
            whole = len(self.groups) == 1
            for p, g, st in zip(self.params, grads, states):
                if "lr" not in st:
                    st["lr"], st["wd"] = self._per_member(lr, p), self._per_member(wd, p)
                pk = p if whole else p[idx]
                gk = (g if whole else g[idx]) + st["wd"] * pk
                u, c = self._direction(kind, gk, st, self.t)
                delta = (st["lr"] * c) * u
                if whole:
                    p.sub_(delta)
                else:
                    p.index_add_(0, idx, delta, alpha=-1)


def torch_optimizer(kind: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer `StackedOptimizer` reproduces, or for "nfn" the package's learned optimizer
    (``ZOO_LEARNED_UPDATE`` at its validated correction horizon; decoupled weight decay), for one-by-one training."""
    if kind == "nfn":
        from ..optim import NFNOptimizer

        return NFNOptimizer.from_pretrained(ZOO_LEARNED_UPDATE, model, lr=lr, weight_decay=weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ZooError(f"unknown optimizer {kind!r}; choose from {', '.join(OPTIMIZERS)}")


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------
class TaskData:
    """The dataset tensors a build trains on, prepared once per architecture (e.g. MNIST cut into patches)."""

    def __init__(self, data, cfg: ZooConfig):
        self.data = data
        self.cfg = cfg
        n_test = len(data.test_y)
        keep = torch.randperm(n_test, generator=_generator(cfg.seed, "test-subset"))[: min(cfg.eval_test_size, n_test)]
        self.test_idx = keep.sort().values
        self._prepared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def inputs(self, arch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(train inputs, test-subset inputs) in the model's preferred form."""
        key = json.dumps({k: arch.get(k) for k in ("family", "modality", "patch_size")}, sort_keys=True)
        if key not in self._prepared:
            self._prepared[key] = (
                prepare_inputs(arch, self.data.train_x),
                prepare_inputs(arch, self.data.test_x[self.test_idx]),
            )
        return self._prepared[key]

    @property
    def test_y(self) -> torch.Tensor:
        return self.data.test_y[self.test_idx]

    def member_subset(self, cfg: ZooConfig, member: Member) -> torch.Tensor:
        """The member's own training examples: its train_fraction of a member-specific permutation."""
        n = len(self.data.train_y)
        perm = torch.randperm(n, generator=_generator(cfg.seed, member.id, "subset"))
        return perm[: max(1, int(round(member.hparams["train_fraction"] * n)))]


class _BatchSampler:
    """Per-member mini-batches (uniform, with replacement, from the member's own subset) drawn up front
    from per-member generators, so batched and one-by-one training see the same batches."""

    def __init__(self, cfg: ZooConfig, members: Sequence[Member], subsets: Sequence[torch.Tensor]):
        steps = max(cfg.checkpoint_epochs) * cfg.steps_per_epoch
        self.batches = torch.stack([
            sub[torch.randint(len(sub), (steps, cfg.batch_size), generator=_generator(cfg.seed, m.id, "batches"))]
            for m, sub in zip(members, subsets)
        ], dim=1)  # [steps, M, batch_size]
        self.i = 0

    def next(self) -> torch.Tensor:
        """``[M, batch_size]`` indices into the training split."""
        out = self.batches[self.i]
        self.i += 1
        return out


def _fresh_model(cfg: ZooConfig, m: Member) -> nn.Module:
    model = build_model(m.arch, dropout=m.hparams["dropout"])
    init_weights(model, m.hparams["init_std"], _generator(cfg.seed, m.id, "init"))
    return model


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@dataclass
class _Snapshot:
    epoch: int
    step: int
    params: dict[str, torch.Tensor]  # stacked [M, ...]
    metrics: list[dict]


class BatchTrainer:
    """Trains one batch of members (same architecture and optimizer) together with ``vmap``."""

    eval_samples = 2048  # members x examples per evaluation forward pass (keeps activations in cache)

    def __init__(self, cfg: ZooConfig, task: TaskData, members: Sequence[Member]):
        keys = {m.group_key() for m in members}
        if len(keys) != 1:
            raise ZooError(f"a batch must share one architecture (and HF dropout rate), got {sorted(map(str, keys))}")
        self.cfg, self.task, self.members = cfg, task, list(members)
        self.arch = members[0].arch
        models = [_fresh_model(cfg, m) for m in members]
        self.template = models[0]
        from torch.func import functional_call, stack_module_state, vmap

        params, buffers = stack_module_state(models)
        self.trainable = [n for n, p in self.template.named_parameters() if p.requires_grad]
        self.params = {n: p.detach().clone().requires_grad_(n in self.trainable) for n, p in params.items()}
        self.buffers = {n: b.detach().clone() for n, b in buffers.items()}
        self.base = copy.deepcopy(self.template).to("meta")
        if hasattr(self.base, "dropout_active"):
            self.base.dropout_active = any(m.hparams["dropout"] > 0 for m in members)

        def f(p, b, x):
            return functional_call(self.base, (p, b), (x,))

        self._train_fn = vmap(f, in_dims=(0, 0, 0), randomness="different")
        self._eval_fn = vmap(f, in_dims=(0, 0, None), randomness="different")
        self._eval_own_fn = vmap(f, in_dims=(0, 0, 0), randomness="different")
        kinds = [m.hparams["optimizer"] for m in members]
        lr = torch.tensor([m.hparams["lr"] for m in members])
        wd = torch.tensor([m.hparams["weight_decay"] for m in members])
        self.opt = StackedOptimizer(kinds, [self.params[n] for n in self.trainable], lr, wd)
        self.subsets = [task.member_subset(cfg, m) for m in members]
        self.sampler = _BatchSampler(cfg, members, self.subsets)
        # train metrics: the first examples of each member's own (randomly permuted) training subset
        k = min(cfg.eval_train_size, *(len(sub) for sub in self.subsets))
        self.train_eval_idx = torch.stack([sub[:k] for sub in self.subsets])
        self.step_count = 0
        self.eval_chunk = max(16, self.eval_samples // len(self.members))

    def train_steps(self, n: int) -> None:
        x_train, _ = self.task.inputs(self.arch)
        y_train = self.task.data.train_y
        self.base.train()
        M, B = len(self.members), self.cfg.batch_size
        for _ in range(n):
            idx = self.sampler.next()
            logits = self._train_fn(self.params, self.buffers, x_train[idx])
            losses = F.cross_entropy(logits.reshape(M * B, -1), y_train[idx].reshape(-1), reduction="none")
            loss = losses.view(M, B).mean(1).sum()
            grads = torch.autograd.grad(loss, [self.params[n] for n in self.trainable])
            self.opt.step(grads)
            self.step_count += 1

    @torch.no_grad()
    def _evaluate_shared(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum = torch.zeros(len(self.members), dtype=torch.float64)
        correct = torch.zeros(len(self.members), dtype=torch.float64)
        for sl in _chunks(len(y), self.eval_chunk):
            logits = self._eval_fn(self.params, self.buffers, x[sl])  # [M, n, C]
            yy = y[sl].expand(len(self.members), -1)
            loss_sum += F.cross_entropy(logits.transpose(1, 2), yy, reduction="none").double().sum(1)
            correct += (logits.argmax(-1) == yy).double().sum(1)
        return correct / len(y), loss_sum / len(y)

    @torch.no_grad()
    def _evaluate_own(self) -> tuple[torch.Tensor, torch.Tensor]:
        x_train, _ = self.task.inputs(self.arch)
        y_train = self.task.data.train_y
        M = len(self.members)
        loss_sum = torch.zeros(M, dtype=torch.float64)
        correct = torch.zeros(M, dtype=torch.float64)
        n = self.train_eval_idx.shape[1]
        for sl in _chunks(n, self.eval_chunk):
            idx = self.train_eval_idx[:, sl]
            logits = self._eval_own_fn(self.params, self.buffers, x_train[idx])
            yy = y_train[idx]
            loss_sum += F.cross_entropy(logits.transpose(1, 2), yy, reduction="none").double().sum(1)
            correct += (logits.argmax(-1) == yy).double().sum(1)
        return correct / n, loss_sum / n

    def snapshot(self, epoch: int) -> _Snapshot:
        self.base.eval()
        _, x_test = self.task.inputs(self.arch)
        test_acc, test_loss = self._evaluate_shared(x_test, self.task.test_y)
        train_acc, train_loss = self._evaluate_own()
        params = {k: v.detach().clone() for k, v in self.params.items()}
        metrics = [_metrics(test_acc[j], test_loss[j], train_acc[j], train_loss[j],
                            all(bool(torch.isfinite(v[j]).all()) for v in params.values()))
                   for j in range(len(self.members))]
        return _Snapshot(epoch, self.step_count, params, metrics)

    def run(self, on_checkpoint: Callable[[int], None] | None = None) -> list[_Snapshot]:
        """Train to the last checkpoint epoch, snapshotting at each checkpoint epoch."""
        torch.manual_seed(_seed(self.cfg.seed, self.members[0].id, "dropout"))
        snaps = []
        epoch = 0
        for target in sorted(self.cfg.checkpoint_epochs):
            self.train_steps((target - epoch) * self.cfg.steps_per_epoch)
            epoch = target
            snaps.append(self.snapshot(epoch))
            if on_checkpoint:
                on_checkpoint(len(self.members))
        return snaps

    def weight_spaces(self, params: dict[str, torch.Tensor]) -> WeightSpace:
        return stacked_weight_spaces(self.template, params, len(self.members))


class SequentialTrainer:
    """Trains a batch of members one at a time (`SEQUENTIAL_OPTIMIZERS`: optimizers that need the model) with
    `train_one_by_one`, and returns the snapshots `BatchTrainer` would: the same shards and records."""

    def __init__(self, cfg: ZooConfig, task: TaskData, members: Sequence[Member]):
        self.cfg, self.task, self.members = cfg, task, list(members)
        self.template = _fresh_model(cfg, self.members[0])

    def run(self, on_checkpoint: Callable[[int], None] | None = None) -> list[_Snapshot]:
        runs = []
        for member in self.members:
            runs.append(train_one_by_one(self.cfg, self.task, member))
            if on_checkpoint:
                on_checkpoint(len(runs[-1]))
        snaps = []
        for c, epoch in enumerate(sorted(self.cfg.checkpoint_epochs)):
            params = {n: torch.stack([run[c]["weights"][n] for run in runs]) for n in runs[0][c]["weights"]}
            metrics = [_metrics(run[c]["test_acc"], run[c]["test_loss"], run[c]["train_acc"], run[c]["train_loss"],
                                all(bool(torch.isfinite(w).all()) for w in run[c]["weights"].values()))
                       for run in runs]
            snaps.append(_Snapshot(epoch, epoch * self.cfg.steps_per_epoch, params, metrics))
        return snaps

    def weight_spaces(self, params: dict[str, torch.Tensor]) -> WeightSpace:
        return stacked_weight_spaces(self.template, params, len(self.members))


def _metrics(test_acc, test_loss, train_acc, train_loss, weights_finite: bool) -> dict:
    """A checkpoint's record of metrics; a non-finite loss is stored as None and marks it not finite."""
    test_loss, train_loss = float(test_loss), float(train_loss)
    return {"test_acc": float(test_acc), "test_loss": test_loss if math.isfinite(test_loss) else None,
            "train_acc": float(train_acc), "train_loss": train_loss if math.isfinite(train_loss) else None,
            "finite": weights_finite and math.isfinite(test_loss)}


def stacked_weight_spaces(template: nn.Module, params: dict[str, torch.Tensor], n_members: int) -> WeightSpace:
    """Stacked canonical weight spaces ``[M, ...]`` of stacked parameters (via the core's `bind`)."""
    binding = zoo_binding(template)
    spaces = []
    named = dict(template.named_parameters())
    with torch.no_grad():
        for j in range(n_members):
            for n, p in named.items():
                p.copy_(params[n][j])
            spaces.append(binding.read())
    return WeightSpace.stack(spaces)


def train_one_by_one(cfg: ZooConfig, task: TaskData, member: Member, threads: int | None = None) -> list[dict]:
    """The plain baseline: one ``nn.Module`` with a ``torch.optim`` optimizer, same data and schedule as a
    batched member (for the throughput benchmark and to check the batched trainer). Returns the metrics
    at each checkpoint epoch."""
    model = _fresh_model(cfg, member)
    opt = torch_optimizer(member.hparams["optimizer"], model, member.hparams["lr"], member.hparams["weight_decay"])
    subset = task.member_subset(cfg, member)
    sampler = _BatchSampler(cfg, [member], [subset])
    x_train, x_test = task.inputs(member.arch)
    y_train, y_test = task.data.train_y, task.test_y
    torch.manual_seed(_seed(cfg.seed, member.id, "dropout"))
    out, epoch = [], 0
    for target in sorted(cfg.checkpoint_epochs):
        model.train()
        for _ in range((target - epoch) * cfg.steps_per_epoch):
            idx = sampler.next()[0]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
        epoch = target
        model.eval()
        with torch.no_grad():
            correct, loss = 0.0, 0.0
            for sl in _chunks(len(y_test), 256):
                logits = model(x_test[sl])
                loss += float(F.cross_entropy(logits, y_test[sl], reduction="sum"))
                correct += float((logits.argmax(-1) == y_test[sl]).sum())
            idx = subset[: min(cfg.eval_train_size, len(subset))]
            logits = model(x_train[idx])
            out.append({
                "epoch": target,
                "test_acc": correct / len(y_test),
                "test_loss": loss / len(y_test),
                "train_acc": float((logits.argmax(-1) == y_train[idx]).float().mean()),
                "train_loss": float(F.cross_entropy(logits, y_train[idx])),
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            })
    return out


# ---------------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------------
def spec_to_dict(spec: WeightSpaceSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["tensors"] = [dataclasses.asdict(t) for t in spec.tensors]
    return d


def spec_from_dict(d: dict) -> WeightSpaceSpec:
    d = dict(d)
    tensors = tuple(
        TensorSpec(name=t["name"], axes=tuple(t["axes"]), shape=tuple(t["shape"]), block=t["block"], role=t["role"])
        for t in d.pop("tensors")
    )
    return WeightSpaceSpec(**d, tensors=tensors)


def _atomic_write_bytes(path: Path, data: bytes, tmp_tag: str = "") -> None:
    tmp = path.with_name(f".tmp{tmp_tag}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: Path, ws: WeightSpace, records: list[dict], zoo_name: str, tmp_tag: str = "") -> None:
    """One shard, atomically: safetensors with the weight-space tensors ``[rows, ...]`` and, in its header,
    the metadata JSON (format, zoo, spec, one record per row)."""
    from safetensors.torch import save

    if ws.batch_shape != (len(records),):
        raise ValueError(f"{len(records)} records for a weight space of batch shape {ws.batch_shape}")
    meta = {
        "format": SHARD_FORMAT,
        "zoo": zoo_name,
        "spec": json.dumps(spec_to_dict(ws.spec)),
        "records": json.dumps(records),
    }
    blob = save({k: v.contiguous() for k, v in ws.items()}, metadata=meta)
    _atomic_write_bytes(path, blob, tmp_tag)


def read_shard_header(path: Path) -> dict:
    """The shard's metadata (spec, records), after checking the file is a complete safetensors file.

    Raises `ZooError` naming the file if it is truncated, not safetensors, or not a zoo shard.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + n + end != size:
            raise ValueError(f"file has {size} bytes, its header describes {8 + n + end} (truncated or padded)")
        if meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"not a zoo shard (format {meta.get('format')!r}, expected {SHARD_FORMAT!r})")
        spec = spec_from_dict(json.loads(meta["spec"]))
        records = json.loads(meta["records"])
        for t in spec.tensors:
            if t.name not in header:
                raise ValueError(f"tensor {t.name!r} of the spec is missing")
            shape = tuple(header[t.name]["shape"])
            if shape != (len(records), *t.shape):
                raise ValueError(f"tensor {t.name!r} has shape {shape}, expected {(len(records), *t.shape)}")
    except ZooError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to read means the shard is unusable
        raise ZooError(f"corrupt zoo shard {path}: {err}") from err
    return {"zoo": meta.get("zoo"), "spec": spec, "records": records}


def read_shard(path: Path) -> tuple[WeightSpace, list[dict]]:
    header = read_shard_header(path)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        ws = WeightSpace(header["spec"], {t.name: tensors[t.name] for t in header["spec"].tensors})
    except Exception as err:  # noqa: BLE001
        raise ZooError(f"corrupt zoo shard {path}: {err}") from err
    return ws, header["records"]


def shard_paths(root: Path) -> list[Path]:
    return sorted((root / "shards").glob("shard-*.safetensors"))


def scan_shards(root: Path, on_corrupt: str = "raise") -> dict[Path, dict]:
    """Headers of all committed shards. ``on_corrupt``: "raise" (default) or "quarantine" (rename the file
    to ``*.corrupt`` and report it, so that its members are trained again)."""
    out: dict[Path, dict] = {}
    for path in shard_paths(root):
        try:
            out[path] = read_shard_header(path)
        except ZooError as err:
            if on_corrupt != "quarantine":
                raise ZooError(
                    f"{err}. Delete or move {path.name} and rerun the build to train its members again "
                    "(or pass --rebuild-corrupt)"
                ) from None
            bad = path.with_name(path.name + ".corrupt")
            os.replace(path, bad)
            print(f"[zoo] corrupt shard {path.name} moved to {bad.name}; its members will be trained again: {err}",
                  file=sys.stderr)
    return out


def finished_members(headers: dict[Path, dict]) -> dict[int, Path]:
    """member id -> shard, checking that no member is in two shards."""
    done: dict[int, Path] = {}
    for path, h in headers.items():
        for mid in sorted({r["member"] for r in h["records"]}):
            if mid in done:
                raise ZooError(f"member {mid} is in two shards: {done[mid].name} and {path.name}; remove one")
            done[mid] = path
    return done


# ---------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------
def _load_data(cfg: ZooConfig):
    from ..data import load_dataset

    return load_dataset(cfg.dataset, **cfg.dataset_kwargs)


def _check_config(root: Path, cfg: ZooConfig) -> None:
    path = root / "zoo.json"
    if path.exists():
        try:
            old = ZooConfig.from_json(path.read_text())
        except Exception as err:  # noqa: BLE001
            raise ZooError(f"{path} is not a readable zoo config: {err}") from err
        a, b = old.identity(), cfg.identity()
        if a != b:
            diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            raise ZooError(
                f"{root} holds a zoo built with a different config (fields {diff} differ); use another output "
                "folder or the same config (only n_members, members_per_batch and threads may change)"
            )
        if old.n_members > cfg.n_members:
            warnings.warn(f"{root}: the zoo was planned with {old.n_members} members, building {cfg.n_members}")
    _atomic_write_bytes(path, cfg.to_json().encode(), tmp_tag=f"-{os.getpid()}")


def _trains_alone(member: Member) -> bool:
    """Whether the member's optimizer needs its model (`SequentialTrainer`); batches never mix the two kinds."""
    return member.hparams["optimizer"] in SEQUENTIAL_OPTIMIZERS


def _batches(members: list[Member], size: int) -> list[list[Member]]:
    groups: dict[tuple, list[Member]] = {}
    for m in sorted(members, key=lambda m: m.id):
        groups.setdefault(m.group_key() + (("sequential",) if _trains_alone(m) else ()), []).append(m)
    out = []
    for key in sorted(groups, key=str):
        ms = groups[key]
        n = math.ceil(len(ms) / size)  # balance the batches of a group
        per = math.ceil(len(ms) / n)
        out += [ms[i : i + per] for i in range(0, len(ms), per)]
    return out


def _records(cfg: ZooConfig, data_name: str, members: list[Member], snaps: list[_Snapshot]) -> list[dict]:
    rows = []
    for j, m in enumerate(members):
        for s in snaps:
            rows.append({
                "zoo": cfg.name,
                "dataset": data_name,
                "member": m.id,
                "epoch": s.epoch,
                "step": s.step,
                "samples_seen": s.step * cfg.batch_size,
                "arch_key": m.arch_key,
                "arch": m.arch,
                **m.hparams,
                "batch_size": cfg.batch_size,
                **s.metrics[j],
            })
    return rows


def write_index(root: Path) -> dict:
    """Rewrite ``manifest.json`` (finished members -> shard) and ``metadata.jsonl`` from the shards."""
    headers = scan_shards(root)
    done = finished_members(headers)
    manifest = {
        "format": "nfn-plugins-zoo/1",
        "n_members": len(done),
        "n_checkpoints": sum(len(h["records"]) for h in headers.values()),
        "shards": [
            {"file": p.name, "members": sorted({r["member"] for r in h["records"]}), "n_checkpoints": len(h["records"])}
            for p, h in headers.items()
        ],
        "members": {str(k): v.name for k, v in sorted(done.items())},
    }
    _atomic_write_bytes(root / "manifest.json", json.dumps(manifest, indent=1).encode(), f"-{os.getpid()}")
    lines = []
    for p, h in headers.items():
        for row, r in enumerate(h["records"]):
            lines.append(json.dumps({**r, "shard": p.name, "row": row}))
    _atomic_write_bytes(root / "metadata.jsonl", ("\n".join(lines) + "\n").encode(), f"-{os.getpid()}")
    return manifest


def _partial_state():
    """accelerate's `PartialState` when launched with several processes (``accelerate launch``,
    ``torchrun``), else None: a single process needs nothing from it (and skips importing it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=True)


def build_zoo(
    cfg: ZooConfig,
    out: str | os.PathLike,
    progress: bool = True,
    rebuild_corrupt: bool = False,
    data=None,
    log: Callable[[str], None] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict:
    """Build (or finish) the zoo ``cfg`` in folder ``out``; returns a summary of this process's work.

    Resumable: members already in a shard are skipped. Under ``accelerate launch`` this process trains
    the members ``i`` with ``i % world_size == rank`` (from accelerate's `PartialState`) and the main
    process writes the index when all are done. ``rank`` / ``world_size`` given explicitly: no
    synchronisation, this call writes the index of whatever is finished when it ends. ``data``: an
    already loaded `nfn_plugins.data.Dataset` (default: load ``cfg.dataset``).
    """
    cfg.validate()
    root = Path(out)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    if rank is not None or world_size is not None:
        state, rank, world = None, rank or 0, world_size or 1
        if not 0 <= rank < world:
            raise ZooError(f"rank {rank} is outside 0..{world - 1}")
    else:
        state = _partial_state()
        rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    log = log or (lambda s: print(f"[zoo rank {rank}/{world}] {s}", file=sys.stderr, flush=True))
    # One thread per process by default: the batched ops are large enough for one core, and on a shared
    # machine several OpenMP threads per process are slower (they wait for each other); use
    # `accelerate launch --num_processes <cores>` to use more cores.
    threads = cfg.threads or 1
    torch.set_num_threads(threads)
    _check_config(root, cfg)
    for stale in (root / "shards").glob(f".tmp-r{rank}w*"):  # this rank's leftovers from a killed run
        stale.unlink(missing_ok=True)

    data = data if data is not None else _load_data(cfg)
    members = plan_members(cfg, data)
    headers = scan_shards(root, on_corrupt="quarantine" if rebuild_corrupt else "raise")
    done = finished_members(headers)
    mine = [m for m in members if m.id % world == rank]
    todo = [m for m in mine if m.id not in done]
    log(f"{cfg.name}: {len(mine)} members for this process, {len(mine) - len(todo)} already done, "
        f"{len(todo)} to train ({len(todo) * len(cfg.checkpoint_epochs)} checkpoints, {threads} threads)")
    task = TaskData(data, cfg)
    t0 = time.time()
    n_ckpt = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo) * len(cfg.checkpoint_epochs), desc=f"zoo {cfg.name}", unit="ckpt",
               disable=not progress, position=rank, dynamic_ncols=True)
    try:
        for batch in _batches(todo, cfg.members_per_batch):
            trainer = (SequentialTrainer if _trains_alone(batch[0]) else BatchTrainer)(cfg, task, batch)  # all or none
            snaps = trainer.run(on_checkpoint=bar.update)
            spaces = [trainer.weight_spaces(s.params) for s in snaps]  # [C] x [M, ...]
            # rows ordered member-major: member j, checkpoint c -> row j * C + c
            ws = WeightSpace.stack(spaces, dim=1).map(lambda x: x.reshape(-1, *x.shape[2:]))
            records = _records(cfg, data.name, batch, snaps)
            name = f"shard-m{batch[0].id:06d}-n{len(batch):03d}.safetensors"
            write_shard(root / "shards" / name, ws, records, cfg.name, tmp_tag=f"-r{rank}w{world}")
            n_ckpt += len(records)
    finally:
        bar.close()
    elapsed = time.time() - t0
    summary = {
        "rank": rank,
        "world_size": world,
        "members_trained": len(todo),
        "checkpoints_written": n_ckpt,
        "seconds": elapsed,
        "checkpoints_per_hour": n_ckpt / elapsed * 3600 if elapsed > 0 and n_ckpt else None,
    }
    if state is not None:
        state.wait_for_everyone()
    if rank == 0 or state is None:
        manifest = write_index(root)
        summary["zoo_members"] = manifest["n_members"]
        summary["zoo_checkpoints"] = manifest["n_checkpoints"]
        log(f"{cfg.name}: {manifest['n_members']} members, {manifest['n_checkpoints']} checkpoints in {root}")
    return summary


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------
class Zoo:
    """A built zoo: one record per checkpoint (hyperparameters, metrics, member, epoch), weights on demand.

    Records carry ``shard`` and ``row``; `weights` loads the stacked `WeightSpace` of any selection of
    records sharing one architecture. `split` divides by member (70/15/15 by default) so checkpoints of
    one training run never straddle two splits.
    """

    def __init__(self, root: Path, records: list[dict], specs: dict[str, WeightSpaceSpec], config: ZooConfig | None):
        self.root = Path(root)
        self.records = records
        self.specs = specs
        self.config = config
        self._cache: dict[str, WeightSpace] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Zoo":
        root = Path(path)
        if not (root / "shards").is_dir():
            raise ZooError(f"{root} is not a zoo folder (no shards/ subfolder)")
        headers = scan_shards(root)
        if not headers:
            raise ZooError(f"{root} holds no finished shards")
        finished_members(headers)  # raises on a member in two shards
        records, specs, seen = [], {}, {}
        for p, h in headers.items():
            for row, r in enumerate(h["records"]):
                key = (r["member"], r["epoch"])
                if key in seen:
                    raise ZooError(f"checkpoint member {key[0]} epoch {key[1]} is in {seen[key]} and in {p.name}")
                seen[key] = p.name
                ak = r["arch_key"]
                if ak in specs and specs[ak] != h["spec"]:
                    raise ZooError(f"{p.name}: architecture {ak} has a different weight-space spec than in other shards")
                specs[ak] = h["spec"]
                records.append({**r, "shard": p.name, "row": row})
        records.sort(key=lambda r: (r["member"], r["epoch"]))
        cfg = None
        if (root / "zoo.json").exists():
            cfg = ZooConfig.from_json((root / "zoo.json").read_text())
        return cls(root, records, specs, cfg)

    def _subset(self, records: list[dict]) -> "Zoo":
        z = Zoo(self.root, records, self.specs, self.config)
        z._cache = self._cache
        return z

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"Zoo({self.root}, {len(self.members)} members, {len(self)} checkpoints, archs={self.arch_keys})"

    @property
    def members(self) -> list[int]:
        return sorted({r["member"] for r in self.records})

    @property
    def arch_keys(self) -> list[str]:
        return sorted({r["arch_key"] for r in self.records})

    @property
    def archs(self) -> list[dict]:
        """The distinct architectures (``arch`` dicts), in `arch_keys` order."""
        first: dict[str, dict] = {}
        for r in self.records:
            first.setdefault(r["arch_key"], r["arch"])
        return [first[k] for k in self.arch_keys]

    @property
    def epochs(self) -> list[int]:
        return sorted({r["epoch"] for r in self.records})

    def filter(
        self,
        epoch: int | Sequence[int] | None = None,
        min_test_acc: float | None = None,
        arch_key: str | None = None,
        finite: bool | None = True,
        where: Callable[[dict], bool] | None = None,
    ) -> "Zoo":
        """Records matching all given conditions (``finite=True``: drop diverged checkpoints)."""
        epochs = None if epoch is None else ({epoch} if isinstance(epoch, int) else set(epoch))
        keep = [
            r for r in self.records
            if (epochs is None or r["epoch"] in epochs)
            and (min_test_acc is None or r["test_acc"] >= min_test_acc)
            and (arch_key is None or r["arch_key"] == arch_key)
            and (finite is None or r["finite"] == finite)
            and (where is None or where(r))
        ]
        return self._subset(keep)

    def split(self, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> tuple["Zoo", ...]:
        """Split by member: a seeded shuffle of the member ids cut at the given fractions."""
        if abs(sum(fractions) - 1) > 1e-6 or any(f < 0 for f in fractions):
            raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions}")
        ids = self.members
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
        cuts = [round(sum(fractions[:i]) * len(ids)) for i in range(len(fractions) + 1)]
        parts = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            chosen = {ids[i] for i in order[a:b]}
            parts.append(self._subset([r for r in self.records if r["member"] in chosen]))
        return tuple(parts)

    def labels(self, key: str = "test_acc") -> torch.Tensor:
        return torch.tensor([float("nan") if r[key] is None else r[key] for r in self.records], dtype=torch.float32)

    def at_class_frequency(self, data=None) -> torch.Tensor:
        """Per record: does its test accuracy equal one class's frequency in the evaluation subset? That is the
        score of a collapsed member, one that predicts the same class for every input (or, rarely, a
        coincidence). Such labels carry no sampling noise between members (`label_noise_ceiling`'s ``exact``).
        ``data``: the dataset the zoo was built on (default: load the one its config names)."""
        if self.config is None:
            raise ZooError(f"{self.root} has no zoo.json: the evaluation subset is unknown")
        test_y = TaskData(data if data is not None else _load_data(self.config), self.config).test_y
        freqs = torch.bincount(test_y).double() / len(test_y)
        labels = self.labels().double()
        return ((labels[:, None] - freqs[None, :]).abs() < 0.5 / len(test_y)).any(1)

    def _shard_weights(self, name: str) -> WeightSpace:
        if name not in self._cache:
            self._cache[name] = read_shard(self.root / "shards" / name)[0]
        return self._cache[name]

    def weights(self) -> WeightSpace:
        """The stacked weight spaces ``[len(self), ...]`` in record order (one architecture only)."""
        if not self.records:
            raise ZooError("no checkpoints selected")
        keys = self.arch_keys
        if len(keys) != 1:
            raise ZooError(f"the selection mixes architectures {keys}; select one with filter(arch_key=...)")
        by_shard: dict[str, list[int]] = {}
        for i, r in enumerate(self.records):
            by_shard.setdefault(r["shard"], []).append(i)
        parts, order = [], []
        for name, positions in by_shard.items():
            ws = self._shard_weights(name)
            rows = torch.tensor([self.records[i]["row"] for i in positions])
            parts.append(ws.map(lambda x, rows=rows: x[rows]))
            order += positions
        names = parts[0].spec.names
        cat = WeightSpace(parts[0].spec, {n: torch.cat([p[n] for p in parts]) for n in names})
        inverse = torch.argsort(torch.tensor(order))
        return cat.map(lambda x: x[inverse])

    def by_arch(self) -> dict[str, "Zoo"]:
        return {k: self.filter(arch_key=k, finite=None) for k in self.arch_keys}


def load_zoo(path: str | os.PathLike, finite_only: bool = True) -> tuple[WeightSpace, list[dict]]:
    """All checkpoints of a one-architecture zoo: (stacked `WeightSpace` [N, ...], one record per row).

    ``finite_only`` drops diverged checkpoints (non-finite weights or loss), with a warning saying how many.
    Corrupt shards raise `ZooError` naming the file. For multi-architecture zoos use `Zoo.open` and
    `Zoo.by_arch`.
    """
    zoo = Zoo.open(path)
    if finite_only:
        kept = zoo.filter(finite=True)
        if len(kept) < len(zoo):
            warnings.warn(f"{path}: {len(zoo) - len(kept)} of {len(zoo)} checkpoints diverged (non-finite) and are left out")
        zoo = kept
    return zoo.weights(), zoo.records
