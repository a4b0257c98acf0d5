"""Faults, each on its own real tritonserver: broken model files, a killed backend stub,
shutdown under load, a server that starts late, and a request that must not be retried.

What Triton 2.51 itself does, found here and relied on by the rest of the project:

- a model whose file is missing or corrupt fails to load with the reason in the log and in
  the repository index; by default the whole server then exits, with
  ``--exit-on-error=false`` (the production configuration) it serves the other models;
- a Python backend stub killed with SIGKILL is neither restarted nor reaped: the model
  stays READY and every request to it fails with INTERNAL "Stub process ... is not
  healthy", for good. :class:`gradtrust.ops.supervisor.Supervisor` (used by ``gradtrust
  serve``) restarts the server, and retrying clients never notice;
- SIGTERM closes the HTTP listener at once (new connections are refused; requests on
  connections already open are still served) and finishes every request already accepted.
  gRPC keeps accepting (and answering) until the drain is over, then refuses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from gradtrust.core import scores
from gradtrust.errors import ServerError
from gradtrust.ops.processes import stubs_launched_by
from gradtrust.ops.supervisor import Supervisor
from gradtrust.ops.tritonserver import Ports, TritonServer, free_port, start_server
from gradtrust_client import (
    NO_RETRY,
    InvalidRequestError,
    ModelNotReadyError,
    RetryPolicy,
    ServerUnavailableError,
    TrustClient,
    TrustClientError,
)
from tests.conftest import DEMO_MODEL, DEMO_ONNX, MODEL_REPOSITORY
from tests.integration.triton_io import model_samples, settled

pytestmark = pytest.mark.integration

ADMIN_KEY = "test-admin-key-0123456789"
#: Patient enough to ride out a server restart (about 10 s of retries).
PATIENT = RetryPolicy(attempts=30, initial_backoff_s=0.1, max_backoff_s=0.5)
SLOW_MODEL_PY = '''"""Test only: the demo model, 1.5 s slower per batch: requests stay queued."""
import time

from gradtrust.triton.model import TritonPythonModel as _Served


class TritonPythonModel(_Served):
    def execute(self, requests):
        time.sleep(1.5)
        return super().execute(requests)
'''


def _ports() -> Ports:
    return Ports(http=free_port(), grpc=free_port(), metrics=free_port())


def _copy_entry(repo: Path, name: str) -> Path:
    """The demo model entry under another name (config name changed to match)."""
    entry = repo / name
    shutil.copytree(
        MODEL_REPOSITORY / DEMO_MODEL, entry, ignore=shutil.ignore_patterns("__pycache__")
    )
    config = entry / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{DEMO_MODEL}"', f'name: "{name}"'))
    return entry


def _start(repo: Path, tmp_path: Path, **kwargs: Any) -> TritonServer:
    return start_server(
        repo,
        ports=kwargs.pop("ports", None) or _ports(),
        log_path=tmp_path / "tritonserver.log",
        address="127.0.0.1",
        **{"exit_timeout_s": 5, **kwargs},
    )


@pytest.fixture(scope="module")
def reference(digits) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    session = ort.InferenceSession(str(DEMO_ONNX), providers=["CPUExecutionProvider"])

    def compute(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (logits,) = session.run(["logits"], {"image": images})
        return logits.argmax(axis=1), scores.gradtrust(logits)

    return compute


def _assert_right(predictions: list[Any], images: np.ndarray, reference) -> None:
    class_id, trust = reference(images)
    assert [p.class_id for p in predictions] == class_id.tolist()
    np.testing.assert_allclose([p.gradtrust for p in predictions], trust, rtol=1e-5)


# --- broken model files -------------------------------------------------------------------


@pytest.fixture()
def broken_repository(tmp_path) -> Path:
    repo = tmp_path / "repo"
    _copy_entry(repo, "good")
    (_copy_entry(repo, "no_file") / "1" / "model.onnx").unlink()
    corrupt = _copy_entry(repo, "corrupt_file") / "1" / "model.onnx"
    corrupt.write_bytes(corrupt.read_bytes()[:5000])  # a truncated download
    return repo


def test_server_serves_good_model_and_names_each_broken_one_when_model_files_are_bad(
    broken_repository, tmp_path, digits, reference
):
    server = _start(broken_repository, tmp_path, admin_key=ADMIN_KEY)
    try:
        assert server.models == ["good"]
        assert set(server.failed_models) == {"no_file", "corrupt_file"}
        assert "model file" in server.failed_models["no_file"]
        assert "not found" in server.failed_models["no_file"]
        assert "onnxruntime cannot load" in server.failed_models["corrupt_file"]
        log = server.log_tail(200_000)
        for name in ("no_file", "corrupt_file"):
            assert f"failed to load '{name}'" in log
        index = {m["name"]: m for m in server.repository_index()}
        assert index["good"]["state"] == "READY"
        assert (
            index["no_file"]["state"] == "UNAVAILABLE" and "not found" in index["no_file"]["reason"]
        )
        assert server.is_live() and not server.is_ready()  # strict readiness: not all models
        images = digits[0][:6]
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with TrustClient(url, protocol, "good", retry=NO_RETRY) as client:
                _assert_right(client.predict(images), images, reference)
            with TrustClient(url, protocol, "corrupt_file", retry=NO_RETRY) as client:
                assert client.is_ready() is False
                with pytest.raises(ModelNotReadyError, match="failed to load"):
                    client.predict(images)
    finally:
        assert server.stop() == 0


def test_server_exits_naming_the_model_when_a_model_file_is_bad_outside_production(tmp_path):
    repo = tmp_path / "repo"
    (_copy_entry(repo, "no_file") / "1" / "model.onnx").unlink()
    with pytest.raises(ServerError) as info:
        _start(repo, tmp_path)
    message = str(info.value)
    assert "exited with code 1 before it was ready" in message
    assert "failed to load 'no_file'" in message and "not found" in message


# --- a killed Python backend stub ---------------------------------------------------------


def _kill_stub(server: TritonServer) -> int:
    (stub,) = stubs_launched_by(server.process.pid)
    os.kill(stub.pid, signal.SIGKILL)
    return stub.pid


def test_triton_fails_every_request_but_reports_ready_when_stub_is_killed_without_supervisor(
    tmp_path, digits
):
    server = _start(MODEL_REPOSITORY, tmp_path)
    probe = [sys.executable, "-m", "gradtrust.ops.supervisor", "--pid", str(server.process.pid)]
    try:
        with TrustClient(server.http_url, "http", DEMO_MODEL, retry=NO_RETRY) as client:
            client.predict(digits[0][:1])
            assert subprocess.run(probe, capture_output=True, timeout=60).returncode == 0
            dead = _kill_stub(server)
            time.sleep(0.5)
            for _ in range(2):
                with pytest.raises(ServerUnavailableError, match="backend process .* has died"):
                    client.predict(digits[0][:1])
            assert client.is_ready()  # Triton's own health check does not see it
        assert server.dead_stubs() == [dead]  # a zombie child: what Supervisor looks for
        # ... and what the liveness probe for plain-tritonserver containers reports.
        failed = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert failed.returncode == 1 and f"[{dead}] died" in failed.stderr
    finally:
        server.stop(drain_s=2)


def test_supervisor_restarts_server_and_retrying_clients_lose_nothing_when_stub_is_killed(
    tmp_path, digits, reference
):
    ports = _ports()
    supervisor = Supervisor(lambda: _start(MODEL_REPOSITORY, tmp_path, ports=ports), drain_s=3)
    first_pid = supervisor.server.process.pid
    images = digits[0][:32]
    stop = threading.Event()
    results: list[tuple[float, str, Any]] = []

    def traffic(protocol: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        url = f"127.0.0.1:{ports.http if protocol == 'http' else ports.grpc}"
        with TrustClient(url, protocol, DEMO_MODEL, timeout_s=20, retry=PATIENT) as client:
            while not stop.is_set():
                start = int(rng.integers(0, 30))
                try:
                    got = client.predict(images[start : start + 2])
                    results.append((time.monotonic(), protocol, (start, got)))
                except TrustClientError as err:
                    results.append((time.monotonic(), protocol, err))
                time.sleep(0.02)

    workers = [
        threading.Thread(target=traffic, args=(p, i)) for i, p in enumerate(["http", "grpc"] * 2)
    ]
    with supervisor:
        for w in workers:
            w.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        _kill_stub(supervisor.server)
        deadline = killed_at + 40
        while not supervisor.restarts and time.monotonic() < deadline:
            time.sleep(0.2)
        assert supervisor.restarts, f"no restart within 40 s:\n{supervisor.server.log_tail()}"
        recovered_at = time.monotonic()
        time.sleep(2.0)
        stop.set()
        for w in workers:
            w.join(timeout=60)
    restart = supervisor.restarts[0]
    assert "died" in restart.reason and restart.downtime_s < 30
    assert supervisor.server.process.pid != first_pid
    errors = [r for r in results if isinstance(r[2], Exception)]
    assert not errors, f"retrying clients saw failures: {errors[:3]}"
    after = [r for r in results if r[0] > recovered_at]
    assert {r[1] for r in after} == {"http", "grpc"}, "no answers after the restart"
    for _, _, (start, got) in results:
        _assert_right(got, images[start : start + 2], reference)
    assert stubs_launched_by(first_pid) == []  # the old server left no live stub behind


# --- shutdown drains ----------------------------------------------------------------------


def test_sigterm_finishes_every_accepted_request_and_refuses_new_http_when_under_load(
    tmp_path, digits, reference
):
    repo = tmp_path / "repo"
    entry = _copy_entry(repo, DEMO_MODEL)
    (entry / "1" / "model.py").write_text(SLOW_MODEL_PY)
    server = _start(repo, tmp_path, exit_timeout_s=20)
    images = digits[0][:8]
    answers: dict[Any, Any] = {}
    ready = threading.Barrier(9)  # 6 in flight + 2 late + this thread
    sigterm_sent = threading.Event()

    def send(protocol: str, i: int, late: bool) -> None:
        # One client per thread (tritonclient's HTTP client is not thread-safe). In-flight
        # clients read the config first, so their timed call is one infer; late ones
        # connect only after SIGTERM (an open keep-alive connection is still served).
        url = server.http_url if protocol == "http" else server.grpc_url
        with TrustClient(url, protocol, DEMO_MODEL, timeout_s=30, retry=NO_RETRY) as client:
            if not late:
                client.model_info()
            ready.wait()
            if late:
                sigterm_sent.wait()
                time.sleep(0.3)
            try:
                answers[protocol, i] = client.predict(images[i : i + 1])
            except TrustClientError as err:
                answers[protocol, i] = err

    in_flight = [(p, i) for p in ("http", "grpc") for i in range(3)]
    late = [("http", 3), ("grpc", 3)]
    threads = [threading.Thread(target=send, args=(*key, key in late)) for key in in_flight + late]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.5)  # sent and queued: the first batch takes 1.5 s
    t_term = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    sigterm_sent.set()
    for t in threads:
        t.join(timeout=60)
    code = server.process.wait(timeout=60)
    took = time.monotonic() - t_term
    server.stop()
    for key in in_flight:
        assert not isinstance(answers[key], Exception), f"{key}: {answers[key]}"
        _assert_right(answers[key], images[key[1] : key[1] + 1], reference)
    assert isinstance(answers["http", 3], ServerUnavailableError), answers["http", 3]
    late_grpc = answers["grpc", 3]  # accepted and answered during the drain, or refused
    if isinstance(late_grpc, Exception):
        assert isinstance(late_grpc, ServerUnavailableError | ModelNotReadyError), late_grpc
    else:
        _assert_right(late_grpc, images[3:4], reference)
    assert code == 0, server.log_tail()
    assert took < 20, f"shutdown took {took:.1f} s"
    assert "Exit timeout expired" not in server.log_tail(100_000)


# --- client retries -----------------------------------------------------------------------


def test_client_retries_until_the_server_is_up_when_it_starts_late(tmp_path, digits, reference):
    ports = _ports()
    images = digits[0][:5]
    outcome: dict[str, Any] = {}

    def call(protocol: str) -> None:
        url = f"127.0.0.1:{ports.http if protocol == 'http' else ports.grpc}"
        with TrustClient(url, protocol, DEMO_MODEL, retry=PATIENT) as client:
            t0 = time.monotonic()
            try:
                outcome[protocol] = (client.predict(images), time.monotonic() - t0)
            except TrustClientError as err:
                outcome[protocol] = (err, time.monotonic() - t0)

    with TrustClient(f"127.0.0.1:{ports.http}", "http", retry=NO_RETRY) as impatient:
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="Connection refused|refused"):
            impatient.predict(images)
        assert time.monotonic() - t0 < 1  # NO_RETRY: one try, at once
    threads = [threading.Thread(target=call, args=(p,)) for p in ("http", "grpc")]
    for t in threads:
        t.start()
    time.sleep(1.5)
    server = _start(MODEL_REPOSITORY, tmp_path, ports=ports)
    try:
        for t in threads:
            t.join(timeout=60)
    finally:
        server.stop()
    for protocol in ("http", "grpc"):
        got, waited = outcome[protocol]
        assert not isinstance(got, Exception), f"{protocol}: {got}"
        _assert_right(got, images, reference)
        assert waited >= 1.5  # it really was refused at first, and retried


def _invalid_count(server: Any) -> float:
    return sum(
        value
        for name, _, value in model_samples(server)
        if name == "gradtrust_invalid_requests_total"
    )


def _request_count(server: Any) -> int:
    url = f"http://{server.http_url}/v2/models/{server.model_name}/stats"
    with urllib.request.urlopen(url, timeout=10) as resp:
        stats = json.loads(resp.read())["model_stats"][0]["inference_stats"]
    return int(stats["success"]["count"]) + int(stats["fail"]["count"])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_sends_a_rejected_request_exactly_once_when_retries_are_on(
    triton_server, digits, protocol
):
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    with TrustClient(url, protocol, triton_server.model_name, retry=PATIENT) as client:
        client.model_info()
        requests_before, invalid_before = (
            _request_count(triton_server),
            settled(lambda: _invalid_count(triton_server)),  # earlier tests' may be pending
        )
        t0 = time.monotonic()
        with pytest.raises(InvalidRequestError, match="unknown score name"):
            client.predict(digits[0][:2], scores=["trustiness"])
        assert time.monotonic() - t0 < 2  # no backoff happened
    # Triton updates its statistics just after answering: wait for the count to move.
    for count, before in ((_request_count, requests_before), (_invalid_count, invalid_before)):
        deadline = time.monotonic() + 10
        while count(triton_server) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert settled(lambda c=count: c(triton_server)) - before == 1, count.__name__
