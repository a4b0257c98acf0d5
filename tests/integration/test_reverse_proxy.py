"""deploy/nginx/nginx.conf, run by Debian's nginx in front of a live tritonserver: what a
client reaches in the compose and Kubernetes deployments (docs/SECURITY.md).

The file is used as shipped, with only the listen address, the upstream address and the
temp paths changed to loopback ports and a temporary folder. Every limit is exercised with
raw sockets, so what is checked is nginx's answer, not a client library's behaviour.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from gradtrust.core.calibration import FILENAME as CALIBRATION_FILE
from gradtrust.ops.tritonserver import Ports, TritonServer, free_port, start_server
from tests.conftest import DEMO_MODEL, MODEL_REPOSITORY

pytestmark = pytest.mark.integration

CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "nginx.conf"
#: The limits as written in nginx.conf (checked against the file below).
MAX_BODY = 64 * 1024 * 1024
PER_CLIENT = 64
HEADER_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("proxy") / "repo"
    shutil.copytree(
        MODEL_REPOSITORY / DEMO_MODEL,
        repo / DEMO_MODEL,
        ignore=shutil.ignore_patterns("__pycache__", CALIBRATION_FILE),
    )
    server = start_server(
        repo,
        ports=Ports(free_port(), free_port(), free_port()),
        log_path=repo.parent / "tritonserver.log",
        exit_timeout_s=5,
        address="127.0.0.1",
    )
    try:
        yield server
    finally:
        server.stop()


class ProxyPorts(NamedTuple):
    http: int
    grpc: int


@pytest.fixture(scope="module")
def proxy_ports(
    triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyPorts]:
    """nginx with deploy/nginx/nginx.conf on free loopback ports (HTTP and gRPC)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed; run `make test-tools` (Debian's nginx)")
    folder = tmp_path_factory.mktemp("nginx")
    ports = ProxyPorts(free_port(), free_port())
    text = CONF.read_text()
    for old, new in (
        ("server triton:8000;", f"server 127.0.0.1:{triton.ports.http};"),
        ("server triton:8001;", f"server 127.0.0.1:{triton.ports.grpc};"),
        ("listen 8080;", f"listen 127.0.0.1:{ports.http};"),
        ("listen 8081 http2;", f"listen 127.0.0.1:{ports.grpc} http2;"),
        ("/tmp/nginx", str(folder / "nginx")),
    ):
        assert old in text, old
        text = text.replace(old, new)
    conf = folder / "nginx.conf"
    conf.write_text(text)
    check = subprocess.run(
        [nginx, "-t", "-p", str(folder), "-c", str(conf)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(
        [nginx, "-p", str(folder), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "error.log").open("wb"),
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                for port in ports:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield ports
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def proxy(proxy_ports: ProxyPorts) -> int:
    """The proxy's HTTP port."""
    return proxy_ports.http


def _status(port: int, raw: bytes, timeout: float = 15.0) -> int | None:
    """Send raw bytes; the HTTP status nginx answers, or None if it closed silently."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        answer = b""
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return int(answer.split()[1]) if answer.startswith(b"HTTP/") else None


def _infer_json(images: np.ndarray) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "IMAGE",
                    "shape": list(images.shape),
                    "datatype": "FP32",
                    "data": images.reshape(-1).tolist(),
                }
            ]
        }
    ).encode()


def test_nginx_conf_states_the_limits_these_tests_check_when_read():
    text = CONF.read_text()
    assert "client_max_body_size 64m;" in text
    assert f"limit_conn per_client {PER_CLIENT};" in text
    assert f"client_header_timeout {HEADER_TIMEOUT_S}s;" in text
    assert "large_client_header_buffers 4 8k;" in text


def test_proxy_answers_inference_like_triton_when_request_is_normal(proxy, triton, digits):
    images = digits[0][:4]
    results = []
    for url in (f"127.0.0.1:{proxy}", triton.http_url):
        client = httpclient.InferenceServerClient(url)
        try:
            tensor = httpclient.InferInput("IMAGE", list(images.shape), "FP32")
            tensor.set_data_from_numpy(images)
            out = client.infer(DEMO_MODEL, [tensor])
            results.append((out.as_numpy("CLASS_ID"), out.as_numpy("GRADTRUST")))
        finally:
            client.close()
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][0][:, 0], digits[1][:4])


def test_proxy_refuses_a_body_over_64_mib_before_reading_it_when_declared(proxy, triton):
    head = (
        f"POST /v2/models/{DEMO_MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    assert _status(proxy, head) == 413
    assert triton.is_ready()


def test_proxy_forwards_chunked_bodies_with_a_length_when_client_streams(proxy, digits):
    body = _infer_json(digits[0][:2])
    chunks = b"".join(
        f"{len(body[i : i + 100]):x}\r\n".encode() + body[i : i + 100] + b"\r\n"
        for i in range(0, len(body), 100)
    )
    conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=30)
    try:
        conn.putrequest("POST", f"/v2/models/{DEMO_MODEL}/infer")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        conn.send(chunks + b"0\r\n\r\n")
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200, answer
    class_id = next(o for o in answer["outputs"] if o["name"] == "CLASS_ID")
    assert class_id["data"] == digits[1][:2].tolist()


def test_proxy_refuses_oversized_headers_when_a_header_exceeds_8k(proxy):
    raw = f"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 9000}\r\n\r\n".encode()
    assert _status(proxy, raw) == 400


def test_proxy_drops_a_client_that_sends_headers_too_slowly_when_timeout_passes(proxy):
    t0 = time.monotonic()
    status = _status(
        proxy, b"GET /v2/health/ready HTTP/1.1\r\nHost:", timeout=HEADER_TIMEOUT_S + 10
    )
    waited = time.monotonic() - t0
    assert status in (None, 408)  # nginx closes the connection
    assert waited < HEADER_TIMEOUT_S + 9  # rather than waiting for the client forever


def test_proxy_limits_requests_in_progress_per_client_when_connections_pile_up(proxy, triton):
    head = (
        f"POST /v2/models/{DEMO_MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    held = []
    try:
        for _ in range(PER_CLIENT):  # each sends its headers and part of its body, then waits
            sock = socket.create_connection(("127.0.0.1", proxy), timeout=10)
            sock.sendall(head + b"{")
            held.append(sock)
        time.sleep(0.5)
        assert _status(proxy, head + b"{" * 1000) == 429
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    assert _status(proxy, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n") == 200
    assert triton.is_ready()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/repository/index"),
        ("POST", f"/v2/repository/models/{DEMO_MODEL}/unload"),
        ("POST", "/v2/logging"),
        ("POST", "/v2/trace/setting"),
        ("POST", "/v2/systemsharedmemory/region/stub/register"),
        ("GET", "/v2/cudasharedmemory/status"),
        ("POST", f"/v2/models/{DEMO_MODEL}/trace/setting"),
    ],
)
def test_proxy_refuses_management_apis_when_called_through_it(proxy, method, path):
    raw = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    assert _status(proxy, raw) == 403


# ---- gRPC ---------------------------------------------------------------------------------


def _grpc_infer(url: str, images: np.ndarray) -> dict[str, np.ndarray]:
    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput("IMAGE", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        names = ("CLASS_ID", "CONFIDENCE", "GRADTRUST")
        outputs = [grpcclient.InferRequestedOutput(n) for n in names]
        result = client.infer(DEMO_MODEL, [tensor], outputs=outputs)
        return {n: result.as_numpy(n) for n in names}
    finally:
        client.close()


def test_proxy_answers_grpc_inference_like_triton_when_request_is_normal(
    proxy_ports, triton, digits
):
    images = digits[0][:8]
    through = _grpc_infer(f"127.0.0.1:{proxy_ports.grpc}", images)
    direct = _grpc_infer(triton.grpc_url, images)
    for name, value in direct.items():
        np.testing.assert_array_equal(through[name], value)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_model_repository_index(),
        lambda c: c.unload_model(DEMO_MODEL),
        lambda c: c.get_system_shared_memory_status(),
        lambda c: c.get_log_settings(),
        lambda c: c.get_trace_settings(),
    ],
    ids=["repository index", "unload", "shared memory", "logging", "trace"],
)
def test_proxy_refuses_grpc_management_rpcs_when_called_through_it(proxy_ports, triton, call):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{proxy_ports.grpc}")
    try:
        with pytest.raises(InferenceServerException, match="refused by the proxy") as err:
            call(client)
        assert "PERMISSION_DENIED" in str(err.value.status())
    finally:
        client.close()
    direct = httpclient.InferenceServerClient(triton.http_url)
    assert direct.is_model_ready(DEMO_MODEL)  # the unload never reached Triton


def test_proxy_refuses_a_grpc_message_over_64_mib_when_sent(proxy_ports):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{proxy_ports.grpc}")
    images = np.zeros((32, 1, 784, 784), np.float32)  # 75 MiB: over the proxy's limit
    tensor = grpcclient.InferInput("IMAGE", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.infer(DEMO_MODEL, [tensor])
    finally:
        client.close()
    assert "RESOURCE_EXHAUSTED" in str(err.value.status()), err.value
    assert "over the proxy's 64 MiB limit" in str(err.value)
