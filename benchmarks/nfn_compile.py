"""Would compiling the learned optimizer's NFN pay off? Eager vs torch.jit.trace vs torch.compile.

The NFN optimizer runs its NFN only while the learned correction is on (2H steps: 30 for the shipped
`vit-mnist`, H = 15), once per step, on one input of 4 channels (weights, gradients, momentum, base
direction). Per model of the optimizer benchmark's held-out ViT tasks this measures, in one process and
run: the NFN forward's median time eagerly, traced (`torch.jit.trace`, deprecated in current torch) and
compiled (`torch.compile`, a cold cache), each one's one-off cost before it reaches that speed, and the
number of NFN steps after which the saving repays that cost. Results: benchmarks/results/nfn_compile.{json,md}.

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
WARM_CALLS = 3  # calls after tracing/compiling before the steady state (the JIT profiles its first runs)


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


def _measure(fn, repeats: int) -> tuple[float, float]:
    """(seconds until ready: the first call plus the warm calls, steady median seconds per call)."""
    start = time.perf_counter()
    for _ in range(1 + WARM_CALLS):
        fn()
    ready = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return ready, statistics.median(times)


def measure_model(learned: LearnedUpdate, x: WeightSpace, repeats: int) -> dict[str, dict]:
    args = tuple(x[n] for n in x.spec.names)
    flat = _FlatInputs(learned, x.spec)
    out: dict[str, dict] = {}
    with torch.inference_mode():
        out["eager"] = dict(zip(("ready_s", "median_s"), _measure(lambda: flat(*args), repeats)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings
            t0 = time.perf_counter()
            traced = torch.jit.trace(flat, args, check_trace=False)
            trace_s = time.perf_counter() - t0
            ready, median = _measure(lambda: traced(*args), repeats)
        out["jit.trace"] = {"ready_s": trace_s + ready, "median_s": median}
        torch._dynamo.reset()
        compiled = torch.compile(flat, dynamic=False)
        out["torch.compile"] = dict(zip(("ready_s", "median_s"), _measure(lambda: compiled(*args), repeats)))
        reference = flat(*args)
        for name, fn in (("jit.trace", traced), ("torch.compile", compiled)):
            out[name]["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(reference, fn(*args)))
    eager = out["eager"]
    for name in ("jit.trace", "torch.compile"):
        r = out[name]
        saving = eager["median_s"] - r["median_s"]
        extra = r["ready_s"] - eager["ready_s"]
        r["speedup"] = eager["median_s"] / r["median_s"]
        r["break_even_steps"] = extra / saving if saving > 0 else None
    return out


def markdown(results: dict, nfn_steps: int) -> str:
    lines = ["# Compiling the learned optimizer's NFN", "",
             f"Per NFN forward (batch 1, 4 channels) of the shipped `vit-mnist` update, inference mode, one "
             f"process, median of the steady calls. `ready`: seconds from the first call (including tracing or "
             f"compiling, cold inductor cache) through {WARM_CALLS} warm calls. `break-even`: NFN steps after "
             f"which the per-step saving repays the extra ready time. The shipped update runs its NFN for "
             f"{nfn_steps} steps per training run (2H).", "",
             "| model | mode | forward ms | speedup | ready s | break-even NFN steps | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for model, modes in results.items():
        for mode, r in modes.items():
            be = r.get("break_even_steps")
            lines.append(f"| {model} | {mode} | {1000 * r['median_s']:.1f} | {r.get('speedup', 1.0):.2f}x | "
                         f"{r['ready_s']:.2f} | {'-' if mode == 'eager' else ('never' if be is None else f'{be:,.0f}')} | "
                         f"{r.get('max_abs_diff', 0.0):.1e} |")
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
    results = {}
    for model, shape in MODELS.items():
        print(f"[nfn_compile] {model}", flush=True)
        results[model] = measure_model(learned, _inputs(*shape), args.repeats)
    nfn_steps = int(2 * learned.horizon)
    write_json_atomic(RESULTS / "nfn_compile.json", {"machine": machine_info(), "args": vars(args),
                                                     "nfn_steps_per_run": nfn_steps, "results": results})
    write_atomic(RESULTS / "nfn_compile.md", markdown(results, nfn_steps))
    print(markdown(results, nfn_steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
