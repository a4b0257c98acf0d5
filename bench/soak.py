"""Soak: many client threads over HTTP and gRPC for minutes, every answer checked.

    python -m bench.soak --duration 300 --threads 8            # what `make soak` runs
    python -m bench.soak --duration 20 --threads 4 --out /tmp/soak.json

Starts its own tritonserver on loopback (or uses ``--http-url``/``--grpc-url``), then
each thread sends requests of 1-8 real MNIST test digits through :class:`TrustClient`
with retries off (a retry would hide a failure), half the threads over HTTP and half over
gRPC, some asking for every score. Every answer is compared with onnxruntime run
in-process on the same digits: label, confidence, GradTrust and each score. Bounded in
time (``--duration``) and count (``--max-requests``). The server's memory (tritonserver
plus its Python backend stubs, from /proc) is sampled after warm-up, every
``--sample-every`` seconds, and at the end. Exit code 0 only with zero failures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradtrust.core import scores
from gradtrust.ops.processes import tree_rss
from gradtrust.ops.tritonserver import Ports, free_port, start_server
from gradtrust_client import NO_RETRY, TrustClient, TrustClientError

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "model_repository"
MODEL = "gradtrust_mnist"
DIGITS = ROOT / "tests" / "data" / "mnist_test_digits.npz"
MAX_BATCH = 8
RTOL = 1e-5


@dataclass
class Reference:
    """In-process answers for every digit in the pool."""

    images: np.ndarray  # (N, 1, 28, 28) float32 in [0, 1]
    class_id: np.ndarray
    confidence: np.ndarray
    gradtrust: np.ndarray
    score_names: tuple[str, ...]
    scores: np.ndarray  # (N, len(score_names))


def reference(score_names: Sequence[str]) -> Reference:
    import onnxruntime as ort

    images = np.load(DIGITS)["images"].astype(np.float32) / 255.0
    session = ort.InferenceSession(
        str(REPOSITORY / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    logits, features = session.run(["logits", "features"], {"image": images})
    table = scores.compute_scores(logits, list(score_names), features=features)
    return Reference(
        images=images,
        class_id=logits.argmax(axis=1),
        confidence=scores.msp(logits),
        gradtrust=scores.gradtrust(logits),
        score_names=tuple(score_names),
        scores=np.stack([table[n] for n in score_names], axis=1),
    )


@dataclass
class Tally:
    """One thread's counts; merged at the end (no locks on the hot path)."""

    requests: int = 0
    images: int = 0
    failures: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)


def _mismatch(pred: Any, ref: Reference, i: int, with_scores: bool) -> str | None:
    if pred.class_id != ref.class_id[i] or pred.label != str(ref.class_id[i]):
        return f"digit {i}: label {pred.label!r}/{pred.class_id}, expected {ref.class_id[i]}"
    if not np.isclose(pred.confidence, ref.confidence[i], rtol=RTOL, atol=0):
        return f"digit {i}: confidence {pred.confidence}, expected {ref.confidence[i]}"
    if not np.isclose(pred.gradtrust, ref.gradtrust[i], rtol=RTOL, atol=0):
        return f"digit {i}: gradtrust {pred.gradtrust}, expected {ref.gradtrust[i]}"
    if with_scores:
        got = np.array([pred.scores[n] for n in ref.score_names])
        if not np.allclose(got, ref.scores[i], rtol=RTOL, atol=1e-6):
            return f"digit {i}: scores {got.tolist()}, expected {ref.scores[i].tolist()}"
    return None


def _worker(
    url: str,
    protocol: str,
    ref: Reference,
    seed: int,
    deadline: float,
    budget: list[int],
    lock: threading.Lock,
    tally: Tally,
) -> None:
    rng = random.Random(seed)
    with TrustClient(url, protocol, MODEL, timeout_s=30, retry=NO_RETRY) as client:
        while time.monotonic() < deadline:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            size = rng.randint(1, MAX_BATCH)
            idx = [rng.randrange(len(ref.images)) for _ in range(size)]
            with_scores = rng.random() < 0.5
            t0 = time.perf_counter()
            try:
                preds = client.predict(ref.images[idx], scores=with_scores)
            except TrustClientError as err:
                tally.failures.append(f"{protocol}: {type(err).__name__}: {err}"[:400])
                continue
            finally:
                tally.requests += 1
            tally.latencies_s.append(time.perf_counter() - t0)
            tally.images += size
            if len(preds) != size:
                tally.failures.append(f"{protocol}: {len(preds)} answers for {size} images")
                continue
            for pred, i in zip(preds, idx, strict=True):
                problem = _mismatch(pred, ref, i, with_scores)
                if problem:
                    tally.failures.append(f"{protocol}: {problem}")
                    break


def _rss(pid: int | None) -> dict[str, int]:
    if pid is None:
        return {}
    per_process = tree_rss(pid)
    return {**per_process, "total": sum(per_process.values())}


def _pct(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 2) if whole else None


def _percentiles_ms(latencies: Sequence[float]) -> dict[str, float]:
    if not latencies:
        return {}
    p50, p90, p99 = np.percentile(np.asarray(latencies) * 1e3, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 2),
        "p90_ms": round(float(p90), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(max(latencies) * 1e3), 2),
    }


