"""A 20-second soak (`make soak` runs the same script for 5 minutes): concurrent HTTP and
gRPC clients, zero failed or wrong answers, server memory reported at start and end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_soak_answers_every_request_correctly_when_http_and_grpc_clients_run_concurrently(
    tmp_path,
):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--duration", "20", "--threads", "4"]
        + ["--sample-every", "5", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(out.read_text())
    assert summary["failures"] == 0, summary["failure_examples"]
    for protocol in ("http", "grpc"):
        stats = summary["protocols"][protocol]
        assert stats["threads"] == 2 and stats["failures"] == 0
        assert stats["requests"] >= 50, stats  # both protocols really carried traffic
        assert stats["images"] >= stats["requests"]
    assert 18 <= summary["duration_s"] <= 60
    rss = summary["rss_bytes"]
    for moment in ("start", "end"):
        assert rss[moment]["tritonserver"] > 0
        stubs = [k for k in rss[moment] if k.startswith("triton_python_b")]
        assert len(stubs) == 1 and rss[moment][stubs[0]] > 0  # the model's stub is counted
        assert rss[moment]["total"] == sum(v for k, v in rss[moment].items() if k != "total")
    assert rss["growth"] == rss["end"]["total"] - rss["start"]["total"]
    assert rss["samples_s_bytes"], "no RSS sample during the run"


def test_soak_exits_nonzero_and_names_the_problem_when_arguments_are_wrong():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--protocols", "ftp", "--duration", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "--protocols takes http and/or grpc" in proc.stderr
