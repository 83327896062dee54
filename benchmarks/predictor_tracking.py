"""Do the shipped predictors track one training run? What `PredictedAccuracyCallback`'s ``patience`` relies on.

`predictor_recipes.py` scores finished models; the callback reads one model again and again while it trains and
stops when the prediction stops rising. Here the paper's zoo transformer trains on MNIST for 1,000 steps (batch 64)
under three recipes (the learned NFNOptimizer with the default update, AdamW 1e-3, SGD with momentum 0.03), 2 seeds
each; every 50 steps its test accuracy is measured on 2,000 images and each shipped paper-family predictor reads its
weights. Per run and predictor: Kendall tau between predicted and measured accuracy along the run (does the meter
rise when the model improves), and the last reading against the last measurement.
Results: benchmarks/results/predictor_tracking.{json,md,png}.

    python benchmarks/predictor_tracking.py            # ~5 min on one core
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_state, machine_info, save_figure_atomic, write_atomic, write_json_atomic  # noqa: E402
from predictor_recipes import SHIPPED, optimizer, test_accuracy  # noqa: E402

from nfn_plugins.data import load_mnist  # noqa: E402
from nfn_plugins.metrics import kendall_tau  # noqa: E402
from nfn_plugins.predictor import AccuracyPredictor  # noqa: E402
from nfn_plugins.zoo.models import build_model, paper_arch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = [("nfn", None), ("adamw", 1e-3), ("sgdm", 0.03)]


def track(kind: str, lr: float | None, seed: int, data, predictors: dict, steps: int, every: int) -> dict:
    """One training run, read every ``every`` steps: measured test accuracy and each predictor's."""
    torch.manual_seed(seed)
    model = build_model(paper_arch())
    opt = optimizer(kind, lr, model)
    gen = torch.Generator().manual_seed(seed)
    run = {"recipe": kind + (f" lr {lr:g}" if lr is not None else ""), "seed": seed, "steps": [],
           "measured": [], **{f"predicted/{n}": [] for n in predictors}}
    for step, (x, y) in enumerate(data.train_batches(steps, 64, gen), 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            model.eval()
            run["steps"].append(step)
            run["measured"].append(test_accuracy(model, data, 2000))
            with torch.no_grad():
                for n, p in predictors.items():
                    run[f"predicted/{n}"].append(float(p.predict(model)))
            model.train()
    print(f"[tracking] {run['recipe']} seed {seed}: test accuracy {run['measured'][-1]:.3f}", file=sys.stderr,
          flush=True)
    return run


def plot(runs: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(runs))
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), sharey=True, squeeze=False)
    for ax, run in zip(axes.flat, runs):
        ax.plot(run["steps"], run["measured"], color="black", label="measured")
        for n in names:
            ax.plot(run["steps"], run[f"predicted/{n}"], label=n)
        ax.set(title=f"{run['recipe']}, seed {run['seed']}", xlabel="step", ylim=(0, 1))
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=2, help="runs per recipe")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=50, help="steps between readings")
    p.add_argument("--name", default="predictor_tracking", help="results file stem in benchmarks/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_mnist()
    predictors = {n: AccuracyPredictor.from_pretrained(n) for n in SHIPPED}
    runs = [track(kind, lr, seed, data, predictors, args.steps, args.every)
            for kind, lr in RUNS for seed in range(args.seeds)]
    for run in runs:
        measured = torch.tensor(run["measured"])
        run["scores"] = {n: {"kendall_tau": kendall_tau(torch.tensor(run[f"predicted/{n}"]), measured),
                             "final_l1": abs(run[f"predicted/{n}"][-1] - run["measured"][-1])} for n in predictors}
    write_json_atomic(RESULTS / f"{args.name}.json", {"machine": machine_info(), "git": git_state(
        Path(__file__).parent.parent), "args": vars(args), "runs": runs})
    plot(runs, list(predictors), RESULTS / f"{args.name}.png")
    lines = ["# Do the shipped predictors track a training run?", "",
             f"The paper's zoo transformer on MNIST, {args.steps} steps at batch 64, read every {args.every} steps: "
             "test accuracy on 2,000 images and each predictor's reading of the weights. `tau`: Kendall tau between "
             "predicted and measured along the run; `final`: measured / predicted at the last step.", "",
             f"![predicted and measured accuracy along each run]({args.name}.png)", "",
             "| run | final measured | " + " | ".join(f"{n}: tau | {n}: final predicted" for n in predictors) + " |",
             "|---|---|" + "---|---|" * len(predictors)]
    for run in runs:
        lines.append(f"| {run['recipe']}, seed {run['seed']} | {run['measured'][-1]:.3f} | " + " | ".join(
            f"{run['scores'][n]['kendall_tau']:.3f} | {run[f'predicted/{n}'][-1]:.3f}" for n in predictors) + " |")
    means = {n: sum(r["scores"][n]["kendall_tau"] for r in runs) / len(runs) for n in predictors}
    lines += ["", "Mean tau along a run: " + ", ".join(f"{n} {v:.3f}" for n, v in means.items()) + "."]
    write_atomic(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
