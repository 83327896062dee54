"""`nfn-plugins predictor fit | evaluate`: train an `AccuracyPredictor` on zoos and save it; score one on a zoo.

``fit`` is the recipe behind the shipped predictors (see recipes/README.md). Members are split 85/15 into
train/validation (by member, so no checkpoint of a validation member is seen in training); the
validation metrics are printed per epoch and stored with the weights. Under ``accelerate launch`` each
process trains on its share of the mini-batches (DDP).

``evaluate`` scores a saved or shipped predictor on a zoo. On a zoo it was fitted on, it scores only the
members that fit held out (the split is rebuilt from the seed stored with the weights): a score on its own
training members would say nothing.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .checkpoints import write_json_atomic
from .predictor import AccuracyPredictor, FitConfig, PredictorConfig, as_groups, collapsed_masks


def _accelerator():
    """An `accelerate.Accelerator` when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # the NFN has parameters for tensors a family lacks (e.g. gates); DDP must not wait for their gradients
    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


FIT_SPLIT = (0.85, 0.15)


def _finite_zoo(path: str, epoch: int | None):
    """(the zoo's name, its finite checkpoints, of one epoch if given); refuses an empty selection."""
    from .zoo import Zoo

    zoo = Zoo.open(path)
    name = zoo.config.name if zoo.config else Path(path).name
    zoo = zoo.filter(finite=True, epoch=epoch or None)
    if not len(zoo):
        raise SystemExit(f"{path}: no finite checkpoints{f' at epoch {epoch}' if epoch else ''}")
    return name, zoo


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val, names, collapsed, classes, archs = [], [], [], [], set(), {}
    for path in args.zoo:
        name, zoo = _finite_zoo(path, args.epoch)
        names.append(name)
        t, v = zoo.split(FIT_SPLIT, seed=args.seed)
        train += as_groups(t)
        val += as_groups(v)
        if args.collapse_head:
            collapsed += collapsed_masks(t)
            classes |= {r["arch"]["n_classes"] for r in zoo.records}
        if args.probes:  # the architectures the probes run
            archs.update((json.dumps(a, sort_keys=True), a) for a in zoo.archs)
    if len(classes) > 1:
        raise SystemExit(f"--collapse-head reads one classifier output size; these zoos have {sorted(classes)} classes")
    accelerator = _accelerator()
    torch.manual_seed(args.seed)  # the initial weights: a rerun of a recipe gives the same predictor, bit for bit
    model = AccuracyPredictor(PredictorConfig(scale_head_layers=args.scale_head_layers,
                                              n_classes=classes.pop() if classes else 0, probes=args.probes,
                                              probe_archs=list(archs.values()) or None))
    history = model.fit(train, val, FitConfig(epochs=args.epochs, seed=args.seed), accelerator=accelerator,
                        collapsed=collapsed if args.collapse_head else None)
    if accelerator is None or accelerator.is_main_process:
        kept = next((r for r in history if r.get("best")), history[-1])  # the epoch whose weights are kept
        zoos = ", ".join(names)
        summary = (f"trained on zoo(s) {zoos}{f', epoch {args.epoch}' if args.epoch else ', all epochs'}; "
                   f"validation Kendall tau {kept['val_kendall_tau']:.3f}, L1 {kept['val_l1']:.3f}")
        model.save_pretrained(args.out, summary=summary, zoos=zoos, epochs=args.epochs, seed=args.seed,
                              fit_epoch=args.epoch, history=history)
        print(f"[predictor] saved to {args.out}: {summary}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = AccuracyPredictor.from_pretrained(args.predictor)
    fitted_on = predictor.meta.get("zoos", "").split(", ")
    results = []
    for path in args.zoo:
        name, zoo = _finite_zoo(path, None)
        held_out_by_fit = name in fitted_on
        if held_out_by_fit:  # the members its fit kept for validation: the same split of the same selection
            fit_epoch = predictor.meta.get("fit_epoch")
            fit_view = zoo.filter(epoch=fit_epoch) if fit_epoch else zoo
            kept = set(fit_view.split(FIT_SPLIT, seed=predictor.meta.get("seed", 0))[1].members)
            zoo = zoo.filter(where=lambda r, kept=kept: r["member"] in kept)
        zoo = zoo.filter(epoch=args.epoch, min_test_acc=args.min_test_acc)
        if len(zoo) < 2:
            raise SystemExit(f"{path}: {len(zoo)} checkpoint(s) left after the epoch / --min-test-acc selection; "
                             "ranking needs at least 2")
        report = {"zoo": name, "checkpoints": len(zoo), "members": len(zoo.members),
                  "held_out_by_fit": held_out_by_fit, **predictor.evaluate(zoo)}
        results.append(report)
        scope = "members its fit held out" if held_out_by_fit else "all members (not fitted on this zoo)"
        print(f"[predictor] {name}: {report['checkpoints']} checkpoints of {report['members']} {scope}: "
              f"Kendall tau {report['kendall_tau']:.3f}, R2 {report['r2']:.3f}, L1 {report['l1']:.3f}")
    if args.json:
        write_json_atomic(args.json, results)
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
    f.add_argument("--collapse-head", action="store_true",
                   help="rank members that predict one class by the class their output bias picks "
                        "(PredictorConfig.n_classes, set from the zoo)")
    f.add_argument("--probes", type=int, default=0,
                   help="also read the members' outputs on this many learned probe images (PredictorConfig.probes; "
                        "image zoos; the saved predictor then reads only the zoos' architectures)")
    f.set_defaults(func=_run)
    e = sub.add_parser("evaluate", help="score a saved or shipped predictor on zoos (Kendall tau, R2, L1)")
    e.add_argument("--predictor", required=True, help="a directory or a shipped name "
                   f"({', '.join(AccuracyPredictor.available())})")
    e.add_argument("--zoo", action="append", required=True, help="zoo folder (repeatable)")
    e.add_argument("--epoch", type=int, help="only this checkpoint epoch (default: all)")
    e.add_argument("--min-test-acc", type=float, help="only checkpoints at least this accurate (a cut-off)")
    e.add_argument("--json", type=Path, help="also write the reports here")
    e.add_argument("--threads", type=int, help="torch threads")
    e.set_defaults(func=_evaluate)
