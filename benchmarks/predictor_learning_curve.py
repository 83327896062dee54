"""How Kendall tau grows with the zoo: each method trained on nested subsets of a split's training members,
with that split's validation and test members fixed (otherwise `predictor.py`'s protocol: checkpoints of the
last saved epoch, an accuracy cut-off, 70/15/15 by member, the same methods and training budget).

It answers whether a predictor is limited by the zoo's size: a curve still rising at the full training set
says more members would help; a flat one says the method is the limit.

    python benchmarks/predictor_learning_curve.py --zoo zoos/mnist-paper-1k --fractions 0.25,0.5,1 --seeds 0,1,2

The full training set (fraction 1) is `predictor.py`'s own split: ``--full <stem>`` takes those points from a
`predictor.py` run of the same zoo (its results stem) instead of training them again (also with
``--report-only``, so both can run side by side).

Writes benchmarks/results/<name>.{json,md,png} (name: --name, default predictor_learning_curve). Parallel runs
(e.g. one per seed) are merged with ``--report-only --combine <name1>,<name2>``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, save_figure_atomic, write_atomic, write_json_atomic  # noqa: E402
from predictor import COLLAPSE, METHODS, RESULTS, WIDTH_AGNOSTIC, _mean_std, label_ceilings, run_method  # noqa: E402

from nfn_plugins.predictor import as_groups, collapsed_masks  # noqa: E402
from nfn_plugins.zoo import Zoo  # noqa: E402

RUN_SETTINGS = ("zoo", "epoch", "cutoff", "fractions", "seeds", "methods", "epochs")  # --resume must match these
TARGET_TAU = 0.93  # issue 3's in-distribution target on the MNIST paper-family zoo


def nested_subsets(train: Zoo, fractions: list[float], seed: int) -> list[Zoo]:
    """Per fraction, a prefix of one seeded shuffle of the training members: each subset contains the smaller
    ones, so the curve shows the effect of adding members, not of drawing different ones."""
    ids = train.members
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    subsets = []
    for f in fractions:
        chosen = {ids[i] for i in order[: max(2, round(f * len(ids)))]}
        subsets.append(train.filter(where=lambda r, chosen=chosen: r["member"] in chosen))
    return subsets


def full_size_rows(stem: str, zoo: str, cutoff: int, seeds, methods) -> list[dict]:
    """The fraction-1 points from a `predictor.py` run: the same split, training members and budget."""
    path = RESULTS / f"{stem}.json"
    if not path.exists():
        raise SystemExit(f"--full {stem}: {path} not found (give the results stem of a predictor.py run)")
    saved = json.loads(path.read_text())
    rows = [{**{k: v for k, v in r.items() if k != "scatter"}, "fraction": 1.0} for r in saved["rows"]
            if r["zoo"] == zoo and r["cutoff"] == cutoff
            and r["seed"] in seeds and r["method"] in methods and r.get("train_epochs", "one") == "one"]
    if not rows:
        raise SystemExit(f"--full {stem}: no rows of zoo {zoo!r} at cut-off {cutoff}% for {methods}")
    return rows


def run(args, rows: list[dict], save) -> None:
    zoo = Zoo.open(args.zoo).filter(finite=True)
    epoch = args.epoch or max(zoo.epochs)
    sub = zoo.filter(epoch=epoch, min_test_acc=args.cutoff / 100)
    arch = zoo.records[0]["arch"]
    name = Path(args.zoo).name
    done = {(r["seed"], r["method"], r["fraction"]) for r in rows}
    for seed in args.seeds:
        train_zoo, val_zoo, test_zoo = sub.split(seed=seed)
        val, test = as_groups(val_zoo), as_groups(test_zoo)
        for fraction, part in zip(args.fractions, nested_subsets(train_zoo, args.fractions, seed)):
            train = as_groups(part)
            collapsed = collapsed_masks(part) if set(args.methods) & set(COLLAPSE) else None
            for method in args.methods:
                if (seed, method, fraction) in done:
                    continue
                metrics, _, _, seconds = run_method(method, train, val, test, seed, args.epochs, True, collapsed,
                                                    arch["n_classes"], arch)
                rows.append({"zoo": name, "epoch": epoch, "cutoff": args.cutoff, "seed": seed, "method": method,
                             "fraction": fraction, "n_train": len(part.members), "n_test": len(test_zoo.members),
                             **metrics, "train_seconds": seconds})
                print(f"[learning curve] {name} seed {seed} {method:<13} {len(part.members):>4} members: "
                      f"tau {metrics['kendall_tau']:.3f} ({seconds:.0f} s)", flush=True)
                save()


def _curves(rows) -> dict[str, list[tuple[float, tuple[float, float], int]]]:
    """Per method: (mean training members, tau mean +- std, splits) at each fraction, smallest first."""
    curves = {}
    for method in sorted({r["method"] for r in rows}, key=METHODS.index):
        points = []
        for fraction in sorted({r["fraction"] for r in rows if r["method"] == method}):
            sel = [r for r in rows if (r["method"], r["fraction"]) == (method, fraction)]
            points.append((statistics.mean(r["n_train"] for r in sel), _mean_std([r["kendall_tau"] for r in sel]),
                           len(sel)))
        curves[method] = points
    return curves


def with_full(rows: list[dict], args) -> list[dict]:
    """The run's rows and, with ``--full``, the full training sets' points from that `predictor.py` run."""
    if not args.full or not rows:
        return rows
    return rows + full_size_rows(args.full, rows[0]["zoo"], args.cutoff, args.seeds, args.methods)


def markdown(rows, ceilings, args) -> str:
    zoo = rows[0]["zoo"] if rows else Path(args.zoo).name
    ceiling = statistics.mean(c["ceiling"] for c in ceilings) if ceilings else float("nan")
    lines = [f"# Accuracy prediction from weights: learning curve on {zoo}", "",
             f"Kendall tau on fixed test members against the number of training members (nested subsets of each "
             f"split's training members; validation and test fixed). Cut-off {args.cutoff}%, 70/15/15 split by "
             f"member, seeds {sorted({r['seed'] for r in rows})}, {args.epochs} training epochs for the neural "
             f"methods (as in `predictor.md`). Label-noise ceiling of the test splits: {ceiling:.3f}; issue 3's "
             f"target: {TARGET_TAU}. Produced by `benchmarks/predictor_learning_curve.py`"
             + (f"; the full training sets' points are `predictor.py`'s run `{args.full}`." if args.full else "."), "",
             f"![learning curve]({args.name}.png)", "",
             "| method | training members | splits | Kendall tau | gain over the previous size |",
             "|---|---|---|---|---|"]
    for method, points in _curves(rows).items():
        previous = None
        for n, (tau, std), splits in points:
            gain = f"{tau - previous:+.3f}" if previous is not None else ""
            lines.append(f"| {method} | {n:.0f} | {splits} | {tau:.3f} +- {std:.3f} | {gain} |")
            previous = tau
    return "\n".join(lines) + "\n"


def plot(rows, ceilings, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    curves = _curves(rows)
    for method, points in curves.items():
        ax.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                    marker="o", capsize=3, label=method)
    if ceilings:
        ax.axhline(statistics.mean(c["ceiling"] for c in ceilings), color="k", ls="--", lw=0.8,
                   label="label-noise ceiling")
    ax.axhline(TARGET_TAU, color="grey", ls=":", lw=0.8, label=f"target {TARGET_TAU}")
    ax.set_xscale("log")
    sizes = sorted({round(p[0]) for points in curves.values() for p in points})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training members")
    ax.set_ylabel("Kendall tau on the test members")
    ax.set_title(rows[0]["zoo"] if rows else "", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, RESULTS / f"{name}.png", dpi=110)


def write_report(rows: list[dict], ceilings: list[dict], args, with_plot: bool = True) -> None:
    """The .md (and the plot) of ``rows``, with ``--full``'s points added."""
    shown = with_full(rows, args)
    write_atomic(RESULTS / f"{args.name}.md", markdown(shown, ceilings, args))
    if with_plot:
        plot(shown, ceilings, args.name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", help="zoo folder")
    p.add_argument("--epoch", type=int)
    p.add_argument("--cutoff", type=int, default=0)
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 1.0])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--methods", type=lambda s: s.split(","), default=["ours-collapse", "gbt-collapse", "scale-mlp"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--full", help="take the fraction-1 points from this predictor.py results stem")
    p.add_argument("--resume", action="store_true", help="keep the rows of an interrupted run with the same settings")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md and the plot from the saved .json")
    p.add_argument("--name", default="predictor_learning_curve", help="results file stem in benchmarks/results/")
    p.add_argument("--combine", type=lambda s: s.split(","), default=[],
                   help="with --report-only: merge the rows of these result stems into --name")
    args = p.parse_args(argv)
    if args.report_only:
        saved = [json.loads((RESULTS / f"{n}.json").read_text()) for n in (args.combine or [args.name])]
        for key in RUN_SETTINGS:
            setattr(args, key, saved[0]["args"][key])
        rows = list({(r["seed"], r["method"], r["fraction"]): r for run in saved for r in run["rows"]}.values())
        ceilings = list({c["seed"]: c for run in saved for c in run["ceilings"]}.values())
        if args.combine:
            write_json_atomic(RESULTS / f"{args.name}.json", {"machine": saved[0]["machine"], "args": vars(args),
                                                              "combined_from": args.combine, "rows": rows,
                                                              "ceilings": ceilings})
        write_report(rows, ceilings, args)
        return 0
    if not args.zoo:
        p.error("give --zoo (or --report-only)")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if any(not 0 < f <= 1 for f in args.fractions) or sorted(args.fractions) != args.fractions:
        p.error(f"--fractions must be increasing and in (0, 1], got {args.fractions}")
    if args.full and 1.0 in args.fractions:
        p.error("--full gives the full training set's points: leave 1 out of --fractions")
    if args.full:
        full_size_rows(args.full, Path(args.zoo).name, args.cutoff, args.seeds, args.methods)  # fail before training
    if len(Zoo.open(args.zoo).arch_keys) > 1 and set(args.methods) - set(WIDTH_AGNOSTIC):
        p.error(f"{args.zoo} has several architectures: only {', '.join(WIDTH_AGNOSTIC)} run there")
    out = RESULTS / f"{args.name}.json"
    previous = json.loads(out.read_text()) if args.resume and out.exists() else {"rows": []}
    if args.resume and out.exists():
        changed = [k for k in RUN_SETTINGS if previous["args"].get(k) != vars(args)[k]]
        if changed:
            p.error(f"--resume: {out.name} was run with other settings ({', '.join(changed)}); use another --name")
    rows: list[dict] = previous["rows"]
    ceilings = label_ceilings(args.zoo, args.epoch, [args.cutoff], args.seeds)

    def save() -> None:  # after every row: an interrupted run resumes with --resume
        write_json_atomic(out, {"machine": machine_info(), "args": vars(args), "rows": rows, "ceilings": ceilings})
        write_report(rows, ceilings, args, with_plot=False)

    run(args, rows, save)
    save()
    write_report(rows, ceilings, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
