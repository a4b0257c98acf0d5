"""`gradtrust serve --production` as an operator runs it, and input limits on a real server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from gradtrust.ops.tritonserver import ADMIN_HEADER, ADMIN_KEY_ENV, Ports, free_port, start_server
from tests.conftest import DEMO_MODEL, MODEL_REPOSITORY
from tests.integration.triton_io import PROTOCOLS, infer, read_until_ready

pytestmark = pytest.mark.integration

KEY = "cli-admin-key-0123456789abcdef"


def _serve(env: dict[str, str], http: int) -> subprocess.Popen[str]:
    cmd = [
        # The bundled Triton 2.51 has known critical flaws, so --production needs the
        # override here (test_security_abuse.py checks the refusal without it).
        sys.executable, "-m", "gradtrust.cli", "serve", "--production",
        "--allow-vulnerable-triton",
        "--model-repository", str(MODEL_REPOSITORY), "--address", "127.0.0.1",
        "--http-port", str(http), "--grpc-port", str(free_port()),
        "--metrics-port", str(free_port()),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def test_serve_production_refuses_to_start_when_admin_key_is_not_set():
    env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}
    proc = _serve(env, free_port())
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert ADMIN_KEY_ENV in out and "secrets.token_urlsafe" in out


def test_serve_production_guards_management_apis_and_stops_cleanly_when_signalled():
    http = free_port()
    proc = _serve({**os.environ, ADMIN_KEY_ENV: KEY}, http)
    try:
        text = read_until_ready(proc)
        assert f"ready: {DEMO_MODEL}" in text and "(production configuration)" in text, text
        assert KEY not in text
        index = f"http://127.0.0.1:{http}/v2/repository/index"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(index, data=b"{}"), timeout=10)
        assert refused.value.code == 403
        request = urllib.request.Request(index, data=b"{}", headers={ADMIN_HEADER: KEY})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "stopped (exit code 0)" in rest


def _limited_repository(tmp_path: Path, max_bytes: int) -> Path:
    repo = tmp_path / "repo"
    entry = repo / DEMO_MODEL
    shutil.copytree(
        MODEL_REPOSITORY / DEMO_MODEL, entry, ignore=shutil.ignore_patterns("__pycache__")
    )
    config = entry / "config.pbtxt"
    limit = f'{{ key: "max_request_bytes", value: {{ string_value: "{max_bytes}" }} }},'
    config.write_text(config.read_text().replace("parameters [", f"parameters [\n  {limit}"))
    return repo


def test_server_rejects_only_the_big_request_when_it_exceeds_max_request_bytes(tmp_path, digits):
    per_digit = 28 * 28 * 4
    server = start_server(
        _limited_repository(tmp_path, 4 * per_digit),
        ports=Ports(http=free_port(), grpc=free_port(), metrics=free_port()),
        log_path=tmp_path / "tritonserver.log",
        exit_timeout_s=5,
        address="127.0.0.1",
    )
    try:
        for protocol in PROTOCOLS:
            ok = infer(server, protocol, digits[0][:4])
            np.testing.assert_array_equal(ok["CLASS_ID"][:, 0], digits[1][:4])
            with pytest.raises(InferenceServerException) as info:
                infer(server, protocol, digits[0][:5])
            assert "max_request_bytes" in str(info.value)
            assert str(info.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT")
    finally:
        server.stop()
