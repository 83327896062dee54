"""Zoo-building throughput: checkpoints per hour, batched (vmap) vs one-by-one, in the same run.

    python benchmarks/zoo_throughput.py                      # MNIST paper-family preset, ~10 minutes
    python benchmarks/zoo_throughput.py --members 16 --one-by-one 2 --processes 1   # quick

Three measurements on the same zoo configuration (a preset with fewer members):

1. batched, one process: `build_zoo` end to end (members stacked and trained with vmap, evaluation,
   shard writing), one torch thread;
2. one-by-one, one process: the plain loop, one ``nn.Module`` and a ``torch.optim`` optimizer per member,
   same data, schedule and evaluation (`train_one_by_one`), one torch thread;
3. batched, ``--processes`` processes under ``accelerate launch`` (one thread each; wall time including
   process start-up and data loading): what ``recipes/build_zoo.py`` does on the machine.

Writes benchmarks/results/zoo_throughput.json and .md. The machine's load average is recorded with each
measurement: on a shared machine, other processes' load slows everything down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def accuracy_summary(records: list[dict]) -> dict:
    out = {}
    for e in sorted({r["epoch"] for r in records}):
        acc = sorted(r["test_acc"] for r in records if r["epoch"] == e)
        q = lambda f: acc[min(len(acc) - 1, int(f * len(acc)))]  # noqa: E731
        out[str(e)] = {"n": len(acc), "min": acc[0], "q25": q(0.25), "median": q(0.5), "q75": q(0.75), "max": acc[-1],
                       "above_50pct": sum(a > 0.5 for a in acc) / len(acc)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mnist-paper")
    ap.add_argument("--members", type=int, default=32, help="members for the one-process batched build")
    ap.add_argument("--one-by-one", type=int, default=4, help="members trained one by one")
    ap.add_argument("--processes", type=int, default=2, help="processes for the accelerate-launched build (1: skip)")
    ap.add_argument("--members-multi", type=int, default=64, help="members for the multi-process build")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from nfn_plugins.data import load_dataset
    from nfn_plugins.zoo import build_zoo, load_zoo
    from nfn_plugins.zoo.build import TaskData, plan_members, train_one_by_one
    from nfn_plugins.zoo.presets import preset

    cfg = preset(args.preset)
    cfg.threads = 1
    n_ckpt = len(cfg.checkpoint_epochs)
    full = preset(args.preset)
    t = time.time()
    data = load_dataset(cfg.dataset, **cfg.dataset_kwargs)
    data_seconds = time.time() - t
    result: dict = {
        "preset": args.preset,
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("grid", "archs")},
        "checkpoints_per_member": n_ckpt,
        "training_samples_per_member": max(cfg.checkpoint_epochs) * cfg.steps_per_epoch * cfg.batch_size,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "data_load_seconds": data_seconds,
    }
    work = Path(tempfile.mkdtemp(prefix="zoo_bench_"))
    try:
        # 1. batched, one process
        cfg.n_members = args.members
        la0 = loadavg()
        t = time.time()
        build_zoo(cfg, work / "batched", data=data, progress=False, log=lambda s: None)
        sec = time.time() - t
        _, records = load_zoo(work / "batched", finite_only=False)
        result["batched_1proc"] = {
            "members": args.members, "checkpoints": len(records), "seconds": sec,
            "checkpoints_per_hour": len(records) / sec * 3600, "loadavg_before": la0, "loadavg_after": loadavg(),
        }
        result["accuracy_by_epoch"] = accuracy_summary(records)
        print(f"batched, 1 process : {len(records)} checkpoints in {sec:.1f}s = "
              f"{result['batched_1proc']['checkpoints_per_hour']:.0f}/h", file=sys.stderr)

        # 2. one by one, one process
        task = TaskData(data, cfg)
        members = plan_members(cfg, data)[: args.one_by_one]
        la0 = loadavg()
        t = time.time()
        for m in members:
            train_one_by_one(cfg, task, m)
        sec = time.time() - t
        n = len(members) * n_ckpt
        result["one_by_one_1proc"] = {
            "members": len(members), "checkpoints": n, "seconds": sec,
            "checkpoints_per_hour": n / sec * 3600, "loadavg_before": la0, "loadavg_after": loadavg(),
        }
        print(f"one by one, 1 proc : {n} checkpoints in {sec:.1f}s = "
              f"{result['one_by_one_1proc']['checkpoints_per_hour']:.0f}/h", file=sys.stderr)
        result["speedup_batched_vs_one_by_one"] = (
            result["batched_1proc"]["checkpoints_per_hour"] / result["one_by_one_1proc"]["checkpoints_per_hour"]
        )

        # 3. batched, several processes under accelerate launch (wall time, start-up included)
        if args.processes > 1:
            cfg.n_members = args.members_multi
            cfg_path = work / "multi.json"
            cfg_path.write_text(cfg.to_json())
            cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(args.processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nfn_plugins.cli", "zoo", "build",
                   "--config", str(cfg_path), "--out", str(work / "multi"), "--no-progress"]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            la0 = loadavg()
            t = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            sec = time.time() - t
            if proc.returncode != 0:
                raise RuntimeError(f"accelerate launch failed:\n{proc.stderr[-3000:]}")
            manifest = json.loads((work / "multi" / "manifest.json").read_text())
            n = manifest["n_checkpoints"]
            result["batched_multiproc"] = {
                "processes": args.processes, "members": args.members_multi, "checkpoints": n, "seconds": sec,
                "checkpoints_per_hour": n / sec * 3600, "loadavg_before": la0, "loadavg_after": loadavg(),
            }
            print(f"batched, {args.processes} procs : {n} checkpoints in {sec:.1f}s = "
                  f"{result['batched_multiproc']['checkpoints_per_hour']:.0f}/h", file=sys.stderr)
        best = result.get("batched_multiproc", result["batched_1proc"])["checkpoints_per_hour"]
        result["full_preset"] = {
            "members": full.n_members, "checkpoints": full.n_checkpoints,
            "projected_minutes": full.n_checkpoints / best * 60,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "zoo_throughput.md").write_text(render_md(result))
    return result


def render_md(r: dict) -> str:
    c = r["config"]
    rows = [("batched (vmap), 1 process", r["batched_1proc"]), ("one by one (torch.optim), 1 process", r["one_by_one_1proc"])]
    if "batched_multiproc" in r:
        rows.append((f"batched (vmap), {r['batched_multiproc']['processes']} processes (accelerate launch, wall time)",
                     r["batched_multiproc"]))
    lines = [
        "# Zoo-building throughput",
        "",
        f"Preset `{r['preset']}`: {r['checkpoints_per_member']} checkpoints per member (epochs "
        f"{c['checkpoint_epochs']}, an epoch = {c['steps_per_epoch']} steps x batch {c['batch_size']}: "
        f"{r['training_samples_per_member']:,} training samples per member), evaluation on {c['eval_test_size']} test "
        f"and {c['eval_train_size']} training images per checkpoint, {c['members_per_batch']} members per vmap batch, "
        "one torch thread per process.",
        "",
        "| mode | members | checkpoints | seconds | checkpoints / hour | load avg before -> after |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, m in rows:
        lines.append(f"| {name} | {m['members']} | {m['checkpoints']} | {m['seconds']:.1f} | "
                     f"{m['checkpoints_per_hour']:,.0f} | {m['loadavg_before']} -> {m['loadavg_after']} |")
    f = r["full_preset"]
    lines += [
        "",
        f"Batched vs one-by-one (one process each): **{r['speedup_batched_vs_one_by_one']:.1f}x**.",
        f"Full preset ({f['members']} members, {f['checkpoints']:,} checkpoints) at the best measured rate: "
        f"**{f['projected_minutes']:.0f} minutes**.",
        "",
        f"Machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}, torch {r['machine']['torch']}. "
        "The load average includes other processes sharing the machine.",
        "",
        "Test accuracy of the batched zoo's checkpoints:",
        "",
        "| epoch | n | min | q25 | median | q75 | max | > 50% |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e, s in r["accuracy_by_epoch"].items():
        lines.append(f"| {e} | {s['n']} | {s['min']:.3f} | {s['q25']:.3f} | {s['median']:.3f} | {s['q75']:.3f} | "
                     f"{s['max']:.3f} | {s['above_50pct']:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
