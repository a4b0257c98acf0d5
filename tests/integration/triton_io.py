"""Raw tritonclient calls over HTTP or gRPC, so tests exercise the server, not our client."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

T = TypeVar("T")

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

PROTOCOLS = ("http", "grpc")
CHEAP_OUTPUTS = ("LABEL", "CLASS_ID", "CONFIDENCE", "GRADTRUST")


def client_for(server: Any, protocol: str) -> Any:
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url, concurrency=4)
    return grpcclient.InferenceServerClient(server.grpc_url)


def infer(
    server: Any,
    protocol: str,
    images: np.ndarray,
    outputs: Sequence[str] = CHEAP_OUTPUTS,
    parameters: Mapping[str, Any] | None = None,
    model: str = "gradtrust_mnist",
    datatype: str = "FP32",
) -> dict[str, np.ndarray]:
    """One inference request; raises tritonclient's InferenceServerException on error."""
    lib = httpclient if protocol == "http" else grpcclient
    client = client_for(server, protocol)
    try:
        tensor = lib.InferInput("IMAGE", list(images.shape), datatype)
        tensor.set_data_from_numpy(images)
        requested = [lib.InferRequestedOutput(name) for name in outputs]
        result = client.infer(model, [tensor], outputs=requested, parameters=dict(parameters or {}))
        return {name: result.as_numpy(name) for name in outputs}
    finally:
        client.close()


def read_until_ready(proc: subprocess.Popen[str], timeout_s: float = 120) -> str:
    """What `gradtrust serve` printed up to its "stop: Ctrl-C" line (or until it exits)."""
    if proc.stdout is None:
        raise ValueError("start the process with stdout=subprocess.PIPE")
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("stop: Ctrl-C"):
            break
    return "".join(lines)


def settled(read: Callable[[], T], timeout_s: float = 30.0) -> T:
    """``read()`` once two reads 0.1 s apart agree. The stubs write their counts before a
    batch's answers leave the server, so a read after the answers normally agrees at once;
    the second read guards against a batch still in flight from another client."""
    deadline = time.monotonic() + timeout_s
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"metrics still changing after {timeout_s:.0f} s; last read: {last}")


def model_samples(server: Any) -> list[tuple[str, dict[str, str], float]]:
    """The server model's samples on the metrics endpoint, read straight from Triton (text
    exposition format): (name, labels, value) for each line labelled with its model."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = dict(_LABEL.findall(match.group(2) or ""))
        if labels.get("model") == server.model_name:
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples
