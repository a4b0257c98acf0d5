"""Resident memory of a running tritonserver and its Python-backend stub processes.

Read from ``/proc/<pid>/status`` (``VmRSS``): the server process plus every descendant
(one ``triton_python_backend_stub`` per model instance). RSS counts shared pages once per
process, so the total slightly over-counts what the processes use together; its growth
under steady load is what shows a leak.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

PROC = Path("/proc")


def _parent(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """``pid`` and all its (grand)children that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            parent = _parent(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def rss_mib(pid: int) -> float | None:
    """VmRSS of one process in MiB, or None once it has exited."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return 0.0


def _label(pid: int) -> str:
    """``tritonserver``, or the model a stub serves (read from its command line)."""
    try:
        args = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    name = Path(args[0].decode(errors="replace")).name
    if name == "triton_python_backend_stub" and len(args) > 1:
        model_py = Path(args[1].decode(errors="replace"))  # <repo>/<model>/<version>/model.py
        return f"stub:{model_py.parent.parent.name}"
    return name


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds so far of the server ``pid`` and of each stub, by label
    (``tritonserver``, ``stub:<model>``; several instances of one model are summed).

    CPU time is what a request costs the machine whatever else runs on it, so ratios of
    CPU per request stay readable on a shared machine where wall-clock throughput does not.
    """
    found: dict[str, float] = {}
    for p in descendants(pid):
        try:
            fields = (PROC / str(p) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        label = _label(p)
        found[label] = found.get(label, 0.0) + (int(fields[11]) + int(fields[12])) * _TICK_S
    return found


def snapshot(pid: int) -> dict[str, Any]:
    """Total and per-process RSS of the server ``pid`` and its descendants, now."""
    processes = []
    for p in descendants(pid):
        rss = rss_mib(p)
        if rss is not None:
            processes.append({"pid": p, "name": _label(p), "rss_mib": rss})
    return {
        "time": time.time(),
        "total_mib": sum(p["rss_mib"] for p in processes),
        "processes": processes,
    }


class RssSampler:
    """Samples the total RSS every ``interval_s`` in a thread (at most ``max_samples``)."""

    def __init__(self, pid: int, interval_s: float = 0.5, max_samples: int = 10_000) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.max_samples = max_samples
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set() and len(self.samples) < self.max_samples:
            total = sum(r for p in descendants(self.pid) if (r := rss_mib(p)) is not None)
            self.samples.append((time.monotonic() - start, total))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def growth(samples: list[tuple[float, float]]) -> dict[str, float]:
    """Start, end and peak RSS of a sampled run, and the growth over its second half (after
    warm-up allocations), in MiB."""
    if not samples:
        return {}
    totals = [s[1] for s in samples]
    half = len(samples) // 2
    return {
        "start_mib": totals[0],
        "end_mib": totals[-1],
        "peak_mib": max(totals),
        "growth_mib": totals[-1] - totals[0],
        "growth_second_half_mib": totals[-1] - totals[half],
        "seconds": samples[-1][0],
    }
