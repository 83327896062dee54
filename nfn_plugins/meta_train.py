"""Meta-training the learned optimizer (`LearnedUpdate`) with truncated unrolls, on CPU.

Tasks: small transformers with random width, heads, depth, learning rate and seed, from the families in
``MetaConfig.families``: Hugging Face ViTs (residual, pre-LN) on MNIST; the paper's residual-free zoo transformer on
MNIST (whose early plateau at the uniform prediction an update meta-trained on ViTs alone can fail to leave);
Hugging Face BERTs (post-LN, token-embedding tables) on passages of party-convention speeches (text, a corpus the
benchmark's held-out text tasks do not use). Each task is trained for a random number of steps in truncations of
``unroll`` steps; after each truncation the learned update takes one meta-gradient step on the mean log training
loss of that truncation. Past ``dense_steps`` steps into a task only every ``sparse_every``-th truncation
does; the others only advance the task (no graph, no meta-gradient), so long tasks reach late training,
where an update meta-trained on short runs stalls, at less cost. Gradients of the task loss are treated
as inputs (first-order meta-gradient, no second derivatives); the meta-gradient flows through the weight
trajectory and the NFN's corrections. The inner step is `optim.block_update`, the very function
`NFNOptimizer.step` runs.

    nfn-plugins optim meta-train --out runs/lopt --minutes 50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from .checkpoints import write_json_atomic
from .extract import Binding, bind
from .optim import BASE_DIRECTIONS, LearnedUpdate, block_update
from .weight_space import WeightSpace


@dataclass
class MetaConfig:
    minutes: float = 50.0
    max_truncations: int = 100_000
    unroll: int = 8
    task_steps: tuple[int, int] = (40, 240)  # each task trains for a random number of steps in this range
    dense_steps: int = 240  # a meta-gradient step after every truncation up to this many steps into a task,
    sparse_every: int = 4  # and after every sparse_every-th truncation beyond (the others only advance it)
    widths: tuple[int, ...] = (16, 24, 32)
    heads: tuple[int, ...] = (2, 4)
    depths: tuple[int, ...] = (1, 2)
    families: tuple[str, ...] = ("vit",)  # model families of the tasks, drawn uniformly (see TASK_FAMILIES)
    lr_range: tuple[float, float] = (3e-4, 3e-3)
    base_direction: str = "adam"  # the base step the correction learns to improve (see NFNOptimizer)
    nesterov: bool = True  # Muon's Nesterov momentum (no effect on the Adam base)
    batch_size: int = 64
    train_subset: int = 20_000
    meta_lr: float = 3e-3
    channels: int = 8
    hidden: int = 16
    n_layers: int = 2  # equivariant layers of the learned update (1 cuts the NFN's share of a step by ~40%)
    checkpoint_every: int = 50
    seed: int = 0
    init: str | None = None  # start from this learned update (a directory or shipped name)


TASK_DATASETS = {"vit": "mnist", "paper": "mnist", "bert": "convention_speeches"}  # each family's training data
TASK_FAMILIES = tuple(TASK_DATASETS)
TEXT_LEN, TEXT_VOCAB = 16, 2000  # text tasks' passage length and vocabulary (also the benchmark's val-text tasks)


def _make_model(family: str, d: int, h: int, depth: int) -> tuple[nn.Module, Callable]:
    """A fresh task model: a HF ViT (patch 7), the paper's residual-free transformer (4x4 patches, MLP 2d) or a HF
    BERT (MLP 2d), and ``logits(model, params, inputs)`` for it (the one place that knows each family's call)."""
    from .zoo.models import PaperConfig, PaperTransformer, make_bert, make_vit

    if family == "vit":
        return (make_vit(d_model=d, n_heads=h, n_blocks=depth),
                lambda m, params, x: functional_call(m, params, (), {"pixel_values": x}).logits)
    if family == "bert":
        return (make_bert(vocab_size=TEXT_VOCAB, max_len=TEXT_LEN, d_model=d, n_heads=h, n_blocks=depth),
                lambda m, params, x: functional_call(m, params, (), {"input_ids": x,
                                                                    "attention_mask": (x != 0).long()}).logits)
    return (PaperTransformer(PaperConfig(d_model=d, n_heads=h, mlp_width=2 * d, n_blocks=depth, classifier_width=d)),
            lambda m, params, x: functional_call(m, params, (x,)))


class Task:
    """One inner problem: a fresh small transformer on its family's data, its canonical weights, Adam moments and
    head covariances."""

    def __init__(self, cfg: MetaConfig, data: dict[str, tuple[torch.Tensor, torch.Tensor]], gen: torch.Generator):
        pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
        self.d, self.h, self.depth = pick(cfg.widths), pick(cfg.heads), pick(cfg.depths)
        lo, hi = math.log(cfg.lr_range[0]), math.log(cfg.lr_range[1])
        self.lr = math.exp(lo + (hi - lo) * float(torch.rand((), generator=gen)))
        self.steps = int(torch.randint(cfg.task_steps[0], cfg.task_steps[1] + 1, (1,), generator=gen))
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        # a one-family run draws nothing here, so the ViT-only recipe's task sequence is unchanged
        self.family = pick(cfg.families) if len(cfg.families) > 1 else cfg.families[0]
        self.model, self.logits = _make_model(self.family, self.d, self.h, self.depth)
        self.binding: Binding = bind(self.model)
        self.frozen = {n for n, h in self.binding.outer.items() if not h.param.requires_grad}  # the paper's positions
        self.weights = self.binding.read()
        zeros = self.weights.map(torch.zeros_like)
        self.m, self.v = zeros, zeros
        self.head_cov: dict[str, torch.Tensor] = {}
        self.t = 0
        self.data, self.gen, self.batch_size = data[TASK_DATASETS[self.family]], gen, cfg.batch_size
        self.base_direction, self.nesterov = cfg.base_direction, cfg.nesterov

    def loss(self, weights: WeightSpace) -> torch.Tensor:
        x, y = self.data
        idx = torch.randint(len(y), (self.batch_size,), generator=self.gen)
        params = {h.name: p for h, p in self.binding.to_parameters(weights)}
        return nn.functional.cross_entropy(self.logits(self.model, params, x[idx]), y[idx])

    def step(self, learned: LearnedUpdate | None, weights: WeightSpace,
             track: bool = True) -> tuple[WeightSpace, torch.Tensor]:
        """One training step from ``weights``; returns the new weights and the loss at ``weights``.
        ``track=False``: no graph from the new weights to ``learned`` (a step that only advances the task)."""
        loss = self.loss(weights)
        leaves = [weights[n] for n in weights.spec.names]
        grads = torch.autograd.grad(loss, leaves, retain_graph=track)
        grads = WeightSpace(weights.spec, {n: g.detach() for n, g in zip(weights.spec.names, grads)})
        self.t += 1
        with torch.set_grad_enabled(track):
            new_blocks, m, v, self.head_cov = block_update(learned, weights, grads, self.m, self.v, self.head_cov,
                                                           self.t, self.lr, (0.9, 0.999), 1e-8, 0.0,
                                                           base_direction=self.base_direction, nesterov=self.nesterov)
        new = {**{n: weights[n] for n in self.frozen}, **new_blocks}  # frozen tensors never move
        m_all, v_all = dict(self.m.tensors), dict(self.v.tensors)
        m_all.update({n: x.detach() for n, x in m.items()})
        v_all.update({n: x.detach() for n, x in v.items()})
        for name in weights.spec.names:  # outer tensors: plain Adam (what the base optimizer does)
            if name in new:
                continue
            g = grads[name]
            m_all[name] = 0.9 * self.m[name] + 0.1 * g
            v_all[name] = 0.999 * self.v[name] + 0.001 * g.square()
            m_hat, v_hat = m_all[name] / (1 - 0.9**self.t), v_all[name] / (1 - 0.999**self.t)
            new[name] = weights[name] - self.lr * m_hat / (v_hat.sqrt() + 1e-8)
        self.m, self.v = WeightSpace(weights.spec, m_all), WeightSpace(weights.spec, v_all)
        return WeightSpace(weights.spec, new), loss


def _load_train(cfg: MetaConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The first ``train_subset`` training examples of each dataset the configured families train on."""
    from .data import load_dataset

    options = {"convention_speeches": {"max_len": TEXT_LEN, "vocab_size": TEXT_VOCAB}}
    data = {}
    for name in sorted({TASK_DATASETS[f] for f in cfg.families}):
        ds = load_dataset(name, **options.get(name, {}))
        data[name] = ds.train_x[: cfg.train_subset], ds.train_y[: cfg.train_subset]
    return data


def meta_train(out: str | os.PathLike, cfg: MetaConfig | None = None, progress: bool = True) -> LearnedUpdate:
    """Meta-train and write ``out/learned`` (the shipped format), resuming from ``out`` if it holds a run."""
    cfg = cfg or MetaConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    learned = (LearnedUpdate.from_pretrained(cfg.init) if cfg.init
               else LearnedUpdate(channels=cfg.channels, hidden=cfg.hidden, n_layers=cfg.n_layers))
    learned.meta = {}  # an init's validated lr, horizon and base step belong to it, not to what training makes of it
    meta_opt = torch.optim.Adam(learned.parameters(), lr=cfg.meta_lr)
    state_file, log_file = out / "meta_state.pt", out / "log.jsonl"
    done, elapsed = 0, 0.0
    if state_file.exists():  # resume
        st = torch.load(state_file, weights_only=False)
        learned.load_state_dict(st["learned"])
        meta_opt.load_state_dict(st["meta_opt"])
        done, elapsed = st["truncations"], st["elapsed"]
        print(f"[meta] resuming after {done} truncations ({elapsed / 60:.1f} min)")
    data = _load_train(cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + done)
    start, task, trained = time.perf_counter() - elapsed, None, 0
    while done < cfg.max_truncations and (time.perf_counter() - start) < cfg.minutes * 60:
        if task is None or trained >= task.steps:
            task, trained = Task(cfg, data, gen), 0
        weights = task.weights.map(lambda x: x.detach().requires_grad_())
        if trained >= cfg.dense_steps and (trained // cfg.unroll) % cfg.sparse_every:  # only advance the task
            for _ in range(cfg.unroll):
                weights, _ = task.step(learned, weights, track=False)
                weights = weights.map(lambda x: x.detach().requires_grad_())
            task.weights = weights.map(lambda x: x.detach())
            trained += cfg.unroll
            continue
        losses = []
        for _ in range(cfg.unroll):
            weights, loss = task.step(learned, weights)
            losses.append(loss)
        meta_loss = torch.stack([torch.log(x) for x in losses[1:]]).mean()  # losses that depend on `learned`
        meta_opt.zero_grad()
        meta_loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(learned.parameters(), 1.0)
        if not torch.isfinite(meta_loss) or not torch.isfinite(grad_norm):  # never let one bad unroll poison the run
            print(f"[meta] non-finite meta-loss or gradient at truncation {done + 1}: update skipped, new task", flush=True)
            task = None
            done += 1
            continue
        meta_opt.step()
        task.weights = weights.map(lambda x: x.detach())
        trained += cfg.unroll
        done += 1
        row = {"truncation": done, "minutes": (time.perf_counter() - start) / 60, "meta_loss": float(meta_loss.detach()),
               "task": f"{task.family}-D{task.d}-H{task.h}-L{task.depth}", "task_step": trained, "lr": task.lr,
               "gain_abs_mean": float(torch.tanh(learned.gain.detach()).abs().mean())}
        with open(log_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        if progress and done % 10 == 0:
            print(f"[meta] {done} truncations, {row['minutes']:.1f} min, meta loss {row['meta_loss']:.4f}, "
                  f"task {row['task']} step {trained}/{task.steps}, |gain| {row['gain_abs_mean']:.3f}", flush=True)
        if done % cfg.checkpoint_every == 0:
            _checkpoint(out, learned, meta_opt, done, time.perf_counter() - start, cfg)
    _checkpoint(out, learned, meta_opt, done, time.perf_counter() - start, cfg)
    return learned


def _checkpoint(out: Path, learned, meta_opt, done: int, elapsed: float, cfg: MetaConfig) -> None:
    tmp = out / ".meta_state.pt.tmp"
    torch.save({"learned": learned.state_dict(), "meta_opt": meta_opt.state_dict(), "truncations": done,
                "elapsed": elapsed}, tmp)
    os.replace(tmp, out / "meta_state.pt")
    learned.save_pretrained(out / "learned", truncations=done, minutes=elapsed / 60, meta_config=asdict(cfg))
    write_json_atomic(out / "status.json", {"truncations": done, "minutes": elapsed / 60})


def _min_max(text: str, flag: str, cast: type) -> tuple:
    """A ``MIN,MAX`` option with 0 < MIN <= MAX, or a clear error naming the flag."""
    try:
        lo, hi = (cast(x) for x in text.split(","))
    except ValueError:
        lo = hi = None
    if lo is None or not 0 < lo <= hi:
        raise SystemExit(f"{flag} must be MIN,MAX with 0 < MIN <= MAX, got {text!r}")
    return lo, hi


def _run(args: argparse.Namespace) -> int:
    if args.sparse_every < 1 or args.dense_steps < 0:
        raise SystemExit(f"--sparse-every must be >= 1 and --dense-steps >= 0, "
                         f"got {args.sparse_every} and {args.dense_steps}")
    cfg = MetaConfig(minutes=args.minutes, seed=args.seed, init=args.init, dense_steps=args.dense_steps,
                     sparse_every=args.sparse_every, n_layers=args.layers, base_direction=args.base_direction,
                     nesterov=args.nesterov)
    families = tuple(args.families.split(","))
    unknown = [f for f in families if f not in TASK_FAMILIES]
    if unknown:
        raise SystemExit(f"--families takes a comma-separated subset of {', '.join(TASK_FAMILIES)}, got {args.families!r}")
    cfg.families = families
    if args.lr_range:
        cfg.lr_range = _min_max(args.lr_range, "--lr-range", float)
    if args.task_steps:
        cfg.task_steps = _min_max(args.task_steps, "--task-steps", int)
    if args.max_truncations:
        cfg.max_truncations = args.max_truncations
    if args.threads:
        torch.set_num_threads(args.threads)
    meta_train(args.out, cfg)
    print(f"[meta] done: learned update in {Path(args.out) / 'learned'}")
    return 0


def add_parser(subparsers) -> None:
    optim = subparsers.add_parser("optim", help="the learned optimizer")
    sub = optim.add_subparsers(dest="optim_command", required=True)
    m = sub.add_parser("meta-train", help="meta-train the learned update (resumes if --out holds a run)")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--minutes", type=float, default=50.0)
    m.add_argument("--max-truncations", type=int)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int)
    m.add_argument("--init", help="start from this learned update (directory or shipped name)")
    m.add_argument("--task-steps", help="MIN,MAX training steps per task (default 40,240); longer tasks "
                   "meta-train for longer training runs")
    m.add_argument("--base-direction", choices=BASE_DIRECTIONS, default=MetaConfig.base_direction,
                   help="the base step under the learned correction (muon: orthogonalised momentum for the matrices)")
    m.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=MetaConfig.nesterov,
                   help="Nesterov momentum in the muon base (default on, as in Muon)")
    m.add_argument("--families", default=",".join(MetaConfig.families),
                   help=f"model families of the tasks, comma-separated: {', '.join(TASK_FAMILIES)} (paper: the "
                   "paper's residual-free transformer; bert: BERTs on convention speeches; default vit)")
    m.add_argument("--lr-range", help="MIN,MAX of the tasks' learning rates, sampled log-uniformly (default 3e-4,3e-3)")
    m.add_argument("--layers", type=int, default=MetaConfig.n_layers, help="equivariant layers of a new learned update")
    m.add_argument("--dense-steps", type=int, default=MetaConfig.dense_steps,
                   help="meta-gradient step after every truncation up to this many steps into a task")
    m.add_argument("--sparse-every", type=int, default=MetaConfig.sparse_every,
                   help="beyond --dense-steps, a meta-gradient step after every N-th truncation only")
    m.set_defaults(func=_run)