def run_soak(
    http_url: str,
    grpc_url: str,
    server_pid: int | None,
    *,
    duration_s: float,
    threads: int,
    protocols: Sequence[str] = ("http", "grpc"),
    max_requests: int = 10_000_000,
    sample_every_s: float = 10.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Drive the server; return the summary (``failures`` must be 0)."""
    with TrustClient(http_url, "http", MODEL, timeout_s=30) as probe:
        info = probe.model_info()
        probe.predict(np.zeros((2, 1, 28, 28), np.float32), scores=True)  # warm up
    ref = reference(info.default_scores)
    rss_start = _rss(server_pid)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    t_start = time.monotonic()

    warmup_s = min(10.0, duration_s / 5)
    rss_warm: dict[str, int] = {}

    def sample() -> None:
        if not stop.wait(warmup_s):
            rss_warm.update(_rss(server_pid))
        while not stop.wait(sample_every_s):
            samples.append((round(time.monotonic() - t_start, 1), _rss(server_pid).get("total", 0)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    deadline = t_start + duration_s
    budget, lock = [max_requests], threading.Lock()
    tallies = {p: [Tally() for _ in range(threads)] for p in protocols}
    workers = [
        threading.Thread(
            target=_worker,
            args=(
                http_url if protocol == "http" else grpc_url,
                protocol,
                ref,
                seed * 1000 + i,
                deadline,
                budget,
                lock,
                tallies[protocol][i],
            ),
        )
        for i in range(threads)
        for protocol in [protocols[i % len(protocols)]]
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - t_start
    stop.set()
    sampler.join()
    rss_end = _rss(server_pid)
    per_protocol = {}
    failures: list[str] = []
    for protocol, group in tallies.items():
        latencies = [x for t in group for x in t.latencies_s]
        per_protocol[protocol] = {
            "threads": sum(1 for i in range(threads) if protocols[i % len(protocols)] == protocol),
            "requests": sum(t.requests for t in group),
            "images": sum(t.images for t in group),
            "failures": sum(len(t.failures) for t in group),
            "latency": _percentiles_ms(latencies),
        }
        failures += [f for t in group for f in t.failures]
    total_requests = sum(p["requests"] for p in per_protocol.values())
    total_images = sum(p["images"] for p in per_protocol.values())
    start_total, end_total = rss_start.get("total", 0), rss_end.get("total", 0)
    warm_total = rss_warm.get("total", 0)
    return {
        "duration_s": round(elapsed, 1),
        "threads": threads,
        "protocols": per_protocol,
        "requests": total_requests,
        "images": total_images,
        "failures": len(failures),
        "failure_examples": failures[:10],
        "requests_per_s": round(total_requests / elapsed, 1),
        "images_per_s": round(total_images / elapsed, 1),
        "checked": "label, class id, confidence, GradTrust and (half the requests) every score, "
        f"against onnxruntime in-process, rtol {RTOL}",
        "rss_bytes": {
            "start": rss_start,
            f"after_warmup_{warmup_s:g}s": rss_warm,
            "end": rss_end,
            "growth": end_total - start_total,
            "growth_pct": _pct(end_total - start_total, start_total),
            "growth_after_warmup": end_total - warm_total if warm_total else None,
            "growth_after_warmup_pct": _pct(end_total - warm_total, warm_total),
            "max_sampled": max([end_total, start_total, warm_total, *(s[1] for s in samples)]),
            "samples_s_bytes": samples,
        },
        "machine": {
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1_5_15": list(os.getloadavg()),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    parser.add_argument("--threads", type=int, default=8, help="client threads in all")
    parser.add_argument("--protocols", default="http,grpc", help="comma-separated: http,grpc")
    parser.add_argument("--max-requests", type=int, default=10_000_000, help="request cap")
    parser.add_argument("--sample-every", type=float, default=10.0, help="RSS sampling period")
    parser.add_argument(
        "--http-url", help="use a running server (host:port) instead of starting one"
    )
    parser.add_argument("--grpc-url", help="its gRPC address (with --http-url)")
    parser.add_argument("--server-pid", type=int, help="its tritonserver pid, for RSS")
    parser.add_argument("--out", type=Path, help="write the JSON summary here too")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not protocols or set(protocols) - {"http", "grpc"} or args.threads < 1:
        parser.error("--protocols takes http and/or grpc; --threads must be >= 1")
    server = None
    if args.http_url:
        http_url, grpc_url, pid = args.http_url, args.grpc_url or args.http_url, args.server_pid
    else:
        log = Path(tempfile.mkdtemp(prefix="gradtrust-soak-")) / "tritonserver.log"
        print(f"starting tritonserver on loopback (log: {log}) ...", file=sys.stderr)
        server = start_server(
            REPOSITORY,
            ports=Ports(http=free_port(), grpc=free_port(), metrics=free_port()),
            log_path=log,
            exit_timeout_s=10,
            address="127.0.0.1",
        )
        http_url, grpc_url, pid = server.http_url, server.grpc_url, server.process.pid
    try:
        print(
            f"soak: {args.threads} threads over {', '.join(protocols)} for {args.duration:g} s",
            file=sys.stderr,
        )
        summary = run_soak(
            http_url,
            grpc_url,
            pid,
            duration_s=args.duration,
            threads=args.threads,
            protocols=protocols,
            max_requests=args.max_requests,
            sample_every_s=args.sample_every,
            seed=args.seed,
        )
    finally:
        if server is not None:
            summary_stop = server.stop()
            print(f"tritonserver stopped (exit code {summary_stop})", file=sys.stderr)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if summary["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
