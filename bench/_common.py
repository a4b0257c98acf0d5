"""Shared pieces of the benchmark scripts: bounded timing loops, statistics, the machine
description and the JSON + markdown writers."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def measure(
    fn: Callable[[], object], *, min_reps: int, max_reps: int, budget_s: float
) -> list[float]:
    """Call ``fn`` until ``max_reps`` calls, or ``budget_s`` seconds once ``min_reps`` are done.

    Returns the duration of every call in seconds; both bounds always hold.
    """
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (
        len(times) < min_reps or time.perf_counter() - start < budget_s
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]], *, min_rounds: int, max_rounds: int, budget_s: float
) -> dict[str, list[float]]:
    """Time several functions in alternating rounds, so that slow drift in the machine's load
    hits all of them alike (their ratio is then fairer than from separate runs)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        order = names if rounds % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def summary(times: Sequence[float]) -> dict[str, float]:
    """Median, min and the relative spread (interquartile range / median) of durations."""
    arr = np.asarray(times, dtype=np.float64)
    q25, med, q75 = np.percentile(arr, [25, 50, 75])
    return {
        "median_s": float(med),
        "min_s": float(arr.min()),
        "iqr_rel": float((q75 - q25) / med) if med > 0 else 0.0,
        "reps": int(arr.size),
    }


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    if not latencies_s:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan")}
    p50, p90, p99 = np.percentile(np.asarray(latencies_s) * 1e3, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}


def _run(cmd: Sequence[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def load_average() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """What the numbers were measured on (CPU, memory, load, library versions)."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "load_average_1_5_15": load_average(),
    }
    lscpu = _run(["lscpu"])
    for line in lscpu.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache"):
            info[f"lscpu_{key.strip()}"] = value.strip()
    info["free"] = _run(["free", "-m"]).strip()
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns`` are (key, header); floats are printed with 3 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "n/a"
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return str(value)

    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, name: str, data: Mapping[str, Any], markdown: str) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir``; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")
    return path


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def split_cores() -> tuple[set[int], set[int]]:
    """(server's CPUs, load generator's CPUs): the upper and lower half of this process's."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit(
            "pinning the server apart from its client needs at least 2 CPUs; this process may use 1"
        )
    half = len(cpus) // 2
    return set(cpus[half:]), set(cpus[:half])


def pin_threads(cpus: set[int]) -> None:
    """Pin every thread of this process to ``cpus`` (an affinity is per thread on Linux;
    threads started later, and child processes, inherit the starting thread's)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
