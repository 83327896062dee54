"""The shipped accuracy predictor on models trained outside its zoo's recipe: predicted against measured.

The `mnist-paper` predictor learned from zoo members trained the zoo's way (whole epochs; Adam, RMSprop, SGD with
the zoo's hyperparameters). The README demo trains the same architecture a different way (a few hundred steps of
the learned optimizer) and asks the predictor for its accuracy. This measures how far off that is, by optimizer
and training length: the paper's model on MNIST, batch 64, seeds as given, one torch thread.

    python benchmarks/predictor_off_zoo.py [--seeds 0,1] [--steps 300,1000]

Writes benchmarks/results/predictor_off_zoo.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_atomic, write_json_atomic  # noqa: E402

from nfn_plugins.data import load_mnist  # noqa: E402
from nfn_plugins.optim import DEFAULT_LEARNED_UPDATE, NFNOptimizer  # noqa: E402
from nfn_plugins.predictor import AccuracyPredictor  # noqa: E402
from nfn_plugins.zoo.models import build_model, paper_arch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OPTIMIZERS = ("adamw", "vit-paper-1layer", DEFAULT_LEARNED_UPDATE)  # AdamW at lr 1e-3, then shipped learned updates
TEST_IMAGES = 5000  # the demo's


def train(optimizer: str, seed: int, steps: int, data) -> torch.nn.Module:
    """The demo's part 4 with ``optimizer``: the paper's model, ``steps`` batches of 64 drawn with ``seed``."""
    torch.manual_seed(seed)
    model = build_model(paper_arch())
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if optimizer == "adamw"
           else NFNOptimizer.from_pretrained(optimizer, model))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(data.train_y), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def block_weight_norm(model: torch.nn.Module) -> float:
    """Mean Frobenius norm of the model's matrices other than the patch embedding (the blocks and the head)."""
    norms = [float(p.detach().norm()) for n, p in model.named_parameters() if p.dim() == 2][1:]
    return statistics.mean(norms)


def markdown(rows: list[dict], predictor: AccuracyPredictor) -> str:
    lines = ["# The accuracy predictor on models trained outside its zoo's recipe", "",
             f"Predictor `mnist-paper` ({predictor.meta.get('summary', '')}). The README demo's model (the paper's "
             "transformer on MNIST, batch 64) trained by each optimizer for each number of steps; measured accuracy on "
             f"the first {TEST_IMAGES} test images against the predictor's output from the weights alone. One torch "
             "thread. `matrix norm`: mean Frobenius norm of the model's matrices after the patch embedding. Produced "
             "by `benchmarks/predictor_off_zoo.py`.", "",
             "| optimizer | steps | seed | measured | predicted | predicted - measured | matrix norm |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['optimizer']} | {r['steps']} | {r['seed']} | {r['measured']:.3f} | {r['predicted']:.3f} | "
              f"{r['predicted'] - r['measured']:+.3f} | {r['matrix_norm']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", default="300,1000")
    p.add_argument("--name", default="predictor_off_zoo")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_mnist()
    predictor = AccuracyPredictor.from_pretrained("mnist-paper")
    rows = []
    for optimizer in OPTIMIZERS:
        for steps in (int(x) for x in args.steps.split(",")):
            for seed in (int(x) for x in args.seeds.split(",")):
                model = train(optimizer, seed, steps, data)
                with torch.no_grad():
                    logits = model(data.test_x[:TEST_IMAGES])
                    measured = float((logits.argmax(-1) == data.test_y[:TEST_IMAGES]).float().mean())
                    predicted = float(predictor.predict(model))
                rows.append({"optimizer": optimizer, "steps": steps, "seed": seed, "measured": measured,
                             "predicted": predicted, "matrix_norm": block_weight_norm(model)})
                print(f"[off-zoo] {optimizer:<22} {steps:>5} steps seed {seed}: measured {measured:.3f} "
                      f"predicted {predicted:.3f}", flush=True)
                write_json_atomic(RESULTS / f"{args.name}.json", {"machine": machine_info(), "args": vars(args),
                                                                  "rows": rows})
    write_atomic(RESULTS / f"{args.name}.md", markdown(rows, predictor))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
