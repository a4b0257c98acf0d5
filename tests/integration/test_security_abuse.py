"""One client must never take the service down: the rows of docs/SECURITY.md's abuse table,
each against a real tritonserver (the bundled 2.51, which has the known Triton flaws the
deployment images do not: docs/SECURITY.md).

- invalid UTF-8 in request parameters: HTTP 400 naming the problem, counted in
  ``gradtrust_invalid_requests_total``, one log line per interval, not one per request;
- the 80 kB body nested 40,000 levels deep that segfaults Triton 2.51, sent again and again
  to ``gradtrust serve``: it comes back every time and answers afterwards;
- the default bind address is loopback, and the admin key never reaches a stub.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gradtrust.core.calibration import FILENAME as CALIBRATION_FILE
from gradtrust.ops.processes import listening_sockets, stubs_launched_by
from gradtrust.ops.tritonserver import ADMIN_KEY_ENV, Ports, TritonServer, free_port, start_server
from tests.conftest import DEMO_MODEL, MODEL_REPOSITORY, DemoServer
from tests.integration.triton_io import infer, model_samples, read_until_ready, settled

pytestmark = pytest.mark.integration

KEY = "abuse-admin-key-0123456789abcdef"
#: The body of the issue: 80 kB of JSON whose tensor data is nested 40,000 levels deep.
DEEP_BODY = (
    b'{"inputs":[{"name":"IMAGE","shape":[1,1,28,28],"datatype":"FP32","data":'
    + b"[" * 40_000
    + b"0"
    + b"]" * 40_000
    + b"}]}"
)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo entry without its trust calibration (none of these rows needs TRUST_PROB)."""
    repo = tmp_path_factory.mktemp("abuse") / "repo"
    shutil.copytree(
        MODEL_REPOSITORY / DEMO_MODEL,
        repo / DEMO_MODEL,
        ignore=shutil.ignore_patterns("__pycache__", CALIBRATION_FILE),
    )
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[DemoServer]:
    started: TritonServer = start_server(
        repository,
        ports=Ports(free_port(), free_port(), free_port()),
        log_path=repository.parent / "tritonserver.log",
        exit_timeout_s=5,
        address="127.0.0.1",
    )
    try:
        yield DemoServer(started)
    finally:
        started.stop()


def _post(port: int, path: str, body: bytes, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _infer_body(parameters: bytes, images: np.ndarray) -> bytes:
    data = json.dumps(images.reshape(-1).tolist()).encode()
    return (
        b'{"parameters":'
        + parameters
        + b',"inputs":[{"name":"IMAGE","shape":'
        + json.dumps(list(images.shape)).encode()
        + b',"datatype":"FP32","data":'
        + data
        + b"}]}"
    )


def _invalid_total(server) -> float:
    return sum(v for n, _, v in model_samples(server) if n == "gradtrust_invalid_requests_total")


def test_invalid_utf8_parameters_get_400_counted_and_logged_once_when_sent_repeatedly(
    server, digits
):
    path = f"/v2/models/{server.model_name}/infer"
    bad = _infer_body(b'{"scores":"msp\xff\xfe"}', digits[0][:1])
    before = settled(lambda: _invalid_total(server))
    log_before = server.log_tail(10_000_000).count("invalid request(s) rejected")
    answers = [_post(server.ports.http, path, bad) for _ in range(20)]
    for status, body in answers:
        assert status == 400, body
        assert b"not valid UTF-8" in body and b"UnicodeDecodeError" not in body
    good = infer(server, "http", digits[0][:2])  # the server still answers
    np.testing.assert_array_equal(good["CLASS_ID"][:, 0], digits[1][:2])
    assert settled(lambda: _invalid_total(server)) - before == 20
    log = server.log_tail(10_000_000)
    assert log.count("invalid request(s) rejected") - log_before <= 1  # not one per request
    assert "Traceback" not in log[-200_000:]


# --- gradtrust serve, as an operator runs it ------------------------------------------------


def _serve(
    repository: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], dict]:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    cmd = [
        sys.executable, "-m", "gradtrust.cli", "serve",
        "--model-repository", str(repository),
        "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
        "--metrics-port", str(ports["metrics"]), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or None
    )
    return proc, ports


