"""`gradtrust serve` as a user runs it: endpoints when ready, clean stop on SIGTERM/Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request

import pytest

from gradtrust.ops.tritonserver import free_port
from tests.conftest import MODEL_REPOSITORY
from tests.integration.triton_io import read_until_ready

pytestmark = pytest.mark.integration


def _serve(tmp_path) -> tuple[subprocess.Popen[str], int]:
    http = free_port()
    cmd = [
        sys.executable, "-m", "gradtrust.cli", "serve",
        "--model-repository", str(MODEL_REPOSITORY),
        "--http-port", str(http), "--grpc-port", str(free_port()),
        "--metrics-port", str(free_port()),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, http


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_endpoints_and_stops_cleanly_when_signalled(tmp_path, stop_signal):
    proc, http = _serve(tmp_path)
    try:
        text = read_until_ready(proc)
        assert "ready: gradtrust_mnist" in text, text
        assert f"http://127.0.0.1:{http}" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(stop_signal)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "stopped (exit code 0)" in rest


def test_serve_exits_with_clear_error_when_repository_is_missing(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradtrust.cli",
            "serve",
            "--model-repository",
            str(tmp_path / "nope"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "does not exist: pass --model-repository DIR" in result.stderr
