"""`nfn-plugins predictor fit`: train an `AccuracyPredictor` on one or more zoos and save it.

The recipe behind the shipped predictors (see recipes/README.md). Members are split 85/15 into
train/validation (by member, so no checkpoint of a validation member is seen in training); the
validation metrics are printed per epoch and stored with the weights. Under ``accelerate launch`` each
process trains on its share of the mini-batches (DDP).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .predictor import AccuracyPredictor, FitConfig, PredictorConfig, as_groups


def _accelerator():
    """An `accelerate.Accelerator` when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # the NFN has parameters for tensors a family lacks (e.g. gates); DDP must not wait for their gradients
    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _run(args: argparse.Namespace) -> int:
    from .zoo import Zoo

    if args.threads:
        torch.set_num_threads(args.threads)
    train, val, names = [], [], []
    for path in args.zoo:
        zoo = Zoo.open(path)
        names.append(zoo.config.name if zoo.config else Path(path).name)
        zoo = zoo.filter(finite=True)
        if args.epoch:
            zoo = zoo.filter(epoch=args.epoch)
        if not len(zoo):
            raise SystemExit(f"{path}: no finite checkpoints{f' at epoch {args.epoch}' if args.epoch else ''}")
        t, v = zoo.split((0.85, 0.15), seed=args.seed)
        train += as_groups(t)
        val += as_groups(v)
    accelerator = _accelerator()
    model = AccuracyPredictor(PredictorConfig(scale_head_layers=args.scale_head_layers))
    history = model.fit(train, val, FitConfig(epochs=args.epochs, seed=args.seed), accelerator=accelerator)
    if accelerator is None or accelerator.is_main_process:
        kept = next((r for r in history if r.get("best")), history[-1])  # the epoch whose weights are kept
        zoos = ", ".join(names)
        summary = (f"trained on zoo(s) {zoos}{f', epoch {args.epoch}' if args.epoch else ', all epochs'}; "
                   f"validation Kendall tau {kept['val_kendall_tau']:.3f}, L1 {kept['val_l1']:.3f}")
        model.save_pretrained(args.out, summary=summary, zoos=zoos, epochs=args.epochs, seed=args.seed,
                              history=history)
        print(f"[predictor] saved to {args.out}: {summary}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predictor", help="the accuracy predictor")
    sub = p.add_subparsers(dest="predictor_command", required=True)
    f = sub.add_parser("fit", help="train an AccuracyPredictor on zoos and save it (safetensors + JSON)")
    f.add_argument("--zoo", action="append", required=True, help="zoo folder (repeatable)")
    f.add_argument("--out", type=Path, required=True, help="output directory")
    f.add_argument("--epoch", type=int, help="use only this checkpoint epoch (default: all)")
    f.add_argument("--epochs", type=int, default=20, help="training epochs")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, help="torch threads per process")
    f.add_argument("--scale-head-layers", type=int, default=PredictorConfig().scale_head_layers,
                   help="a head on the log-norms alone (PredictorConfig.scale_head_layers; 0: none)")
    f.set_defaults(func=_run)
