"""The production configuration on a real server: management APIs need the admin key,
model control is off, and inference, health, metadata and model config stay open."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gradtrust.errors import ServerError
from gradtrust.ops.tritonserver import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    GRPC_ADMIN_HEADER,
    Ports,
    TritonServer,
    admin_key_from_env,
    free_port,
    production_args,
    start_server,
)
from gradtrust_client import NO_RETRY, TrustClient
from tests.conftest import DEMO_MODEL, MODEL_REPOSITORY

pytestmark = pytest.mark.integration

KEY = "Prod-Key_0123456789abcdefXYZ"
WRONG = "Wrong-Key_0123456789abcdefXYZ"
#: (method, path, body) of each restricted HTTP API, one per category.
RESTRICTED_HTTP = [
    ("POST", "/v2/repository/index", b"{}"),
    ("POST", f"/v2/repository/models/{DEMO_MODEL}/unload", b"{}"),
    ("GET", "/v2/logging", None),
    ("GET", "/v2/trace/setting", None),
    ("GET", "/v2/systemsharedmemory/status", None),
]
OPEN_HTTP = [
    ("GET", "/v2/health/live"),
    ("GET", "/v2"),
    ("GET", f"/v2/models/{DEMO_MODEL}"),
    ("GET", f"/v2/models/{DEMO_MODEL}/config"),
    ("GET", f"/v2/models/{DEMO_MODEL}/ready"),
    ("GET", f"/v2/models/{DEMO_MODEL}/stats"),
]


@pytest.fixture(scope="module")
def production(tmp_path_factory) -> Iterator[TritonServer]:
    log = tmp_path_factory.mktemp("production") / "tritonserver.log"
    server = start_server(
        MODEL_REPOSITORY,
        ports=Ports(http=free_port(), grpc=free_port(), metrics=free_port()),
        log_path=log,
        exit_timeout_s=5,
        admin_key=KEY,
        address="127.0.0.1",
    )
    try:
        yield server
    finally:
        server.stop()


def _http(server: TritonServer, method: str, path: str, body: bytes | None, headers=None):
    request = urllib.request.Request(
        f"http://{server.http_url}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.parametrize(("method", "path", "body"), RESTRICTED_HTTP)
def test_production_refuses_management_api_over_http_when_admin_key_is_missing_or_wrong(
    production, method, path, body
):
    for headers in (None, {ADMIN_HEADER: WRONG}):
        status, text = _http(production, method, path, body, headers)
        assert status == 403 and "restricted" in text, (headers, status, text)


@pytest.mark.parametrize(
    ("method", "path", "body"), [r for r in RESTRICTED_HTTP if "unload" not in r[1]]
)
def test_production_answers_management_api_over_http_when_admin_key_is_sent(
    production, method, path, body
):
    status, text = _http(production, method, path, body, {ADMIN_HEADER: KEY})
    assert status == 200, text


def test_production_keeps_models_loaded_when_even_the_admin_asks_to_unload(production):
    status, text = _http(
        production, "POST", f"/v2/repository/models/{DEMO_MODEL}/unload", b"{}", {ADMIN_HEADER: KEY}
    )
    assert status != 200 and "not allowed" in text  # model control is off
    assert _http(production, "GET", f"/v2/models/{DEMO_MODEL}/ready", None)[0] == 200


@pytest.mark.parametrize(("method", "path"), OPEN_HTTP)
def test_production_keeps_health_metadata_config_and_stats_open_when_no_key_is_sent(
    production, method, path
):
    assert _http(production, method, path, None)[0] == 200


GRPC_CALLS = {
    "repository index": lambda c, h: c.get_model_repository_index(headers=h),
    "unload": lambda c, h: c.unload_model(DEMO_MODEL, headers=h),
    "log settings": lambda c, h: c.get_log_settings(headers=h),
    "trace settings": lambda c, h: c.get_trace_settings(headers=h),
    "shared memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
}


@pytest.mark.parametrize("call", sorted(GRPC_CALLS))
def test_production_refuses_management_api_over_grpc_when_admin_key_is_missing_or_wrong(
    production, call
):
    client = grpcclient.InferenceServerClient(production.grpc_url)
    try:
        for headers in (None, {ADMIN_HEADER: KEY}, {GRPC_ADMIN_HEADER: WRONG}):
            with pytest.raises(InferenceServerException, match="restricted"):
                GRPC_CALLS[call](client, headers)
    finally:
        client.close()


@pytest.mark.parametrize("call", ["repository index", "log settings", "trace settings"])
def test_production_answers_management_api_over_grpc_when_admin_key_is_sent(production, call):
    client = grpcclient.InferenceServerClient(production.grpc_url)
    try:
        GRPC_CALLS[call](client, production.admin_grpc_headers)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_production_serves_inference_without_any_key_when_client_is_ordinary(
    production, digits, protocol
):
    url = production.http_url if protocol == "http" else production.grpc_url
    with TrustClient(url, protocol, DEMO_MODEL, retry=NO_RETRY) as client:
        predictions = client.predict(digits[0][:8], scores=True)
    assert [p.class_id for p in predictions] == digits[1][:8].tolist()


def test_production_keeps_the_admin_key_out_of_the_log_when_running(production):
    assert KEY not in production.log_tail(1_000_000)


def test_production_args_turn_model_control_off_and_restrict_management_when_given_a_key():
    args = production_args(KEY)
    assert "--model-control-mode=none" in args and "--exit-on-error=false" in args
    apis = "model-repository,logging,trace,shared-memory"
    assert f"--http-restricted-api={apis}:{ADMIN_HEADER}={KEY}" in args
    assert f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={KEY}" in args


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, f"needs an admin key in ${ADMIN_KEY_ENV}"),
        ({ADMIN_KEY_ENV: "short"}, "16-256 characters"),
        ({ADMIN_KEY_ENV: "has:colon=and,comma-0123456789"}, "16-256 characters"),
    ],
)
def test_admin_key_from_env_refuses_the_key_when_missing_weak_or_unparseable(env, message):
    with pytest.raises(ServerError, match=message.replace("$", r"\$")):
        admin_key_from_env(env)


#: /proc/net/tcp{,6} spellings of loopback addresses (127.0.0.1, ::ffff:127.0.0.1, ::1).
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def _listening() -> dict[int, set[str]]:
    """Port -> the local addresses listening on it, from the kernel's socket tables."""
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    address, port = fields[1].split(":")
                    found.setdefault(int(port, 16), set()).add(address)
    return found


def test_production_server_listens_on_loopback_only_when_address_is_loopback(production):
    listening = _listening()
    for port in (production.ports.http, production.ports.grpc, production.ports.metrics):
        assert listening.get(port), f"nothing listens on {port}"
        assert listening[port] <= LOOPBACK, f"port {port} listens on {listening[port]}"
