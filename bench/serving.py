"""Throughput, latency and memory of the real tritonserver, plain versus with trust.

A temporary model repository is generated at run time with, for each benchmarked network,
the GradTrust model (the demo's ``config.pbtxt`` with its name and input dims adjusted,
its one-line ``1/model.py``, ``labels.txt``) and a *plain* twin ``<name>_plain`` served by
``bench/plain_model.py``: same Python backend, same onnxruntime session options, same
dynamic batching and instances, but it returns ``LOGITS`` only. Request variants:

- ``plain``: the plain twin, ``LOGITS``;
- ``class_id``: the GradTrust model, ``CLASS_ID`` only (it still computes GradTrust: the
  backend always does; only the returned tensors shrink);
- ``gradtrust``: ``LABEL, CLASS_ID, CONFIDENCE, GRADTRUST``;
- ``scores``: the same plus ``SCORES`` (the config's seven scores);
- ``heatmap``: the same plus ``HEATMAP`` with ``heatmap_method=gradcam``;
- ``contrast``: the same with ``heatmap_method=contrast`` (Q = the runner-up);
- ``voice``: ``HEATMAP`` and ``HEATMAP_STATS`` with ``heatmap_method=voice`` (C - 1 contrast
  maps per image); ``voice_act``: the same at the activation's resolution
  (``heatmap_size=activation``).

Every request carries one image in the concurrency sweep (the dynamic batcher forms the
batches); the heatmap-latency part sends batches of 1 and 32 one at a time. The server's
resident memory is sampled throughout and under a final stretch of sustained load.
With ``--pin-server`` tritonserver and its stubs run on one half of the CPUs and the load
generator on the other, so that on a small machine the client's work does not take the
server's cores and a variant's ratio to plain is the ratio of the server's costs.

``python -m bench.serving [--quick]``; see ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import _common as common
from bench import memory
from bench.loadgen import VARIANTS, Request, closed_loop, make_client, sequential, triton_counts
from bench.repository import Served, build_repository
from gradtrust.ops.tritonserver import Ports, TritonServer, free_port, start_server

log = logging.getLogger("bench.serving")


@dataclass(frozen=True)
class Plan:
    protocols: tuple[str, ...]
    concurrency: tuple[int, ...]
    variants: tuple[str, ...]
    window_s: float
    rounds: int
    max_requests: int
    heatmap_batches: tuple[int, ...]
    heatmap_budget_s: float
    heatmap_max_reps: int
    memory_s: float
    #: HTTP: let the client ask for compressed responses (aiohttp's default header) instead
    #: of sending ``Accept-Encoding: identity`` (bench.loadgen.IDENTITY_HEADERS).
    http_compression: bool = False


FULL = Plan(
    ("http", "grpc"), (1, 4, 16, 64), tuple(VARIANTS), 2.5, 2, 20_000, (1, 32), 12.0, 100, 60.0
)
QUICK = Plan(("http", "grpc"), (2,), tuple(VARIANTS), 0.3, 1, 200, (1, 4), 0.2, 3, 2.0)


def _url(server: TritonServer, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


async def _cell(
    server: TritonServer, served: Served, protocol: str, conc: int, plan: Plan, image: np.ndarray
) -> list[dict[str, Any]]:
    """All variants at one (model, protocol, concurrency), in alternating rounds."""
    client = make_client(protocol, _url(server, protocol), conc)
    totals: dict[str, dict[str, Any]] = {}
    try:
        for r in range(plan.rounds):
            order = plan.variants if r % 2 == 0 else plan.variants[::-1]
            for name in order:
                variant = VARIANTS[name]
                model = served.plain if variant.plain_model else served.model
                before = triton_counts(server.metrics_url, model)
                cpu_before = memory.cpu_seconds(server.process.pid)
                request = Request(protocol, model, variant, image, plan.http_compression)
                result = await closed_loop(client, request, conc, plan.window_s, plan.max_requests)
                cpu_after = memory.cpu_seconds(server.process.pid)
                after = triton_counts(server.metrics_url, model)
                acc = totals.setdefault(name, {"latencies": [], "results": [], "counts": []})
                acc["results"].append(result)
                counts = {k: after[k] - before[k] for k in after}
                counts["stub_cpu_s"] = cpu_after.get(f"stub:{model}", 0.0) - cpu_before.get(
                    f"stub:{model}", 0.0
                )
                counts["server_cpu_s"] = cpu_after.get("tritonserver", 0.0) - cpu_before.get(
                    "tritonserver", 0.0
                )
                acc["counts"].append(counts)
    finally:
        await client.close()
    rows = []
    for name, acc in totals.items():
        res = acc["results"]
        latencies = [v for r in res for v in r["latencies_s"]]
        requests = sum(r["requests"] for r in res)
        window = sum(r["window_s"] for r in res)
        execs = sum(c["executions"] for c in acc["counts"])
        infers = sum(c["inferences"] for c in acc["counts"])
        answered = sum(c["requests"] for c in acc["counts"])  # warm-up and tail included
        stub_cpu = sum(c["stub_cpu_s"] for c in acc["counts"])
        server_cpu = sum(c["server_cpu_s"] for c in acc["counts"])
        rows.append(
            {
                "model": served.key,
                "protocol": protocol,
                "concurrency": conc,
                "variant": name,
                "requests": requests,
                "errors": sum(r["errors"] for r in res),
                "first_error": next((r["first_error"] for r in res if r["first_error"]), ""),
                "throughput_rps": requests / window if window > 0 else float("nan"),
                "round_rps": [round(r["throughput_rps"], 2) for r in res],
                **common.percentiles_ms(latencies),
                "mean_ms": 1e3 * float(np.mean(latencies)) if latencies else float("nan"),
                "avg_server_batch": infers / execs if execs else float("nan"),
                # CPU per request of the model's stub (forward pass, scores, heatmaps, the
                # response) and of tritonserver itself (frontends, batching), from /proc.
                "stub_cpu_ms_per_request": 1e3 * stub_cpu / answered if answered else float("nan"),
                "server_cpu_ms_per_request": (
                    1e3 * server_cpu / answered if answered else float("nan")
                ),
            }
        )
    return rows


async def _heatmap_latency(
    server: TritonServer, served: Served, protocol: str, plan: Plan, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Issue 3's check: one request at a time, batch 1 and 32, plain vs GradTrust vs gradcam."""
    client = make_client(protocol, _url(server, protocol), 1)
    rows = []
    names = ("plain", "gradtrust", "heatmap")
    try:
        for batch in plan.heatmap_batches:
            images = rng.random((batch, *served.input_shape), dtype=np.float32)
            requests = [
                Request(
                    protocol,
                    served.plain if VARIANTS[n].plain_model else served.model,
                    VARIANTS[n],
                    images,
                    plan.http_compression,
                )
                for n in names
            ]
            await sequential(client, requests, 1, 1, 0.0)  # warm-up
            times = await sequential(
                client, requests, 3, plan.heatmap_max_reps, plan.heatmap_budget_s
            )
            medians = {n: float(np.median(t)) for n, t in zip(names, times, strict=True)}
            for name, t in zip(names, times, strict=True):
                rows.append(
                    {
                        "model": served.key,
                        "protocol": protocol,
                        "batch": batch,
                        "variant": name,
                        "requests": len(t),
                        **common.percentiles_ms(t),
                        "x_plain_p50": medians[name] / medians["plain"],
                        "x_gradtrust_p50": medians[name] / medians["gradtrust"],
                    }
                )
    finally:
        await client.close()
    return rows


