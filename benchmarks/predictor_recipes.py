"""Shipped accuracy predictors on models trained by user-like recipes: runs, not zoo members.

The zoo benchmark (`predictor.py`) tests on held-out members of the same zoo: same optimizers, learning-rate
grid and training length. A user's runs differ. Here the paper's zoo transformer is trained on MNIST by 12
recipes (AdamW, SGD with momentum, RMSprop, the learned NFNOptimizer with the default update at its validated
setting; batch 64, 100-1,000 steps), 3 seeds each, its test accuracy measured on 5,000 images, and each predictor
reads it from the weights. The recipes lie outside the paper-grid zoos (`mnist-paper`, `mnist-paper-long`: batch 16,
other learning rates, no learned optimizer) and inside or next to `mnist-paper-recipes`'s grid (its Adam takes L2
decay where these AdamW runs take decoupled decay). Results: benchmarks/results/predictor_recipes.{json,md}
(another stem: --name).

    python benchmarks/predictor_recipes.py [--predictor DIR_OR_NAME --label NAME ...]   # default: every shipped
    python benchmarks/predictor_recipes.py --first-seed 3 --name predictor_recipes_fresh  # seeds no choice has seen

The committed table reads the shipped paper-family predictors on seeds 0-2; earlier ones (git history) also read
candidates, e.g. a predictor with the scale head, trained like the shipped one:
``nfn-plugins predictor fit --zoo zoos/mnist-paper --out runs/scale-head --epochs 8 --scale-head-layers 2``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_state, machine_info, save_figure_atomic, write_atomic, write_json_atomic  # noqa: E402

from nfn_plugins.data import load_mnist  # noqa: E402
from nfn_plugins.metrics import regression_report  # noqa: E402
from nfn_plugins.optim import DEFAULT_LEARNED_UPDATE, NFNOptimizer  # noqa: E402
from nfn_plugins.predictor import AccuracyPredictor  # noqa: E402
from nfn_plugins.zoo.models import build_model, paper_arch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = [("nfn", None, 300), ("nfn", None, 1000), ("adamw", 3e-4, 300), ("adamw", 1e-3, 300),
           ("adamw", 3e-3, 300), ("adamw", 1e-3, 1000), ("sgdm", 0.03, 300), ("sgdm", 0.1, 300),
           ("rmsprop", 1e-3, 300), ("adamw", 1e-2, 300), ("sgdm", 0.01, 100), ("adamw", 1e-4, 100)]
# the shipped predictors of the paper's model
SHIPPED = ("mnist-paper-recipes-collapse", "mnist-paper-recipes", "mnist-paper-long", "mnist-paper")


def optimizer(kind: str, lr: float | None, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "nfn":  # the default update brings its validated base step, lr, horizon and embedding ratio
        return NFNOptimizer.from_pretrained(DEFAULT_LEARNED_UPDATE, model)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if kind == "sgdm":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return torch.optim.RMSprop(model.parameters(), lr=lr)


def test_accuracy(model: torch.nn.Module, data, n: int) -> float:
    """Accuracy on the first ``n`` test images (the caller sets the model's mode)."""
    with torch.no_grad():
        return float((model(data.test_x[:n]).argmax(-1) == data.test_y[:n]).float().mean())


def trained_models(data, seeds: int, first_seed: int = 0) -> list[tuple[str, torch.nn.Module, float]]:
    """(recipe, model, measured test accuracy) for every recipe and seed ``first_seed ... + seeds - 1`` (batch
    64); recipe j of seed s draws its initialisation and batches from ``s * len(RECIPES) + j``."""
    return [_trained(data, seed, j, seeds > 1) for seed in range(first_seed, first_seed + seeds)
            for j in range(len(RECIPES))]


def _trained(data, seed: int, j: int, name_seed: bool) -> tuple[str, torch.nn.Module, float]:
    kind, lr, steps = RECIPES[j]
    i = seed * len(RECIPES) + j
    torch.manual_seed(i)
    model = build_model(paper_arch())
    opt = optimizer(kind, lr, model)
    gen = torch.Generator().manual_seed(i)
    for x, y in data.train_batches(steps, 64, gen):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    acc = test_accuracy(model, data, 5000)
    lr_text = f"lr {lr:g}" if lr is not None else f"{DEFAULT_LEARNED_UPDATE} at lr {opt.defaults['lr']:g}"
    name = f"{kind} {lr_text}, {steps} steps" + (f", seed {seed}" if name_seed else "")
    print(f"[recipes] {name}: test accuracy {acc:.3f}", file=sys.stderr, flush=True)
    return name, model, acc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictor", action="append", default=[], help="a predictor directory or shipped name "
                   f"(repeatable; default: {', '.join(SHIPPED)})")
    p.add_argument("--label", action="append", default=[], help="a name for each --predictor in the table")
    p.add_argument("--seeds", type=int, default=3, help="models per recipe (different initialisation and data order)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed ... first-seed + seeds - 1 (0-2: the committed table; 3-5: a fresh test)")
    p.add_argument("--name", default="predictor_recipes", help="results file stem in benchmarks/results/")
    args = p.parse_args(argv)
    names = args.predictor or list(SHIPPED)
    labels = args.label or names
    if len(labels) != len(names):
        p.error(f"{len(labels)} --label for {len(names)} --predictor")
    torch.set_num_threads(1)
    models = trained_models(load_mnist(), args.seeds, args.first_seed)
    measured = torch.tensor([acc for _, _, acc in models])
    results = []
    for name, label in zip(names, labels):
        predictor = AccuracyPredictor.from_pretrained(name)
        pred = torch.stack([predictor.predict(model) for _, model, _ in models])
        results.append({"predictor": name, "label": label, "predicted": pred.tolist(),
                        **regression_report(pred, measured)})
    rows = [{"recipe": r, "measured": acc} for r, _, acc in models]
    write_json_atomic(RESULTS / f"{args.name}.json", {"machine": machine_info(), "git": git_state(
        Path(__file__).parent.parent), "recipes": rows, "predictors": results})
    plot(rows, results, RESULTS / f"{args.name}.png")
    lines = ["# Accuracy predictors on models trained by user-like recipes", "",
             f"The paper's zoo transformer on MNIST, {args.seeds} model(s) per recipe (batch 64, seeds "
             f"{args.first_seed}-{args.first_seed + args.seeds - 1}), test accuracy on 5,000 images.", "",
             f"![predicted vs measured]({args.name}.png)",
             "", "| predictor | Kendall tau | R2 | L1 |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['kendall_tau']:.3f} | {r['r2']:.3f} | {r['l1']:.4f} |" for r in results]
    lines += ["", "| recipe | measured | " + " | ".join(r["label"] for r in results) + " |",
              "|---|---|" + "---|" * len(results)]
    for i, row in enumerate(rows):
        lines.append(f"| {row['recipe']} | {row['measured']:.3f} | "
                     + " | ".join(f"{r['predicted'][i]:.3f}" for r in results) + " |")
    write_atomic(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def plot(rows: list[dict], results: list[dict], path: Path) -> None:
    """Predicted vs measured accuracy, one panel per predictor, one colour per optimizer of the recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["recipe"].split()[0] for r in rows})
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        for kind in kinds:
            idx = [i for i, r in enumerate(rows) if r["recipe"].split()[0] == kind]
            ax.scatter([rows[i]["measured"] for i in idx], [res["predicted"][i] for i in idx], s=18, label=kind)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="measured test accuracy", ylabel="predicted",
               title=f"{res['label']}: tau {res['kendall_tau']:.2f}, L1 {res['l1']:.3f}")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
