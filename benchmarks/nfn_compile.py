"""Would compiling the learned optimizer's NFN pay off? Eager vs torch.jit.trace vs torch.compile.

The NFN optimizer runs its NFN only while the learned correction is on (2H steps: 30 for the shipped
`vit-mnist`, H = 15), once per step, on one input of 4 channels (weights, gradients, momentum, base
direction). Per model of the optimizer benchmark's held-out ViT tasks this measures, in one process and
run: the NFN forward's median time eagerly, traced (`torch.jit.trace`, deprecated in current torch) and
compiled (`torch.compile`, a cold cache), the time of the first 2H calls (a training run's NFN steps,
tracing or compiling included), and the number of NFN steps after which the saving repays that cost.
Results: benchmarks/results/nfn_compile.{json,md}.

    python benchmarks/nfn_compile.py [--threads 1] [--repeats 50]     # ~4 min (the compiles dominate)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_atomic, write_json_atomic  # noqa: E402

from nfn_plugins.extract import extract_weights  # noqa: E402
from nfn_plugins.memory import keep_freed_memory  # noqa: E402
from nfn_plugins.optim import INPUTS, LearnedUpdate  # noqa: E402
from nfn_plugins.weight_space import WeightSpace  # noqa: E402
from nfn_plugins.zoo.models import make_vit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"mnist-new-seeds (ViT D32 H2 L2)": (32, 2, 2), "mnist-wider (ViT D48 H4 L3)": (48, 4, 3)}


class _FlatInputs(nn.Module):
    """The learned update as a function of plain tensors (what tracing needs); its parameters by reference."""

    def __init__(self, learned: LearnedUpdate, spec):
        super().__init__()
        self.learned, self.spec = learned, spec

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.learned(WeightSpace(self.spec, dict(zip(self.spec.names, tensors)))).values())


def _inputs(d: int, heads: int, depth: int) -> WeightSpace:
    """The optimizer's NFN input for a fresh ViT: its weights and three gradient-sized channels."""
    torch.manual_seed(0)
    ws = extract_weights(make_vit(d_model=d, n_heads=heads, n_blocks=depth)).detach()
    others = [ws.map(lambda t: 1e-3 * torch.randn_like(t)) for _ in INPUTS[1:]]
    return WeightSpace.stack([ws, *others]).unsqueeze(0)


def _measure(fn, first: int, repeats: int, setup_s: float = 0.0) -> dict[str, float]:
    """Seconds of the first ``first`` calls (plus ``setup_s``, e.g. tracing), then the median of ``repeats``
    more: a run's NFN steps as a user pays them, and the steady state."""
    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    first_s = setup_s + sum(timed() for _ in range(first))
    return {"first_calls_s": first_s, "median_s": statistics.median(timed() for _ in range(repeats))}


def measure_model(learned: LearnedUpdate, x: WeightSpace, first: int, repeats: int) -> dict[str, dict]:
    args = tuple(x[n] for n in x.spec.names)
    flat = _FlatInputs(learned, x.spec)
    out: dict[str, dict] = {}
    with torch.inference_mode():
        out["eager"] = _measure(lambda: flat(*args), first, repeats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings
            t0 = time.perf_counter()
            traced = torch.jit.trace(flat, args, check_trace=False)
            trace_s = time.perf_counter() - t0
            out["jit.trace"] = _measure(lambda: traced(*args), first, repeats, trace_s)
        torch._dynamo.reset()
        compiled = torch.compile(flat, dynamic=False)
        out["torch.compile"] = _measure(lambda: compiled(*args), first, repeats)
        reference = flat(*args)
        for name, fn in (("jit.trace", traced), ("torch.compile", compiled)):
            out[name]["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(reference, fn(*args)))
    eager = out["eager"]
    for name in ("jit.trace", "torch.compile"):
        r = out[name]
        saving = eager["median_s"] - r["median_s"]
        extra = r["first_calls_s"] - eager["first_calls_s"]  # what the first calls cost beyond eager ones
        r["speedup"] = eager["median_s"] / r["median_s"]
        r["break_even_steps"] = first + extra / saving if saving > 0 else None
    return out


def markdown(results: dict, nfn_steps: int) -> str:
    lines = ["# Compiling the learned optimizer's NFN", "",
             f"Per NFN forward (batch 1, 4 channels) of the shipped `vit-mnist` update, inference mode, one "
             f"process. `forward ms`: median of the steady calls. `first {nfn_steps} s`: the first {nfn_steps} "
             f"calls, tracing or compiling (cold inductor cache) included: the shipped update runs its NFN for "
             f"{nfn_steps} steps per training run (2H), so this is what a run pays. `break-even`: NFN steps after "
             f"which the steady saving repays the first calls' extra cost.", "",
             f"| model | mode | forward ms | speedup | first {nfn_steps} s | break-even NFN steps | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    def break_even(r: dict) -> str:
        if "break_even_steps" not in r:  # eager: the reference
            return "-"
        return "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:,.0f}"

    for model, modes in results.items():
        for mode, r in modes.items():
            lines.append(f"| {model} | {mode} | {1000 * r['median_s']:.1f} | {r.get('speedup', 1.0):.2f}x | "
                         f"{r['first_calls_s']:.2f} | {break_even(r)} | {r.get('max_abs_diff', 0.0):.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nfn-compile-")  # cold: what a user pays once
    learned = LearnedUpdate.from_pretrained("vit-mnist").requires_grad_(False)
    nfn_steps = int(2 * learned.horizon)
    results = {}
    for model, shape in MODELS.items():
        print(f"[nfn_compile] {model}", flush=True)
        results[model] = measure_model(learned, _inputs(*shape), nfn_steps, args.repeats)
    write_json_atomic(RESULTS / "nfn_compile.json", {"machine": machine_info(), "args": vars(args),
                                                     "nfn_steps_per_run": nfn_steps, "results": results})
    write_atomic(RESULTS / "nfn_compile.md", markdown(results, nfn_steps))
    print(markdown(results, nfn_steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
