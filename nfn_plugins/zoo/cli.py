"""``nfn-plugins zoo ...``: build, inspect and verify transformer zoos.

    nfn-plugins zoo build --preset mnist-paper --out zoos/mnist-paper
    accelerate launch --multi_gpu --num_processes 2 -m nfn_plugins.cli zoo build --preset mnist-paper --out zoos/mnist-paper
    (``--multi_gpu`` is accelerate's multi-process launcher; on a CPU-only machine it starts CPU processes)
    nfn-plugins zoo info zoos/mnist-paper
    nfn-plugins zoo verify zoos/mnist-paper
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .build import OPTIMIZERS


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_parser(subparsers) -> None:
    zoo = subparsers.add_parser("zoo", help="build and inspect transformer zoos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = zoo.add_subparsers(dest="zoo_command", required=True)

    b = sub.add_parser("build", help="build (or finish) a zoo; rerun after an interruption to resume")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a named configuration (see `nfn-plugins zoo presets`)")
    src.add_argument("--config", type=Path, help="a zoo config JSON (as written to <out>/zoo.json)")
    b.add_argument("--out", type=Path, required=True, help="zoo folder (created; resumed if it exists)")
    b.add_argument("--members", type=int, help="number of members (overrides the config)")
    b.add_argument("--epochs", type=_ints, help="checkpoint epochs, e.g. 1,2,4")
    b.add_argument("--steps-per-epoch", type=int)
    b.add_argument("--batch-size", type=int)
    b.add_argument("--optimizers", type=_names,
                   help=f"optimizer grid, e.g. adam,sgd (from {', '.join(OPTIMIZERS)}; the config's grid must give "
                        "each its learning rates: the paper's has none for nfn, the learned optimizer, which the "
                        "mnist-paper-recipes preset has)")
    b.add_argument("--members-per-batch", type=int, help="members trained together (vmap batch)")
    b.add_argument("--eval-test-size", type=int)
    b.add_argument("--seed", type=int)
    b.add_argument("--threads", type=int, help="torch threads per process")
    b.add_argument("--rebuild-corrupt", action="store_true",
                   help="move corrupt shards aside (reported by name) and train their members again")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    b.set_defaults(func=_build)

    i = sub.add_parser("info", help="summary of a zoo: members, checkpoints, accuracy per epoch")
    i.add_argument("path", type=Path)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_info)

    v = sub.add_parser("verify", help="read every shard fully; report corrupt ones by name")
    v.add_argument("path", type=Path)
    v.set_defaults(func=_verify)

    p = sub.add_parser("presets", help="list the named zoo configurations")
    p.add_argument("name", nargs="?", help="print this preset's full config")
    p.set_defaults(func=_presets)


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _resolve(args):
    from .build import ZooConfig
    from .presets import preset

    if args.preset:
        cfg = preset(args.preset)
    else:
        try:
            cfg = ZooConfig.from_json(args.config.read_text())
        except FileNotFoundError:
            raise ValueError(f"config file {args.config} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {args.config} is not valid JSON: {err}") from None
    overrides = {
        "n_members": args.members,
        "checkpoint_epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size,
        "members_per_batch": args.members_per_batch,
        "eval_test_size": args.eval_test_size,
        "seed": args.seed,
        "threads": args.threads,
    }
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    if args.optimizers is not None:
        cfg.grid.optimizer = args.optimizers
    cfg.validate()
    return cfg


def _build(args) -> int:
    from ..data import DataUnavailableError
    from .build import ZooError, build_zoo

    try:
        cfg = _resolve(args)
        if args.print_config:
            print(cfg.to_json())
            return 0
        summary = build_zoo(cfg, args.out, progress=not args.no_progress, rebuild_corrupt=args.rebuild_corrupt)
    except (ZooError, DataUnavailableError, ValueError, KeyError) as err:
        return _fail(err)
    print(json.dumps(summary))
    return 0


def _info(args) -> int:
    from .build import Zoo, ZooError

    try:
        zoo = Zoo.open(args.path)
    except ZooError as err:
        return _fail(err)
    per_epoch = {}
    for e in zoo.epochs:
        sel = zoo.filter(epoch=e, finite=None)
        acc = sorted(r["test_acc"] for r in sel.records)
        per_epoch[e] = {
            "checkpoints": len(sel),
            "diverged": sum(not r["finite"] for r in sel.records),
            "test_acc_min": acc[0],
            "test_acc_median": acc[len(acc) // 2],
            "test_acc_max": acc[-1],
        }
    info = {
        "path": str(args.path),
        "name": zoo.config.name if zoo.config else None,
        "members": len(zoo.members),
        "checkpoints": len(zoo),
        "architectures": zoo.arch_keys,
        "planned_members": zoo.config.n_members if zoo.config else None,
        "epochs": per_epoch,
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['path']}: zoo {info['name']!r}, {info['members']} of {info['planned_members']} members, "
          f"{info['checkpoints']} checkpoints, {len(info['architectures'])} architecture(s)")
    for e, s in per_epoch.items():
        print(f"  epoch {e:>3}: {s['checkpoints']} checkpoints ({s['diverged']} diverged), test accuracy "
              f"min {s['test_acc_min']:.3f} / median {s['test_acc_median']:.3f} / max {s['test_acc_max']:.3f}")
    return 0


def _verify(args) -> int:
    from .build import ZooError, finished_members, read_shard, scan_shards, shard_paths

    bad = []
    for path in shard_paths(args.path):
        try:
            read_shard(path)
        except ZooError as err:
            bad.append(str(err))
    if bad:
        for b in bad:
            print(b, file=sys.stderr)
        return 1
    try:
        n = len(finished_members(scan_shards(args.path)))
    except ZooError as err:
        return _fail(err)
    leftovers = sorted(p.name for p in (Path(args.path) / "shards").glob(".tmp*"))
    print(f"{args.path}: {len(shard_paths(args.path))} shards OK, {n} members"
          + (f"; unfinished temp files (removed by the next build): {leftovers}" if leftovers else ""))
    return 0


def _presets(args) -> int:
    from .presets import PRESETS, preset

    if args.name:
        try:
            print(preset(args.name).to_json())
        except KeyError as err:
            return _fail(err)
        return 0
    for name, cfg in PRESETS.items():
        archs = sorted({a["family"] for a in cfg.archs})
        print(f"{name:14s} {cfg.dataset:14s} {'/'.join(archs):6s} {cfg.n_members:5d} members x "
              f"{len(cfg.checkpoint_epochs)} checkpoints = {cfg.n_checkpoints}")
    return 0
