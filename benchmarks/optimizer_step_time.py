"""Step time of the NFN optimizer against AdamW, measured interleaved.

This machine's speed drifts (AdamW's median step on one task: 10.4 ms in one run, 13.3 ms in the next), and
`optimizer.py` times each optimizer in its own 1,000-step run, so its ratios carry that drift. Here every
optimizer trains its own copy of the task's model and takes one step in turn, the order rotating each
round, on the same batch: each round's ratios compare steps taken within a fraction of a second of each other.

Optimizers: AdamW (torch's defaults at lr 1e-3), the Muon base alone (the NFN optimizer without its
learned update) and the NFN optimizer with its correction never fading, so that the NFN runs on every step
(`nfn-running`; a shipped update runs it for the first 2H steps only). The mean step over a 1,000-step run
with the shipped horizon follows from the medians: (2H nfn-running + (1000 - 2H) base) / 1000. One more
step of each, not timed, counts the tensor ops its optimizer step dispatches: on these small models the
step's cost is per-op overhead, and the count does not drift.

    python benchmarks/optimizer_step_time.py [--tasks mnist-new-seeds,mnist-wider] [--rounds 200] [--minilm-rounds 20]

Writes benchmarks/results/optimizer_step_time_interleaved.{json,md,png}.
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
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, save_figure_atomic, write_atomic, write_json_atomic  # noqa: E402
from optimizer import _make_optimizer, _task, backward  # noqa: E402

from nfn_plugins.memory import keep_freed_memory  # noqa: E402
from nfn_plugins.optim import DEFAULT_LEARNED_UPDATE, LearnedUpdate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUN_STEPS = 1000  # the run length the derived per-run mean refers to
TARGET = 2.0  # the bound on step time relative to AdamW


def _optimizers(models: list[nn.Module], learned: LearnedUpdate) -> dict[str, torch.optim.Optimizer]:
    """name -> optimizer, one per copy of the task's model (same initialisation), in the order of ``models``."""
    lr = learned.recommended_lr
    base = f"equivariant-{learned.base_direction}"
    nfn = "nfn" if learned.base_direction == "adam" else "nfn-muon"
    adamw_model, base_model, nfn_model = models
    return {
        "adamw": _make_optimizer("adamw", adamw_model, 1e-3, None),
        "base-alone": _make_optimizer(base, base_model, lr, None, nesterov=learned.nesterov),
        "nfn-running": _make_optimizer(nfn, nfn_model, lr, learned, correction_horizon=math.inf),
    }


