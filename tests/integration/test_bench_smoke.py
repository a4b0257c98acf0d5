"""The benchmark scripts run end to end on their tiny ``--quick`` configuration.

Benchmarks are not tests: nothing here judges speed. It checks that each script runs
(the serving one against a real tritonserver), answers every request, and writes complete
JSON and markdown, so that ``make bench`` cannot rot unnoticed.
"""

from __future__ import annotations

import json
import pstats
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import _common as common
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def _run_quick(module: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _load(out: Path, name: str) -> dict[str, Any]:
    assert (out / f"{name}.md").read_text().strip()
    return json.loads((out / f"{name}.json").read_text())


def test_bench_inprocess_times_every_model_and_batch_when_run_quick(tmp_path: Path) -> None:
    proc = _run_quick("bench.inprocess", tmp_path)
    data = _load(tmp_path, "inprocess_quick")
    assert data["device"] == "cpu"
    assert [(m["model"], m["num_classes"]) for m in data["models"]] == [
        ("demo", 10),
        ("resnet18", 1000),
        ("mobilenet", 1000),
    ]
    for model in data["models"]:
        assert [r["batch"] for r in model["batches"]] == [1, 8]
        for row in model["batches"]:
            assert row["forward_per_sample_s"] > 0
            assert row["scores_per_sample_s"] > 0
            assert row["service_all_scores_per_sample_s"] > 0
            for method in ("gradcam", "contrast", "voice"):
                assert row[f"heat_{method}_per_sample_s"] > 0
                assert 0 < row[f"service_{method}_x_plain"] <= 1
        autograd = model["autograd"]
        assert autograd["head_per_sample_s"] > 0 and autograd["full_per_sample_s"] > 0
        # The autograd baseline computes the same score as the closed form (float32 noise).
        assert autograd["head_max_rel_diff_vs_closed_form"] < 1e-3
        assert autograd["full_max_rel_diff_vs_closed_form"] < 1e-3
    assert {t["met"] for t in data["targets"]} <= {True, False, None}
    if not data["gpu"]["available"]:
        assert "GPU variant skipped" in proc.stderr


def test_bench_serving_answers_every_cell_without_errors_when_run_quick(tmp_path: Path) -> None:
    _run_quick("bench.serving", tmp_path, "--profile", str(tmp_path / "profiles"), "--pin-server")
    data = _load(tmp_path, "serving_quick")
    # --pin-server: tritonserver and the load generator on disjoint CPUs, as read back.
    server_cpus, client_cpus = set(data["pinned"]["server"]), set(data["pinned"]["client"])
    assert server_cpus and client_cpus and not server_cpus & client_cpus
    cells = data["cells"]
    variants = {"plain", "class_id", "gradtrust", "scores", "heatmap", "contrast", "voice"}
    variants.add("voice_act")
    for model in ("demo", "resnet18", "mobilenet"):
        for protocol in ("http", "grpc"):
            got = {c["variant"] for c in cells if (c["model"], c["protocol"]) == (model, protocol)}
            assert got == variants
    assert all(c["errors"] == 0 and c["requests"] > 0 and c["p50_ms"] > 0 for c in cells)
    # Dynamic batching was on and counted by Triton itself.
    assert all(c["avg_server_batch"] >= 1.0 for c in cells)
    heat = data["heatmap_latency"]
    assert {(h["batch"], h["variant"]) for h in heat} == {
        (b, v) for b in (1, 4) for v in ("plain", "gradtrust", "heatmap")
    }
    memory = data["memory"]
    names = {p["name"] for p in memory["after_start"]["processes"]}
    assert "tritonserver" in names
    assert {"stub:gradtrust_mnist", "stub:gradtrust_mnist_plain"} <= names
    assert memory["sustained"]["requests"] > 0 and memory["sustained"]["errors"] == 0
    assert memory["after_sustained"]["total_mib"] > 0
    # --profile: each served model wrote its execute() profile when the server unloaded it.
    for model in ("gradtrust_mnist", "gradtrust_mnist_plain", "bench_resnet18"):
        stats = pstats.Stats(str(tmp_path / "profiles" / f"{model}.prof"))
        assert any(func[2] == "execute" for func in stats.stats), model


def test_bench_service_cost_reports_both_c1000_models_and_the_probe_when_run_pinned() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.service_cost",
            "--seconds",
            "0.5",
            "--pin",
            "--sweep-mib",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "%" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["resnet18", "mobilenet"]
    # Pinned to the CPUs tritonserver gets under bench.serving --pin-server.
    assert f"CPUs {sorted(common.split_cores()[0])}" in lines[0]
    probe = [line.split("|") for line in lines if line.startswith("| `")]
    assert len(probe) == 5
    for cells in probe:  # call, after forward, after copying, again: three positive times
        assert all(float(cell) > 0 for cell in cells[2:5]), cells