async def _sustained(
    server: TritonServer, served: Served, seconds: float, concurrency: int
) -> dict[str, Any]:
    """Mixed GRADTRUST / SCORES / HEATMAP load over gRPC for ``seconds``, RSS sampled."""
    client = make_client("grpc", server.grpc_url, concurrency)
    image = np.random.default_rng(1).random((1, *served.input_shape), dtype=np.float32)
    mix = [
        Request("grpc", served.model, VARIANTS[n], image)
        for n in ("gradtrust", "scores", "heatmap")
    ]
    deadline = time.perf_counter() + seconds
    counts = {"requests": 0, "errors": 0}

    async def worker(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline and counts["requests"] < 10_000_000:
            try:
                await mix[i % len(mix)].send(client)
                counts["requests"] += 1
            except Exception:  # counted; the sampler still shows what memory did
                counts["errors"] += 1
            i += 1

    try:
        with memory.RssSampler(server.process.pid, interval_s=0.5) as sampler:
            await asyncio.gather(*(worker(k) for k in range(concurrency)))
    finally:
        await client.close()
    stats = memory.growth(sampler.samples)
    per_1k = 1000.0 * stats.get("growth_mib", 0.0) / max(counts["requests"], 1)
    step = max(1, len(sampler.samples) // 60)
    return {
        "model": served.key,
        "concurrency": concurrency,
        **counts,
        **stats,
        "growth_mib_per_1k_requests": per_1k,
        "samples_t_s_total_mib": [[round(t, 2), round(m, 1)] for t, m in sampler.samples[::step]],
    }


#: Throughput relative to plain that each request variant should keep (issue 16).
THROUGHPUT_TARGETS = {"gradtrust": 0.97, "heatmap": 0.8, "contrast": 0.8, "voice": 0.5}


def targets(cells: list[dict[str, Any]], heat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Throughput relative to plain per variant (:data:`THROUGHPUT_TARGETS`); a gradcam
    request's p50 <= 1.5x a plain one's."""
    found = []
    plain = {
        (c["model"], c["protocol"], c["concurrency"]): c for c in cells if c["variant"] == "plain"
    }
    for model in sorted({c["model"] for c in cells}):
        for variant, limit in THROUGHPUT_TARGETS.items():
            ratios = {
                f"{c['protocol']} c={c['concurrency']}": c["throughput_rps"]
                / plain[(c["model"], c["protocol"], c["concurrency"])]["throughput_rps"]
                for c in cells
                if c["model"] == model
                and c["variant"] == variant
                and (c["model"], c["protocol"], c["concurrency"]) in plain
            }
            if ratios:
                found.append(
                    {
                        "target": f"{model}: throughput of {variant} requests >= {limit:g}x plain",
                        "measured": {k: round(v, 3) for k, v in ratios.items()},
                        "met": min(ratios.values()) >= limit,
                    }
                )
            # The same target on CPU per request of the model's stub (the throughput it would
            # reach if CPU-bound), which other load on a shared machine disturbs far less.
            cpu = {
                f"{c['protocol']} c={c['concurrency']}": _ratio(
                    plain[(c["model"], c["protocol"], c["concurrency"])].get(
                        "stub_cpu_ms_per_request"
                    ),
                    c.get("stub_cpu_ms_per_request"),
                )
                for c in cells
                if c["model"] == model
                and c["variant"] == variant
                and (c["model"], c["protocol"], c["concurrency"]) in plain
            }
            if cpu:
                found.append(
                    {
                        "target": (
                            f"{model}: stub CPU per request, plain / {variant} >= {limit:g}"
                        ),
                        "measured": {k: round(v, 3) for k, v in cpu.items()},
                        "met": min(cpu.values()) >= limit,
                    }
                )
        gradcam = {
            f"{h['protocol']} batch {h['batch']}": h["x_plain_p50"]
            for h in heat
            if h["model"] == model and h["variant"] == "heatmap"
        }
        if gradcam:
            found.append(
                {
                    "target": f"{model}: gradcam request p50 <= 1.5x a plain request's",
                    "measured": {k: round(v, 3) for k, v in gradcam.items()},
                    "met": max(gradcam.values()) <= 1.5,
                }
            )
    return found


SWEEP_COLUMNS = [
    ("model", "model"),
    ("protocol", "protocol"),
    ("concurrency", "conc."),
    ("variant", "variant"),
    ("throughput_rps", "req/s"),
    ("pct_of_plain", "% of plain"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("avg_server_batch", "avg batch"),
    ("stub_cpu_ms_per_request", "stub CPU ms/req"),
    ("cpu_x_plain", "plain's CPU / this CPU"),
    ("requests", "requests"),
    ("errors", "errors"),
]
HEAT_COLUMNS = [
    ("model", "model"),
    ("protocol", "protocol"),
    ("batch", "batch"),
    ("variant", "variant"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("x_plain_p50", "× plain (p50)"),
    ("x_gradtrust_p50", "× GradTrust (p50)"),
    ("requests", "requests"),
]


def _ratio(num: float | None, den: float | None) -> float:
    if num is None or den is None or not den > 0:
        return float("nan")
    return num / den


def markdown(result: dict[str, Any]) -> str:
    plain = {
        (c["model"], c["protocol"], c["concurrency"]): c["throughput_rps"]
        for c in result["cells"]
        if c["variant"] == "plain"
    }
    plain_cpu = {
        (c["model"], c["protocol"], c["concurrency"]): c.get("stub_cpu_ms_per_request")
        for c in result["cells"]
        if c["variant"] == "plain"
    }
    rows = [
        {
            **c,
            "pct_of_plain": 100.0 * c["throughput_rps"] / plain[key],
            "cpu_x_plain": _ratio(plain_cpu.get(key), c.get("stub_cpu_ms_per_request")),
        }
        if (key := (c["model"], c["protocol"], c["concurrency"])) in plain
        else c
        for c in result["cells"]
    ]
    parts = ["### Serving: concurrency sweep (one image per request)\n"]
    compressed = result.get("plan", {}).get("http_compression", False)
    parts.append(
        "HTTP responses: "
        + (
            "compressed when the server chooses (aiohttp's `Accept-Encoding: gzip, deflate`)\n"
            if compressed
            else "uncompressed (`Accept-Encoding: identity`, the default since issue 16)\n"
        )
    )
    pinned = result.get("pinned")
    if pinned:
        parts.append(
            f"CPUs: tritonserver and its stubs on {pinned['server']}, the load generator on "
            f"{pinned['client']} (`--pin-server`)\n"
        )
    parts.append(common.markdown_table(rows, SWEEP_COLUMNS) + "\n")
    parts.append("### Serving: request latency with and without HEATMAP (gradcam)\n")
    parts.append(common.markdown_table(result["heatmap_latency"], HEAT_COLUMNS) + "\n")
    mem = result["memory"]
    sus = mem["sustained"]
    parts.append("### Server memory (tritonserver + stubs, RSS)\n")
    parts.append(
        common.markdown_table(
            [
                {"when": "after start", "mib": mem["after_start"]["total_mib"]},
                {"when": "before sustained load", "mib": mem["before_sustained"]["total_mib"]},
                {"when": "after sustained load", "mib": mem["after_sustained"]["total_mib"]},
            ],
            [("when", "when"), ("mib", "total RSS MiB")],
        )
    )
    parts.append(
        f"\nSustained load: {sus['requests']} requests ({sus['errors']} errors) in "
        f"{sus.get('seconds', 0):.0f} s, gRPC, concurrency {sus['concurrency']}, "
        f"{sus['model']} model, GRADTRUST/SCORES/HEATMAP mixed: RSS {sus.get('start_mib', 0):.0f}"
        f" -> {sus.get('end_mib', 0):.0f} MiB (peak {sus.get('peak_mib', 0):.0f}), growth "
        f"{sus.get('growth_mib', 0):+.1f} MiB, {sus.get('growth_second_half_mib', 0):+.1f} MiB "
        f"in the second half.\n"
    )
    if result.get("targets"):
        parts.append("Targets:\n")
        for t in result["targets"]:
            verdict = "met" if t["met"] else "NOT met"
            parts.append(f"- {t['target']}: **{verdict}** {t['measured']}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration (seconds)")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--name", default="", help="results file name (default serving[_quick])")
    parser.add_argument("--models", default="demo,resnet18,mobilenet")
    parser.add_argument("--protocols", default="")
    parser.add_argument("--concurrency", default="")
    parser.add_argument("--variants", default="")
    parser.add_argument("--window-s", type=float, default=0.0, help="per round and variant")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds per cell")
    parser.add_argument("--memory-s", type=float, default=-1.0)
    parser.add_argument("--image-size", type=int, default=0, help="ResNet input (224; quick 32)")
    parser.add_argument("--instances", type=int, default=1, help="instance_group count")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra tritonserver argument"
    )
    parser.add_argument("--keep-log", type=Path, default=None, help="copy the server log here")
    parser.add_argument(
        "--source", type=Path, default=None, help="import gradtrust from this directory (A/B)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="cProfile each model's execute() into DIR/<model>.prof (read: python -m pstats)",
    )
    parser.add_argument(
        "--pin-server",
        action="store_true",
        help="run tritonserver (and its stubs) on the upper half of this process's CPUs and "
        "the load generator on the lower half, so that a variant's ratio to plain measures "
        "the server's cost per request, not the client's share of the same cores",
    )
    parser.add_argument(
        "--http-compression",
        action="store_true",
        help="HTTP: accept gzip/deflate responses (aiohttp's default header, the bench's "
        "behaviour before issue 16) instead of asking for identity",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {"http_compression": args.http_compression}
    if args.protocols:
        overrides["protocols"] = tuple(common.parse_names(args.protocols))
    if args.concurrency:
        overrides["concurrency"] = tuple(common.parse_ints(args.concurrency))
    if args.variants:
        overrides["variants"] = tuple(common.parse_names(args.variants))
    if args.window_s > 0:
        overrides["window_s"] = args.window_s
    if args.rounds > 0:
        overrides["rounds"] = args.rounds
    if args.memory_s >= 0:
        overrides["memory_s"] = args.memory_s
    plan = Plan(**{**plan.__dict__, **overrides})
    size = args.image_size or (32 if args.quick else 224)
    keys = common.parse_names(args.models)
    tmp = Path(tempfile.mkdtemp(prefix="gradtrust-bench-"))
    info = common.machine()
    try:
        source = args.source.resolve() if args.source else None
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        served = build_repository(
            tmp / "repo", keys, size, args.instances, source, profile_dir=args.profile
        )
        cores = common.split_cores() if args.pin_server else None
        if cores is not None:  # tritonserver and its stubs inherit this at start
            common.pin_threads(cores[0])
        try:
            server = start_server(
                tmp / "repo",
                ports=Ports(http=free_port(), grpc=free_port(), metrics=free_port()),
                log_path=tmp / "tritonserver.log",
                extra_args=args.server_arg,
                timeout_s=300,
                exit_timeout_s=5,
            )
        finally:
            if cores is not None:  # the load generator, and every thread started later
                common.pin_threads(cores[1])
        # As they are, read back: what the results record is what the processes got.
        pinned = (
            None
            if cores is None
            else {
                "server": sorted(os.sched_getaffinity(server.process.pid)),
                "client": sorted(os.sched_getaffinity(0)),
            }
        )
        try:
            result = _run(server, served, plan)
        finally:
            server.stop()
            if args.keep_log is not None and server.log_path is not None:
                shutil.copy2(server.log_path, args.keep_log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.update(
        benchmark="serving",
        quick=args.quick,
        machine=info,
        plan=plan.__dict__,
        image_size=size,
        instances=args.instances,
        server_args=args.server_arg,
        pinned=pinned,
        source=str(args.source) if args.source else "installed gradtrust",
        load_average_after=common.load_average(),
    )
    name = args.name or ("serving_quick" if args.quick else "serving")
    path = common.write_results(args.out, name, result, markdown(result))
    log.info("wrote %s", path)
    errors = sum(c["errors"] for c in result["cells"]) + result["memory"]["sustained"]["errors"]
    if errors:
        log.error("%d requests failed; see first_error in %s", errors, path)
        return 1
    return 0


def _run(server: TritonServer, served: list[Served], plan: Plan) -> dict[str, Any]:
    pid = server.process.pid
    after_start = memory.snapshot(pid)
    rng = np.random.default_rng(0)
    cells: list[dict[str, Any]] = []
    trajectory = [[0.0, after_start["total_mib"]]]
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = common.load_average()
    for s in served:
        image = rng.random((1, *s.input_shape), dtype=np.float32)
        for protocol in plan.protocols:
            for conc in plan.concurrency:
                rows = asyncio.run(_cell(server, s, protocol, conc, plan, image))
                cells += rows
                for row in rows:
                    log.info(
                        "%s %s c=%d %-9s %8.1f req/s  p50 %7.2f ms  p99 %7.2f ms  batch %.1f",
                        s.key, protocol, conc, row["variant"], row["throughput_rps"],
                        row["p50_ms"], row["p99_ms"], row["avg_server_batch"],
                    )  # fmt: skip
                trajectory.append([time.monotonic() - t0, memory.snapshot(pid)["total_mib"]])
    heat: list[dict[str, Any]] = []
    for s in served:
        for protocol in plan.protocols:
            heat += asyncio.run(_heatmap_latency(server, s, protocol, plan, rng))
    before = memory.snapshot(pid)
    conc = 16 if plan.memory_s >= 10 else 4
    sustained = asyncio.run(_sustained(server, served[0], plan.memory_s, conc))
    return {
        "started": started,
        "load_average_before": load_before,
        "models": [s.__dict__ for s in served],
        "cells": cells,
        "heatmap_latency": heat,
        "memory": {
            "after_start": after_start,
            "before_sustained": before,
            "sustained": sustained,
            "after_sustained": memory.snapshot(pid),
            "trajectory_t_s_total_mib": trajectory,
        },
        "targets": targets(cells, heat),
    }


if __name__ == "__main__":
    raise SystemExit(main())
