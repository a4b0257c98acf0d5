"""Shared fixtures: the real demo model, its real test digits, and a real tritonserver."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradtrust.ops.tritonserver import Ports, TritonServer, free_port, start_server

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = ROOT / "model_repository"
DEMO_MODEL = "gradtrust_mnist"
DEMO_ONNX = MODEL_REPOSITORY / DEMO_MODEL / "1" / "model.onnx"
DIGITS = Path(__file__).resolve().parent / "data" / "mnist_test_digits.npz"


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST test digits (never seen in training): float32 (N,1,28,28) in [0,1], labels."""
    data = np.load(DIGITS)
    return data["images"].astype(np.float32) / 255.0, data["labels"].astype(np.int64)


@dataclass(frozen=True)
class DemoServer:
    """A running server plus the name of the demo model it serves; other attributes
    (http_url, grpc_url, metrics_url, process, log_tail, ...) are the server's."""

    server: TritonServer
    model_name: str = DEMO_MODEL

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServer]:
    """The real tritonserver (from the nvidia-pytriton wheel) serving the demo repository
    on free loopback ports. Never skipped: if it cannot start, the tests fail with its log."""
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = start_server(
        MODEL_REPOSITORY,
        ports=Ports(http=free_port(), grpc=free_port(), metrics=free_port()),
        log_path=log,
        timeout_s=180,
        exit_timeout_s=5,
    )
    try:
        yield DemoServer(server)
    finally:
        server.stop()