def _tritonserver_pid(serve_pid: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == serve_pid and "tritonserver" in stat[: stat.rindex(")")]:
                return int(entry.name)
    raise AssertionError(f"no tritonserver child of {serve_pid}")


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return rest


def test_serve_binds_loopback_and_keeps_the_admin_key_from_stubs_when_run_in_production(
    repository,
):
    env = {**os.environ, ADMIN_KEY_ENV: KEY}
    proc, ports = _serve(repository, "--production", "--allow-vulnerable-triton", env=env)
    try:
        text = read_until_ready(proc)
        assert f"ready: {DEMO_MODEL}" in text, text
        assert "known vulnerabilities" in text and "CVE-2025-23310" in text  # the override warns
        server_pid = _tritonserver_pid(proc.pid)
        # tritonserver: HTTP, gRPC and its own metrics port; the metrics endpoint that
        # Prometheus scrapes is served by gradtrust serve itself (gradtrust.ops.exporter).
        listening = listening_sockets(server_pid) + listening_sockets(proc.pid)
        assert {p for _, p in listening} >= set(ports.values())
        assert {h for h, _ in listening} == {"127.0.0.1"}, listening
        for port in ports.values():
            assert f"listening on 127.0.0.1:{port}  [this host only]" in text
        (stub,) = stubs_launched_by(server_pid)
        environ = Path(f"/proc/{stub.pid}/environ").read_bytes()
        assert KEY.encode() not in environ and ADMIN_KEY_ENV.encode() not in environ
        assert KEY.encode() in Path(f"/proc/{server_pid}/cmdline").read_bytes()  # documented
    finally:
        rest = _stop(proc)
    assert proc.returncode == 0, rest


def test_serve_production_refuses_a_vulnerable_triton_saying_why_when_not_overridden(
    repository,
):
    proc, _ = _serve(repository, "--production", env={**os.environ, ADMIN_KEY_ENV: KEY})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "refusing --production: this tritonserver is 2.51.0" in out
    assert "CVE-2025-23310" in out and "--allow-vulnerable-triton" in out
    assert "ready:" not in out


def test_serve_comes_back_and_answers_every_time_when_a_deeply_nested_body_crashes_triton(
    repository, digits
):
    proc, ports = _serve(repository)
    path = f"/v2/models/{DEMO_MODEL}/infer"
    good = _infer_body(b"{}", digits[0][:1])
    crashes = 0
    try:
        text = read_until_ready(proc)
        assert f"ready: {DEMO_MODEL}" in text, text
        for _ in range(6):  # more than the old supervisor's limit of 5 restarts in 10 minutes
            pid = _tritonserver_pid(proc.pid)
            with pytest.raises((ConnectionError, http.client.HTTPException)):
                _post(ports["http"], path, DEEP_BODY)  # Triton 2.51 segfaults on it
            crashes += 1
            deadline = time.monotonic() + 120
            answer: tuple[int, bytes] | None = None
            while time.monotonic() < deadline and answer is None:
                time.sleep(0.5)
                assert proc.poll() is None, "gradtrust serve gave up"
                try:
                    answer = _post(ports["http"], path, good, timeout=10)
                except (ConnectionError, http.client.HTTPException):
                    continue
                if answer[0] != 200:  # still loading its model
                    answer = None
            assert answer is not None, f"not serving again within 120 s after crash {crashes}"
            assert json.loads(answer[1])["outputs"], answer
            assert _tritonserver_pid(proc.pid) != pid  # a new server, not the crashed one
            time.sleep(1.0)  # let the supervisor see it ready before crashing it again
        counted = _restarts_counted(ports["metrics"])
    finally:
        rest = _stop(proc)
    assert proc.returncode == 0, rest
    assert counted == {"crashed": crashes, "exited": 0, "stub_died": 0, "start_failed": 0}, rest
    assert rest.count("tritonserver fault: tritonserver was killed by SIGSEGV") == crashes, rest
    assert rest.count("tritonserver serving again after") == crashes


def _restarts_counted(metrics_port: int) -> dict[str, int]:
    """gradtrust_server_restarts_total by cause, from gradtrust serve's metrics endpoint."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r'^gradtrust_server_restarts_total\{cause="(\w+)"\} (\S+)$', text, re.M)
    return {cause: int(float(value)) for cause, value in found}
