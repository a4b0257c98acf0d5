"""A closed-loop load generator over tritonclient's asyncio clients (HTTP and gRPC).

``concurrency`` workers each keep one request in flight. A cell's measurement window
opens once every worker has had one answer (the pipeline is full), stays open for a fixed
time, then workers stop sending and the requests still in flight are awaited but not
counted. Every loop is bounded by a request count and by time.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench import _common as common


@dataclass(frozen=True)
class Variant:
    """What one kind of request asks for."""

    name: str
    outputs: tuple[str, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    plain_model: bool = False  # sent to the generated logits-only model


REQUEST_TIMEOUT_S = 120.0
#: What every HTTP request says by default: send the response uncompressed. tritonclient's
#: asyncio HTTP client (aiohttp) otherwise sends ``Accept-Encoding: gzip, deflate`` on every
#: request, and tritonserver then spends 5-6 ms of CPU gzipping a 224 x 224 float32 map
#: (docs/BENCHMARKS.md, "Quiet-machine rerun"): a cost of the client's headers, not of
#: the request. Plain and trust variants send the same header, so their ratios stay fair;
#: ``compressed=True`` (bench.serving ``--http-compression``) restores aiohttp's default.
IDENTITY_HEADERS: Mapping[str, str] = {"Accept-Encoding": "identity"}
CHEAP = ("LABEL", "CLASS_ID", "CONFIDENCE", "GRADTRUST")
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("plain", ("LOGITS",), plain_model=True),
        Variant("class_id", ("CLASS_ID",)),
        Variant("gradtrust", CHEAP),
        Variant("scores", (*CHEAP, "SCORES")),
        Variant("heatmap", (*CHEAP, "HEATMAP"), {"heatmap_method": "gradcam"}),
        Variant("contrast", (*CHEAP, "HEATMAP"), {"heatmap_method": "contrast"}),
        Variant("voice", (*CHEAP, "HEATMAP", "HEATMAP_STATS"), {"heatmap_method": "voice"}),
        Variant(
            "voice_act",
            (*CHEAP, "HEATMAP", "HEATMAP_STATS"),
            {"heatmap_method": "voice", "heatmap_size": "activation"},
        ),
    )
}


def client_library(protocol: str) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc.aio as grpc_aio

        return grpc_aio
    import tritonclient.http.aio as http_aio

    return http_aio


def make_client(protocol: str, url: str, concurrency: int) -> Any:
    lib = client_library(protocol)
    if protocol == "grpc":
        return lib.InferenceServerClient(url)
    return lib.InferenceServerClient(url, conn_limit=max(concurrency, 1))


class Request:
    """One prepared request (inputs serialised once, reused by every send). Over HTTP it
    asks for an uncompressed response (:data:`IDENTITY_HEADERS`) unless ``compressed``."""

    def __init__(
        self,
        protocol: str,
        model: str,
        variant: Variant,
        images: np.ndarray,
        compressed: bool = False,
    ) -> None:
        lib = client_library(protocol)
        #: Extra HTTP headers of every send (None: the client library's own).
        self.headers = None if protocol != "http" or compressed else dict(IDENTITY_HEADERS)
        tensor = lib.InferInput("IMAGE", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        self.inputs = [tensor]
        self.outputs = [lib.InferRequestedOutput(name) for name in variant.outputs]
        self.names = variant.outputs
        self.model = model
        self.parameters = dict(variant.parameters) or None

    async def send(self, client: Any) -> float:
        """Send, decode every output (as a real client would), return the latency in seconds."""
        t0 = time.perf_counter()
        # tritonclient adds its own entries to the headers dict it is given: a fresh one
        # per send.
        extra = {} if self.headers is None else {"headers": dict(self.headers)}
        result = await asyncio.wait_for(
            client.infer(
                self.model, self.inputs, outputs=self.outputs, parameters=self.parameters, **extra
            ),
            timeout=REQUEST_TIMEOUT_S,
        )
        for name in self.names:
            result.as_numpy(name)
        return time.perf_counter() - t0


async def closed_loop(
    client: Any, request: Request, concurrency: int, window_s: float, max_requests: int
) -> dict[str, Any]:
    """Throughput and latency of ``concurrency`` workers over one measurement window."""
    latencies: list[float] = []
    state = {"sent": 0, "warm": 0, "errors": 0, "first_error": ""}
    warm = asyncio.Event()
    window: dict[str, float] = {}

    async def worker() -> None:
        first = True
        while state["sent"] < max_requests + concurrency:
            if "end" in window and time.perf_counter() >= window["end"]:
                return
            state["sent"] += 1
            try:
                latency = await request.send(client)
            except Exception as err:  # tritonclient raises several types; count, go on
                state["errors"] += 1
                state["first_error"] = state["first_error"] or str(err)[:300]
                latency = float("nan")
            done = time.perf_counter()
            if first:
                first = False
                state["warm"] += 1
                if state["warm"] == concurrency:
                    window["start"] = done
                    window["end"] = done + window_s
                    warm.set()
            elif "start" in window and window["start"] < done <= window["end"]:
                latencies.append(latency)
                if len(latencies) >= max_requests:
                    window["end"] = done

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.gather(*tasks)
    ok = [v for v in latencies if v == v]
    span = window.get("end", 0.0) - window.get("start", 0.0)
    return {
        "latencies_s": ok,
        "requests": len(latencies),
        "errors": int(state["errors"]),
        "first_error": state["first_error"],
        "window_s": span,
        "throughput_rps": len(ok) / span if span > 0 else float("nan"),
        "mean_ms": 1e3 * float(np.mean(ok)) if ok else float("nan"),
        **common.percentiles_ms(ok),
    }


async def sequential(
    client: Any, requests: Sequence[Request], min_reps: int, max_reps: int, budget_s: float
) -> list[list[float]]:
    """Send the requests one after another, round-robin, so drift hits all of them alike."""
    out: list[list[float]] = [[] for _ in requests]
    start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start < budget_s):
        for i, request in enumerate(requests):
            out[i].append(await request.send(client))
        reps += 1
    return out


def triton_counts(metrics_url: str, model: str) -> dict[str, float]:
    """Triton's own counters for ``model``: requests, inferences (images) and executions."""
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    wanted = {
        "nv_inference_request_success": "requests",
        "nv_inference_count": "inferences",
        "nv_inference_exec_count": "executions",
    }
    counts = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in wanted and f'model="{model}"' in rest:
            counts[wanted[name]] += float(rest.rsplit(" ", 1)[1])
    return counts
