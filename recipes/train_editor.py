"""Train one `WeightEditor` on a zoo and measure whether its edit helps models it never saw.

Each step takes a random training member of the zoo (its last checkpoint), and lowers the MNIST training
loss of that member *after* the edit (the member's weights stay fixed; the editor learns through
``functional_call``). Held-out members (split by member) are then edited in place and their test loss and
accuracy compared before and after. The editor is one rule for every member and width of the zoo.

    python recipes/train_editor.py --zoo zoos/mnist-vit --out runs/editor --steps 600

Writes the editor (``save_pretrained``, atomically) and ``report.json``: test loss and accuracy before and
after the edit for the held-out members and for as many training members (did it learn, did it transfer).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call

from nfn_plugins.data import load_mnist
from nfn_plugins.editor import MATRICES, WeightEditor, edited_parameters
from nfn_plugins.extract import load_weights
from nfn_plugins.zoo import Zoo, build_model, unwrap
from nfn_plugins.zoo.models import prepare_inputs


def member_models(zoo: Zoo) -> list[tuple[dict, torch.nn.Module]]:
    """(record, model holding its weights) for every record of ``zoo`` (float32, eval mode, frozen)."""
    out = []
    for sub in zoo.by_arch().values():
        ws = sub.weights()
        for i, record in enumerate(sub.records):
            model = build_model(record["arch"]).eval().requires_grad_(False)
            load_weights(unwrap(model), ws.map(lambda t: t[i].float()))
            out.append((record, model))
    return out


def edited_logits(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with ``params`` (named as in `unwrap(model)`) in place of its own."""
    prefix = "model." if unwrap(model) is not model else ""
    return functional_call(model, {prefix + k: v for k, v in params.items()}, (x,))


def edit_and_measure(editor: WeightEditor, members, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Test loss and accuracy of each member before and after the edit (the members are edited in place)."""
    rows = []
    for record, model in members:
        before = test_metrics(model, record["arch"], x, y)
        editor.edit(unwrap(model))
        after = test_metrics(model, record["arch"], x, y)
        rows.append({"member": record.get("member"), "arch_key": record["arch_key"], "loss_before": before[0],
                     "loss_after": after[0], "acc_before": before[1], "acc_after": after[1]})
    return rows


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    mean = lambda key: sum(r[key] for r in rows) / n  # noqa: E731
    return {"members": n, "mean_loss_before": mean("loss_before"), "mean_loss_after": mean("loss_after"),
            "mean_acc_before": mean("acc_before"), "mean_acc_after": mean("acc_after"),
            "loss_lower_fraction": sum(r["loss_after"] < r["loss_before"] for r in rows) / n}


@torch.no_grad()
def test_metrics(model: torch.nn.Module, arch: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = model(prepare_inputs(arch, x))
    return float(torch.nn.functional.cross_entropy(out, y)), float((out.argmax(-1) == y).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--max-rel", type=float, default=0.2)
    p.add_argument("--min-acc", type=float, default=0.0, help="train and test on members at least this accurate")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = Zoo.open(args.zoo).filter(finite=True)
    zoo = zoo.filter(epoch=max(zoo.epochs), min_test_acc=args.min_acc)
    train_zoo, _, test_zoo = zoo.split(seed=args.seed)
    data = load_mnist()
    train, test = member_models(train_zoo), member_models(test_zoo)
    if not train or not test:
        raise SystemExit(f"{args.zoo}: {len(train)} training and {len(test)} held-out members at the last epoch "
                         f"with test accuracy >= {args.min_acc}; need at least one of each")
    print(f"[editor] {len(train)} training members, {len(test)} held-out members", file=sys.stderr)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    editor = WeightEditor(targets=MATRICES, max_rel=args.max_rel)
    opt = torch.optim.Adam(editor.parameters(), lr=args.lr)
    start, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        record, model = rng.choice(train)
        idx = torch.randint(len(data.train_y), (args.batch,), generator=gen)
        x = prepare_inputs(record["arch"], data.train_x[idx])
        loss = torch.nn.functional.cross_entropy(edited_logits(model, edited_parameters(editor, unwrap(model)), x),
                                                 data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"[editor] step {step}/{args.steps}: training loss (edited, last 50) "
                  f"{sum(losses[-50:]) / 50:.4f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    train_seconds = time.perf_counter() - start
    x, y = data.test_x[: args.test_images], data.test_y[: args.test_images]
    # held-out members, and as many training members (did it learn at all, or learn but not transfer?)
    rows = {"held_out": edit_and_measure(editor, test, x, y),
            "training": edit_and_measure(editor, rng.sample(train, min(len(train), len(test))), x, y)}
    summary = {split: summarize(r) for split, r in rows.items()} | {"train_seconds": train_seconds}
    editor.save_pretrained(args.out, trained_on=str(args.zoo), args=vars(args), report=summary)
    tmp = Path(args.out) / ".report.json.tmp"
    tmp.write_text(json.dumps({"args": vars(args), "summary": summary, "rows": rows}, indent=1))
    os.replace(tmp, Path(args.out) / "report.json")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