class OpCounter(TorchDispatchMode):
    """Counts the tensor ops dispatched inside it: the cost that dominates small models' optimizer steps,
    and a number that does not drift with the machine's speed."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def time_task(task: str, rounds: int, warmup: int, learned: LearnedUpdate, seed: int = 100) -> dict:
    """Per optimizer, per measured round: (training step s, optimizer step s)."""
    copies = [_task(task, seed) for _ in range(3)]  # (model, train, test, forward), identically seeded
    models, (x, y), forward = [c[0] for c in copies], copies[0][1], copies[0][3]
    opts = _optimizers(models, learned)
    names = list(opts)
    gen = torch.Generator().manual_seed(seed)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        idx = torch.randint(len(y), (64,), generator=gen)
        for k in range(len(names)):  # rotate the order: no optimizer always runs right after another
            i = (r + k) % len(names)
            model, opt = models[i], opts[names[i]]
            start = time.perf_counter()
            backward(model, opt, forward, x[idx], y[idx])
            mid = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            if r >= warmup:
                times[names[i]].append((end - start, end - mid))
        if (r + 1) % 50 == 0:
            print(f"[step-time] {task}: round {r + 1}/{warmup + rounds}", flush=True)
    ops = {}
    idx = torch.randint(len(y), (64,), generator=gen)
    for model, (name, opt) in zip(models, opts.items()):  # one more step each, counted, not timed
        backward(model, opt, forward, x[idx], y[idx])
        with OpCounter() as counter:
            opt.step()
        ops[name] = counter.count
    result = summarize(task, times, learned)
    for name, count in ops.items():
        result["optimizers"][name]["opt_step_ops"] = count
    return result


def summarize(task: str, times: dict[str, list[tuple[float, float]]], learned: LearnedUpdate) -> dict:
    adamw = [s for s, _ in times["adamw"]]
    rows = {}
    for name, t in times.items():
        steps, opt_steps = [s for s, _ in t], [o for _, o in t]
        per_round = [s / a for s, a in zip(steps, adamw)]
        q1, _, q3 = statistics.quantiles(per_round, n=4)
        rows[name] = {"step_ms": 1e3 * statistics.median(steps), "opt_step_ms": 1e3 * statistics.median(opt_steps),
                      "ratio_of_medians": statistics.median(steps) / statistics.median(adamw),
                      "median_round_ratio": statistics.median(per_round), "round_ratio_q1": q1, "round_ratio_q3": q3,
                      "rounds_within_target": sum(x <= TARGET for x in per_round) / len(per_round),
                      "round_ratios": [round(x, 4) for x in per_round]}
    nfn_steps = 2 * learned.horizon  # full strength for H steps, fading to 0 at step 2H (it runs 2H - 1 steps)
    per_run = (nfn_steps * rows["nfn-running"]["step_ms"] + (RUN_STEPS - nfn_steps) * rows["base-alone"]["step_ms"])
    rows["nfn-over-a-run"] = {"step_ms": per_run / RUN_STEPS,
                              "ratio_of_medians": per_run / RUN_STEPS / rows["adamw"]["step_ms"]}
    return {"task": task, "rounds": len(adamw), "optimizers": rows}


LABELS = {"adamw": "AdamW", "base-alone": "base step alone", "nfn-running": "NFN optimizer, NFN running",
          "nfn-over-a-run": "NFN optimizer over a 1,000-step run (derived)"}


def markdown(results: list[dict], args, learned: LearnedUpdate) -> str:
    lines = [
        "# NFN optimizer step time vs AdamW, interleaved",
        "",
        f"Learned update `{args.learned}` on its {learned.base_direction} base"
        f"{' with Nesterov momentum' if learned.nesterov and learned.base_direction == 'muon' else ''} at lr "
        f"{learned.recommended_lr:g}; "
        f"AdamW at lr 1e-3 with torch's defaults. Each round every optimizer takes one training step (forward, "
        f"backward, optimizer step) on the same batch of 64, in rotating order, each on its own copy of the model; "
        f"{args.warmup} warm-up rounds are not timed. `NFN running`: the correction never fades, so the NFN runs "
        f"on every step (the shipped horizon H={learned.horizon:g} runs it for the first {2 * learned.horizon:g} "
        f"steps). Torch threads: {torch.get_num_threads()}. Produced by `benchmarks/optimizer_step_time.py`.",
        "",
        f"![per-round ratios]({Path(args.name).name}.png)",
        "",
        "| task | optimizer | training step (ms), median | optimizer step (ms), median | optimizer step: tensor ops "
        "| vs AdamW: ratio of medians | vs AdamW: median of per-round ratios (IQR) | rounds within 2x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for name, row in res["optimizers"].items():
            if name == "nfn-over-a-run":
                lines.append(f"| {res['task']} | {LABELS[name]} | {row['step_ms']:.1f} |  |  | "
                             f"{row['ratio_of_medians']:.2f}x |  |  |")
                continue
            lines.append(f"| {res['task']} | {LABELS[name]} | {row['step_ms']:.1f} | {row['opt_step_ms']:.1f} | "
                         f"{row['opt_step_ops']:,} | {row['ratio_of_medians']:.2f}x | {row['median_round_ratio']:.2f}x "
                         f"({row['round_ratio_q1']:.2f}-{row['round_ratio_q3']:.2f}) | "
                         f"{100 * row['rounds_within_target']:.0f}% |")
    lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.4), squeeze=False)
    for ax, res in zip(axes[0], results):
        names = ["base-alone", "nfn-running"]
        ax.boxplot([res["optimizers"][n]["round_ratios"] for n in names], showfliers=False)
        ax.set_xticks([1, 2], ["base alone", "NFN running"])
        ax.axhline(TARGET, color="tab:red", linestyle="--", linewidth=1, label="2x AdamW")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(res["task"], fontsize=9)
        ax.set_ylabel("training step / AdamW's, per round")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learned", default=DEFAULT_LEARNED_UPDATE, help="a LearnedUpdate directory or shipped name")
    p.add_argument("--tasks", default="mnist-new-seeds,mnist-wider,fashion,movies-bert,minilm-finetune",
                   help="comma-separated tasks of benchmarks/optimizer.py")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--minilm-rounds", type=int, default=20, help="rounds for minilm-finetune (~5 s each)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--name", default="optimizer_step_time_interleaved", help="results file stem")
    args = p.parse_args(argv)
    learned = LearnedUpdate.from_pretrained(args.learned)
    if learned.horizon is None or math.isinf(learned.horizon):
        p.error(f"{args.learned} records no finite correction horizon: the per-run mean is not defined")
    keep_freed_memory()  # as in optimizer.py, for every optimizer alike
    results = []
    for task in args.tasks.split(","):
        rounds = args.minilm_rounds if task == "minilm-finetune" else args.rounds
        results.append(time_task(task, rounds, min(args.warmup, rounds), learned))
        write_json_atomic(RESULTS / f"{args.name}.json", {"machine": machine_info(), "args": vars(args),
                                                          "results": results}, indent=None)
    write_atomic(RESULTS / f"{args.name}.md", markdown(results, args, learned))
    plot(results, RESULTS / f"{args.name}.png")
    print(markdown(results, args, learned))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
