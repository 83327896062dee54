"""Recipe: the project's transformer zoos (reproducible; resumable; see recipes/README.md).

    python recipes/build_zoo.py list
    python recipes/build_zoo.py show mnist-paper           # the full config, as JSON
    python recipes/build_zoo.py build mnist-paper --root zoos
    accelerate launch --multi_gpu --num_processes 2 recipes/build_zoo.py build mnist-paper --root zoos
    python recipes/build_zoo.py build all --root zoos

| zoo          | data                  | models                                   | members x checkpoints |
|--------------|-----------------------|------------------------------------------|-----------------------|
| mnist-paper  | MNIST                 | the paper's zoo transformer (D32, 2 blocks) | 416 x 5 = 2,080    |
| movies-paper | Rotten Tomatoes text  | the paper's zoo transformer, 2k-word vocab | 416 x 5 = 2,080     |
| mnist-vit    | MNIST                 | ViTForImageClassification, D 16-64, 2/4 heads, 1-3 blocks | 768 x 4 = 3,072 |
| movies-bert  | Rotten Tomatoes text  | BertForSequenceClassification, same grid  | 768 x 4 = 3,072      |
| mnist-paper-1k | MNIST               | mnist-paper's members and 608 more        | 1,024 x 5 = 5,120    |
| mnist-paper-long | MNIST             | mnist-paper's members 0-255, 3x longer    | 256 x 5 = 1,280      |
| mnist-paper-recipes | MNIST          | the paper's model, user-like recipes incl. the learned optimizer, batch 64 | 160 x 3 = 480 |

The configurations are the presets in ``nfn_plugins/zoo/presets.py`` (hyperparameter grid of the paper:
optimizer Adam / RMSprop / SGD / SGD+momentum, learning rate, init std, weight decay, train fraction,
dropout). Every member is fixed by ``(seed, member id)``, so a rerun, an interrupted-and-resumed run and a
multi-process run build the same members. ``build`` writes ``recipe.json`` (config, versions, git commit,
timings) next to the zoo and checks the finished zoo has every planned checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ZOOS = ("mnist-paper", "movies-paper", "mnist-vit", "movies-bert", "mnist-paper-1k", "mnist-paper-long",
        "mnist-paper-recipes")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build(name: str, root: Path, progress: bool = True) -> dict:
    import torch

    from nfn_plugins.zoo import Zoo, build_zoo
    from nfn_plugins.zoo.presets import preset

    cfg = preset(name)
    out = root / name
    t = time.time()
    summary = build_zoo(cfg, out, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:  # other processes of an accelerate launch are done
        return summary
    zoo = Zoo.open(out)
    missing = cfg.n_checkpoints - len(zoo)
    if missing:
        raise SystemExit(f"{out}: {missing} of {cfg.n_checkpoints} planned checkpoints are missing; rerun to finish")
    record = {
        "zoo": name,
        "config": cfg.to_dict(),
        "checkpoints": len(zoo),
        "members": len(zoo.members),
        "diverged_checkpoints": sum(not r["finite"] for r in zoo.records),
        "seconds_this_run": time.time() - t,
        "summary_this_process": summary,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "git_commit": _git_commit(),
    }
    (out / "recipe.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{name}: {len(zoo)} checkpoints of {len(zoo.members)} members in {out}", file=sys.stderr)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the zoos of this recipe")
    s = sub.add_parser("show", help="print a zoo's full config")
    s.add_argument("name", choices=ZOOS)
    b = sub.add_parser("build", help="build (or finish) zoos")
    b.add_argument("name", choices=(*ZOOS, "all"))
    b.add_argument("--root", type=Path, default=Path("zoos"), help="zoos are written to <root>/<name>")
    b.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from nfn_plugins.zoo.presets import preset

    if args.cmd == "list":
        for name in ZOOS:
            cfg = preset(name)
            print(f"{name:13s} {cfg.dataset:14s} {len(cfg.archs):2d} architecture(s)  "
                  f"{cfg.n_members} members x {len(cfg.checkpoint_epochs)} checkpoints = {cfg.n_checkpoints}")
        return 0
    if args.cmd == "show":
        print(preset(args.name).to_json())
        return 0
    for name in ZOOS if args.name == "all" else (args.name,):
        build(name, args.root, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
