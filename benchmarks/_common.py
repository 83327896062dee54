"""Small helpers shared by the benchmark scripts: timing, peak memory, machine info, atomic writes,
and running one configuration in a fresh subprocess.

Peak memory (Linux): a configuration runs in its own process; after its setup the kernel's resident-set
high-water mark is reset (``echo 5 > /proc/self/clear_refs``), so ``VmHWM - VmRSS(at reset)`` is the
peak extra resident memory of the measured code alone, not of model loading or imports. Where the reset
is not available, the fallback is ``ru_maxrss`` minus the RSS after setup (an under-estimate when setup
itself peaked higher; the result says which method was used).
"""

from __future__ import annotations

import gc
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nfn_plugins.checkpoints import write_atomic, write_json_atomic  # noqa: F401  (re-exported for the scripts)

RESULT_PREFIX = "@@RESULT@@ "  # the line a child process prints its JSON result on


# -- atomic output: the package's writers, and figures through them ------------------------------------
def save_figure_atomic(fig, path: str | os.PathLike, **kwargs) -> None:
    """``fig.savefig`` rendered in memory (format taken from the suffix), then written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip("."), **kwargs)
    write_atomic(path, buffer.getvalue())


# -- machine --------------------------------------------------------------------------------------------
def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """Versions, CPU, threads, memory and the current load average (record it next to every timing)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_gb": _mem_total_gb(),
        "load_average": load_average(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    except ImportError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def git_state(repo: str | os.PathLike = ".", paths: Sequence[str] = ()) -> dict[str, Any]:
    """Commit of ``repo`` and the uncommitted changes under ``paths`` (what exactly was measured)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "uncommitted": git("status", "--porcelain", "--", *paths).splitlines()}
    except (OSError, subprocess.SubprocessError):
        return {}


# -- timing ---------------------------------------------------------------------------------------------
def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, all threads (less sensitive to other load than wall
    time; a large system share usually means page faults from freshly allocated large buffers)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def time_repeats(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, budget_s: float | None = None,
                 min_repeats: int = 1, on_step: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times, then up to ``repeats`` timed times; wall-clock and CPU seconds.

    ``budget_s``: once ``min_repeats`` repeats are done, stop adding repeats when warm-up plus repeats so
    far exceed it; the result's ``repeats`` says how many were done. ``cpu_*`` is the process CPU time
    (all threads) per call: with N busy threads it approaches N x wall on an idle machine.
    """
    t_start = time.perf_counter()
    warm: list[float] = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
        if on_step:
            on_step("warm-up", warm[-1])
    times: list[float] = []
    cpu: list[float] = []
    sys_: list[float] = []
    for i in range(repeats):
        if i >= max(min_repeats, 1) and budget_s is not None and time.perf_counter() - t_start > budget_s:
            break
        (u0, s0), t0 = cpu_seconds(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        u1, s1 = cpu_seconds()
        cpu.append(u1 - u0 + s1 - s0)
        sys_.append(s1 - s0)
        if on_step:
            on_step(f"repeat {i + 1}/{repeats}", times[-1])
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": [round(t, 4) for t in times],
        "cpu_median_s": statistics.median(cpu),
        "cpu_times_s": [round(t, 4) for t in cpu],
        "sys_median_s": statistics.median(sys_),
        "warmup_s": [round(t, 4) for t in warm],
        "repeats": len(times),
    }


# -- memory ---------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:  # not Linux: best effort
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


def mem_available_gb() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak extra resident memory (MB) of the code run after ``start()``; see the module docstring.

    Usage: set up, ``pm = PeakMemory().start()``, run the measured code, ``pm.result()``.
    """

    def start(self) -> "PeakMemory":
        gc.collect()
        self.method = "ru_maxrss - rss_after_setup"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            if _status_kb("VmHWM") is not None:
                self.method = "VmHWM after clear_refs reset - rss_after_setup"
        except OSError:
            pass
        self.base_mb = rss_mb()
        return self

    def peak_mb(self) -> float:
        if self.method.startswith("VmHWM"):
            return _status_kb("VmHWM") / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux

    def result(self) -> dict[str, Any]:
        peak = self.peak_mb()
        return {"peak_extra_mb": round(peak - self.base_mb, 1), "peak_rss_mb": round(peak, 1),
                "rss_after_setup_mb": round(self.base_mb, 1), "memory_method": self.method}


class MemoryGuard:
    """A watchdog thread that ends the process (exit code 3) when its RSS exceeds ``limit_gb``.

    Lets a benchmark try a configuration that might not fit without taking the machine down with it.
    """

    EXIT_CODE = 3

    def __init__(self, limit_gb: float, interval_s: float = 0.1):
        self.limit_mb, self.interval_s = limit_gb * 1024, interval_s
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if rss_mb() > self.limit_mb:
                print(f"MemoryGuard: RSS {rss_mb():.0f} MB > limit {self.limit_mb:.0f} MB, exiting", file=sys.stderr, flush=True)
                os._exit(self.EXIT_CODE)

    def __enter__(self) -> "MemoryGuard":
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


# -- subprocesses ---------------------------------------------------------------------------------------
def emit_result(obj: Any) -> None:
    """In a child process: hand the result to the parent (one line on stdout)."""
    print(RESULT_PREFIX + json.dumps(obj), flush=True)


def run_child(argv: Sequence[str], timeout_s: float | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``[sys.executable, *argv]`` in a fresh process; its stderr goes straight to ours (progress).

    Returns the child's ``emit_result`` object, or ``{"error": ...}`` with ``status`` one of
    ``timeout``, ``memory_limit`` (exit code of `MemoryGuard`), ``failed``.
    """
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, stderr=None, text=True,
                              timeout=timeout_s, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"did not finish within {timeout_s:.0f} s", "wall_s": round(time.perf_counter() - t0, 1)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            out = json.loads(line[len(RESULT_PREFIX):])
            out.setdefault("status", "ok")
            out["wall_s"] = round(time.perf_counter() - t0, 1)
            return out
    status = "memory_limit" if proc.returncode == MemoryGuard.EXIT_CODE else "failed"
    tail = proc.stdout.strip().splitlines()[-5:]
    return {"status": status, "error": f"exit code {proc.returncode}" + (f": {tail}" if tail else ""),
            "wall_s": round(time.perf_counter() - t0, 1)}


def fmt_num(n: float | int | None) -> str:
    """Human-readable count: 141393 -> '141.4k', 17456991 -> '17.46M'."""
    if n is None:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.4g}{unit}"
    return str(n)
