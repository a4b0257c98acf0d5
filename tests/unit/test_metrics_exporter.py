"""Specification of gradtrust.ops.exporter without a tritonserver: the endpoint answers even
when Triton does not, merges the files of stubs that are gone (their counts stay, their
live gauges go), serves /metrics only, and leaves nothing behind when stopped. The real
server is exercised in tests/integration/test_metrics_exposition.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gradtrust.errors import ServerError
from gradtrust.ops.exporter import MULTIPROC_ENV, MetricsExporter
from gradtrust.ops.tritonserver import free_port


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


def _stub_that_exits(directory: Path, model: str, calibrated: bool, n: int) -> None:
    """A process that writes a model's metrics as a stub does, then exits (as a stub that
    is unloaded, killed or replaced)."""
    code = (
        "import sys, numpy as np\n"
        "from gradtrust.serving.telemetry import TrustMetrics, LowTrustRule\n"
        "cal = sys.argv[3] == '1'\n"
        "rule = LowTrustRule('trust_prob', 0.5) if cal else LowTrustRule('gradtrust', 3.0)\n"
        "m = TrustMetrics(sys.argv[2], '1', rule, cal, sys.argv[1])\n"
        "n = int(sys.argv[4])\n"
        "m.observe_batch(np.full(n, 5.0), np.full(n, 0.9), 0.001, np.full(n, 0.9))\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(directory), model, "1" if calibrated else "0", str(n)],
        check=True,
    )


def test_exporter_answers_with_triton_down_when_nothing_listens_on_tritons_port():
    with MetricsExporter(free_port(), "127.0.0.1", triton_port=free_port()) as exporter:
        status, text = _get(exporter.url)
    assert status == 200
    assert "gradtrust_triton_up 0.0" in text
    assert "gradtrust_production_mode 0.0" in text


def test_exporter_says_production_when_the_server_runs_the_production_configuration():
    with MetricsExporter(free_port(), "127.0.0.1", production=True) as exporter:
        _, text = _get(exporter.url)
    assert "gradtrust_production_mode 1.0" in text


def test_exporter_keeps_counts_but_drops_live_gauges_when_the_writing_process_is_gone():
    with MetricsExporter(free_port(), "127.0.0.1") as exporter:
        directory = Path(exporter.environment[MULTIPROC_ENV])
        _stub_that_exits(directory, "m", calibrated=True, n=5)
        _stub_that_exits(directory, "m", calibrated=True, n=7)
        _, text = _get(exporter.url)
    assert 'gradtrust_predictions_total{model="m",version="1"} 12.0' in text
    assert 'gradtrust_trust_count{model="m",version="1"} 12.0' in text
    assert "gradtrust_model_calibrated" not in text.replace("# HELP", "").replace("# TYPE", "")


def test_exporter_serves_only_metrics_when_asked_for_another_path():
    with MetricsExporter(free_port(), "127.0.0.1") as exporter:
        status, _ = _get(exporter.url.replace("/metrics", "/v2/health/ready"))
    assert status == 404


def test_exporter_starts_from_an_empty_directory_and_removes_it_when_stopped():
    exporter = MetricsExporter(free_port(), "127.0.0.1").start()
    directory = Path(exporter.environment[MULTIPROC_ENV])
    assert directory.is_dir() and not any(directory.iterdir())
    _stub_that_exits(directory, "m", calibrated=False, n=1)
    exporter.stop()
    assert not directory.exists()
    exporter.stop()  # idempotent
    with pytest.raises(ServerError, match="start the metrics exporter"):
        _ = exporter.environment


def test_exporter_names_the_port_when_it_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"{port}.*--metrics-port"):
            MetricsExporter(port, "127.0.0.1").start()


def test_exporter_listens_on_ipv6_when_given_an_ipv6_address():
    if not socket.has_ipv6:
        pytest.skip("this host has no IPv6")  # the loopback ::1 exists wherever IPv6 does
    with MetricsExporter(0, "::1") as exporter:
        (host, _), *_ = exporter.listening()
        status, text = _get(exporter.url)
    assert host == "::1" and exporter.url.startswith("http://[::1]:")
    assert status == 200 and "gradtrust_triton_up" in text
