"""SIGTERM to `gradtrust serve` with more than 30 s of work queued: every accepted request is
answered and everything exits 0. With Triton's default exit timeout (30 s) three of four such
requests failed and tritonserver segfaulted on its way out (docs/SECURITY.md); `gradtrust
serve` now computes the timeout from each model's queue bound and the longest admissible
request (gradtrust.ops.drain)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from gradtrust.core.calibration import FILENAME as CALIBRATION_FILE
from gradtrust.ops import drain
from gradtrust.ops.tritonserver import Ports, free_port
from tests.conftest import DEMO_MODEL, MODEL_REPOSITORY
from tests.integration.triton_io import infer, read_until_ready

pytestmark = pytest.mark.integration

SECONDS_PER_REQUEST = 9.0
SLOW_MODEL_PY = f'''"""Test only: the demo model, {SECONDS_PER_REQUEST} s per request."""
import time

from gradtrust.triton.model import TritonPythonModel as _Served


class TritonPythonModel(_Served):
    def execute(self, requests):
        time.sleep({SECONDS_PER_REQUEST} * len(requests))
        return super().execute(requests)
'''


def _slow_repository(root: Path) -> Path:
    """The demo entry, one request per batch, a queue of at most 8, 9 s per request."""
    repo = root / "repo"
    entry = repo / DEMO_MODEL
    shutil.copytree(
        MODEL_REPOSITORY / DEMO_MODEL,
        entry,
        ignore=shutil.ignore_patterns("__pycache__", CALIBRATION_FILE),
    )
    (entry / "1" / "model.py").write_text(SLOW_MODEL_PY)
    config = entry / "config.pbtxt"
    text = config.read_text().replace("max_batch_size: 64", "max_batch_size: 1")
    text = text.replace(
        "max_queue_delay_microseconds: 2000",
        "max_queue_delay_microseconds: 2000\n  default_queue_policy { max_queue_size: 8 }",
    )
    config.write_text(text)
    return repo


def test_exit_timeout_covers_the_bounded_queue_when_computed(tmp_path):
    (queue,) = drain.model_queues(_slow_repository(tmp_path))
    assert (queue.instances, queue.max_queue_size, queue.accepted) == (1, 8, 9)
    # 9 requests, one after another, at most 10 s each, plus the shutdown margin.
    assert drain.exit_timeout_s([queue], 10.0) == 9 * 10 + drain.SHUTDOWN_MARGIN_S
    unbounded = drain.ModelQueue("m", instances=2, max_queue_size=None)
    assert unbounded.accepted == drain.UNBOUNDED_QUEUE_ASSUMED + 2


def test_sigterm_answers_every_queued_request_and_exits_zero_when_work_exceeds_30_s(
    tmp_path, digits
):
    repo = _slow_repository(tmp_path)
    ports = Ports(free_port(), free_port(), free_port())
    cmd = [
        sys.executable, "-m", "gradtrust.cli", "serve", "--model-repository", str(repo),
        "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
        "--metrics-port", str(ports.metrics), "--max-request-seconds", "10",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server: Any = type("S", (), {"http_url": f"127.0.0.1:{ports.http}"})()
    server.grpc_url = f"127.0.0.1:{ports.grpc}"
    answers: dict[int, Any] = {}

    def send(i: int) -> None:
        protocol = "http" if i % 2 == 0 else "grpc"
        try:
            answers[i] = infer(server, protocol, digits[0][i : i + 1])
        except InferenceServerException as err:
            answers[i] = err

    try:
        text = read_until_ready(proc)
        assert f"ready: {DEMO_MODEL}" in text, text
        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.2)  # accepted in this order: 4 x 9 s = 36 s of work
        time.sleep(1.0)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        drained_s = time.monotonic() - t_term
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    failed = {i: a for i, a in answers.items() if isinstance(a, Exception)}
    assert len(answers) == 4 and not failed, failed
    for i, answer in answers.items():
        np.testing.assert_array_equal(answer["CLASS_ID"][:, 0], digits[1][i : i + 1])
    assert drained_s > 30  # the work really outlasted Triton's default exit timeout
    assert proc.returncode == 0, rest
    assert "stopped (exit code 0)" in rest, rest
    assert "Exit timeout expired" not in rest and "Signal (11)" not in rest
