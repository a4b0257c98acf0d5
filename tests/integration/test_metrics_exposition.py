"""The metrics endpoint by the book, on real servers: promtool finds nothing to complain
about in any gradtrust_ metric (one model; two models with two instances of one), counts
stay exact when several instances share the work, a scrape during a model reload or a
stub restart neither fails nor counts twice, and a real Prometheus fires the alert for an
uncalibrated model served in production, and not for a calibrated one.

Each test starts what it needs: the session's demo server (one model, one instance), a
production server with the calibrated demo model (``instance_group count: 2``) beside an
uncalibrated copy, and servers whose model is reloaded or whose stub is killed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector

from gradtrust.core.calibration import load_model_calibration
from gradtrust.ops.exporter import MetricsExporter
from gradtrust.ops.processes import stubs_launched_by
from gradtrust.ops.supervisor import Supervisor
from gradtrust.ops.tritonserver import Ports, TritonServer, free_port, start_server
from tests.conftest import DEMO_MODEL, MODEL_REPOSITORY
from tests.integration.test_prometheus_live import _wait_for, running_prometheus
from tests.integration.triton_io import infer, read_until_ready
from tests.unit.test_deploy import RULE_FILES

pytestmark = pytest.mark.integration

ADMIN_KEY = "test-admin-key-0123456789"
UNCALIBRATED = "gradtrust_mnist_uncalibrated"
CALIBRATION_FILE = "trust_calibration.json"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


# --- reading the endpoint -----------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            found.append((match[1], dict(_LABEL.findall(match[2] or "")), float(match[3])))
    return found


def _total(text: str, name: str, model: str, **labels: str) -> float:
    return sum(
        v
        for n, lab, v in _samples(text)
        if n == name and lab.get("model") == model and labels.items() <= lab.items()
    )


def _promtool_complaints(metrics_url: str) -> tuple[list[str], str]:
    """promtool's complaints about the gradtrust_ metrics of the live endpoint, and the
    endpoint's text. (Triton's own nv_* names break the conventions; they are not ours.)"""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed; run `make test-tools`")
    status, text = _get(metrics_url)
    assert status == 200, text[:500]
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    lines = (check.stdout + check.stderr).decode().splitlines()
    return [line for line in lines if "gradtrust_" in line or "error" in line.lower()], text


def _traffic(server: Any, model: str, digits: Any, sizes: list[int]) -> int:
    images = digits[0]
    start = 0
    for n, size in enumerate(sizes):
        batch = images[start : start + size]
        start = (start + size) % (len(images) - 64)
        infer(server, ("http", "grpc")[n % 2], batch, model=model)
    return sum(sizes)


# --- one model, one instance: the session's demo server ------------------------------------


def test_promtool_finds_nothing_wrong_with_gradtrust_metrics_when_one_instance_served(
    triton_server, digits
):
    _traffic(triton_server, DEMO_MODEL, digits, [1, 7, 32, 2])
    complaints, text = _promtool_complaints(triton_server.metrics_url)
    assert not complaints, "\n".join(complaints)
    assert "# TYPE gradtrust_trust histogram" in text
    assert "# TYPE gradtrust_confidence histogram" in text
    assert "# TYPE gradtrust_predictions_total counter" in text
    assert "gradtrust_triton_up 1.0" in text


# --- two models, two instances of one, in production ---------------------------------------


def _entry(repo: Path, name: str, instances: int, calibrated: bool) -> Path:
    entry = repo / name
    shutil.copytree(
        MODEL_REPOSITORY / DEMO_MODEL, entry, ignore=shutil.ignore_patterns("__pycache__")
    )
    config = entry / "config.pbtxt"
    text = config.read_text().replace(f'name: "{DEMO_MODEL}"', f'name: "{name}"')
    text = text.replace(
        "instance_group [ { count: 1 } ]", f"instance_group [ {{ count: {instances} }} ]"
    )
    assert f"count: {instances}" in text, "the demo config's instance_group changed"
    config.write_text(text)
    if not calibrated:
        (entry / CALIBRATION_FILE).unlink()
    return entry


@pytest.fixture(scope="module")
def production_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The calibrated demo model with two instances, and an uncalibrated copy, served in
    the production configuration."""
    if not (MODEL_REPOSITORY / DEMO_MODEL / CALIBRATION_FILE).is_file():
        pytest.fail(f"the bundled {DEMO_MODEL} entry must be calibrated ({CALIBRATION_FILE})")
    repo = tmp_path_factory.mktemp("pair")
    _entry(repo, DEMO_MODEL, instances=2, calibrated=True)
    _entry(repo, UNCALIBRATED, instances=1, calibrated=False)
    server = start_server(
        repo,
        ports=Ports(free_port(), free_port(), free_port()),
        log_path=repo.parent / "pair.log",
        admin_key=ADMIN_KEY,
        address="127.0.0.1",
        timeout_s=240,
        exit_timeout_s=5,
    )
    try:
        assert sorted(server.models) == sorted([DEMO_MODEL, UNCALIBRATED]), server.failed_models
        yield server
    finally:
        server.stop()


def test_promtool_finds_nothing_wrong_with_gradtrust_metrics_when_two_models_and_instances(
    production_pair, digits
):
    for model in (DEMO_MODEL, UNCALIBRATED):
        _traffic(production_pair, model, digits, [1, 5, 40, 3])
    complaints, text = _promtool_complaints(production_pair.metrics_url)
    assert not complaints, "\n".join(complaints)
    samples = _samples(text)
    calibrated = {lab["model"]: v for n, lab, v in samples if n == "gradtrust_model_calibrated"}
    assert calibrated == {DEMO_MODEL: 1.0, UNCALIBRATED: 0.0}
    prob_models = {
        lab["model"] for n, lab, _ in samples if n.startswith("gradtrust_trust_probability")
    }
    assert prob_models == {DEMO_MODEL}  # only the calibrated model has TRUST_PROB
    assert ("gradtrust_production_mode", {}, 1.0) in samples
    # The calibration's held-out ECE, as its file records it, for the calibrated model only.
    recorded = load_model_calibration(MODEL_REPOSITORY / DEMO_MODEL)
    assert recorded is not None and recorded.heldout_ece
    exported = {
        (lab["model"], lab["part"], lab["output"]): v
        for n, lab, v in samples
        if n == "gradtrust_calibration_heldout_ece"
    }
    assert exported == {
        (DEMO_MODEL, part, output): pytest.approx(ece[key])
        for part, ece in recorded.heldout_ece.items()
        for output, key in (("TRUST_PROB", "trust_prob"), ("CONFIDENCE", "confidence"))
    }


def test_counts_are_exact_when_two_instances_share_concurrent_clients_of_mixed_batch_sizes(
    production_pair, digits
):
    url = production_pair.metrics_url
    _, before = _get(url)
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 9, 160).tolist()
    images = digits[0]
    jobs = [
        (("http", "grpc")[n % 2], images[s : s + size])
        for n, (s, size) in enumerate(
            zip(rng.integers(0, len(images) - 9, len(sizes)).tolist(), sizes, strict=True)
        )
    ]
    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(lambda job: infer(production_pair, job[0], job[1], model=DEMO_MODEL), jobs))
    _, after = _get(url)
    sent = sum(sizes)
    for name in (
        "gradtrust_predictions_total",
        "gradtrust_trust_count",
        "gradtrust_confidence_count",
        "gradtrust_trust_probability_count",
    ):
        assert _total(after, name, DEMO_MODEL) - _total(before, name, DEMO_MODEL) == sent, name
    # Each of the three stubs writes its own files; both instances of the demo model
    # counted predictions, and the endpoint's totals above are their sums.
    directory = Path(production_pair.exporter.directory)
    stubs = stubs_launched_by(production_pair.process.pid)
    assert len(stubs) == 3 and len(list(directory.glob("counter_*.db"))) == 3, stubs
    serving = [
        path
        for path in directory.glob("counter_*.db")
        if any(
            s.name == "gradtrust_predictions_total" and s.labels["model"] == DEMO_MODEL and s.value
            for family in MultiProcessCollector.merge([str(path)])
            for s in family.samples
        )
    ]
    assert len(serving) == 2, f"only {len(serving)} of the two instances served"


def _rules_firing_quickly(work: Path, alert: str) -> list[Path]:
    """The project's rules with ``alert``'s ``for`` cut to 1 s (its real duration is
    unit-tested by promtool in deploy/prometheus/tests), so the test need not wait 5 min."""
    out = []
    for path in RULE_FILES:
        data = yaml.safe_load(path.read_text())
        for group in data["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == alert:
                    rule["for"] = "1s"
        target = work / path.name
        target.write_text(yaml.safe_dump(data))
        out.append(target)
    return out


def test_prometheus_fires_the_uncalibrated_alert_only_for_the_uncalibrated_model_in_production(
    production_pair, tmp_path
):
    alert = "GradTrustUncalibratedInProduction"
    rules = _rules_firing_quickly(tmp_path, alert)
    with running_prometheus(production_pair.metrics_url, tmp_path, rules) as prometheus:

        def firing() -> list[dict[str, Any]] | None:
            alerts = [
                a
                for a in prometheus.api("alerts")["alerts"]
                if a["labels"]["alertname"] == alert and a["state"] == "firing"
            ]
            return alerts or None

        alerts = _wait_for(f"{alert} to fire", firing, timeout_s=60)
        time.sleep(3)  # several more evaluations: a calibrated model would have joined by now
        alerts = firing() or []
        assert {a["labels"]["model"] for a in alerts} == {UNCALIBRATED}
        assert alerts[0]["labels"]["severity"] == "warning"
        assert "gradtrust calibrate" in alerts[0]["annotations"]["description"]


# --- reloads and restarts ------------------------------------------------------------------


class _Scraper:
    """Scrapes an endpoint in a loop, recording each status and one model's prediction
    count, until stopped."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.statuses: list[int] = []
        self.counts: list[float] = []
        self.triton_up: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, text = _get(self.url)
            except OSError:
                status, text = 0, ""
            self.statuses.append(status)
            if status == 200:
                self.counts.append(_total(text, "gradtrust_predictions_total", self.model))
                self.triton_up += [v for n, _, v in _samples(text) if n == "gradtrust_triton_up"]
            time.sleep(0.05)

    def __enter__(self) -> _Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def assert_never_failed_nor_went_back(self) -> None:
        assert self.statuses and set(self.statuses) == {200}, sorted(set(self.statuses))
        assert all(a <= b for a, b in zip(self.counts, self.counts[1:], strict=False))


def _wait(what: str, check: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_scrape_during_a_model_reload_neither_fails_nor_counts_twice_when_reloaded(
    tmp_path, digits
):
    repo = tmp_path / "repo"
    entry = _entry(repo, UNCALIBRATED, instances=1, calibrated=False)
    server = start_server(
        repo,
        ports=Ports(free_port(), free_port(), free_port()),
        log_path=tmp_path / "triton.log",
        extra_args=["--model-control-mode=explicit", f"--load-model={UNCALIBRATED}"],
        address="127.0.0.1",
        exit_timeout_s=5,
    )
    try:
        first_stubs = {s.pid for s in stubs_launched_by(server.process.pid)}
        sent = _traffic(server, UNCALIBRATED, digits, [3, 17, 1])
        config = entry / "config.pbtxt"
        config.write_text(
            re.sub(
                r'key: "low_trust_threshold", value: \{ string_value: "[^"]*" \}',
                'key: "low_trust_threshold", value: { string_value: "2.5" }',
                config.read_text(),
            )
        )
        with _Scraper(server.metrics_url, UNCALIBRATED) as scraper:
            status, body = _get_post(
                f"http://{server.http_url}/v2/repository/models/{UNCALIBRATED}/load"
            )
            assert status == 200, body
            sent += _traffic(server, UNCALIBRATED, digits, [5, 2])
        scraper.assert_never_failed_nor_went_back()
        # Triton starts the new instance before it lets the old one go.
        _wait(
            "the old stub to exit",
            lambda: {s.pid for s in stubs_launched_by(server.process.pid)}.isdisjoint(first_stubs),
            timeout_s=60,
        )
        _, text = _get(server.metrics_url)
        assert _total(text, "gradtrust_predictions_total", UNCALIBRATED) == sent
        assert _total(text, "gradtrust_trust_count", UNCALIBRATED) == sent
        # The old stub's gauges are gone with it: one threshold, the new one.
        thresholds = [v for n, lab, v in _samples(text) if n == "gradtrust_low_trust_threshold"]
        assert thresholds == [2.5]
    finally:
        server.stop()


def _get_post(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


def test_a_scrape_during_a_stub_restart_neither_fails_nor_counts_twice_when_the_stub_dies(
    tmp_path, digits
):
    ports = Ports(free_port(), free_port(), free_port())
    with MetricsExporter(ports.metrics, "127.0.0.1") as exporter:

        def start() -> TritonServer:
            return start_server(
                MODEL_REPOSITORY,
                ports=ports,
                log_path=tmp_path / "triton.log",
                address="127.0.0.1",
                exit_timeout_s=5,
                exporter=exporter,
            )

        supervisor = Supervisor(start, drain_s=3)
        try:
            sent = _traffic(supervisor.server, DEMO_MODEL, digits, [4, 1, 30])
            with _Scraper(exporter.url, DEMO_MODEL) as scraper:
                (stub,) = stubs_launched_by(supervisor.server.process.pid)
                os.kill(stub.pid, signal.SIGKILL)
                _wait("the supervisor to restart tritonserver", lambda: bool(supervisor.check()))
                sent += _traffic(supervisor.server, DEMO_MODEL, digits, [2, 9])
            scraper.assert_never_failed_nor_went_back()
            assert 0.0 in scraper.triton_up, "no scrape fell into the restart"
            _, text = _get(exporter.url)
            assert _total(text, "gradtrust_predictions_total", DEMO_MODEL) == sent
            assert _total(text, "gradtrust_trust_count", DEMO_MODEL) == sent
            calibrated = [v for n, _, v in _samples(text) if n == "gradtrust_model_calibrated"]
            assert calibrated == [1.0]  # the dead stub's gauge is gone, the new one's is there
        finally:
            supervisor.stop()


# --- the command the container images run --------------------------------------------------


def test_gradtrust_serve_exports_histograms_on_its_metrics_port_when_run_as_the_images_do(
    digits,
):
    """`gradtrust serve` (the CMD of deploy/Dockerfile and the Kubernetes args, minus
    --production, which needs a key and a patched Triton): its banner lists the metrics
    port as listening, and that port answers with the models' histograms."""
    ports = Ports(free_port(), free_port(), free_port())
    cmd = [
        sys.executable, "-m", "gradtrust.cli", "serve",
        "--model-repository", str(MODEL_REPOSITORY), "--address", "127.0.0.1",
        "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
        "--metrics-port", str(ports.metrics),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = read_until_ready(proc)
        assert re.search(rf"metrics\s+listening on 127\.0\.0\.1:{ports.metrics}", banner), banner
        server = _Endpoints(ports)
        sent = _traffic(server, DEMO_MODEL, digits, [2, 3])
        complaints, text = _promtool_complaints(server.metrics_url)
        assert not complaints, "\n".join(complaints)
        assert _total(text, "gradtrust_predictions_total", DEMO_MODEL) == sent
        assert "# TYPE gradtrust_trust histogram" in text
        assert "gradtrust_triton_up 1.0" in text
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class _Endpoints:
    """What the test helpers need of a server: its URLs."""

    def __init__(self, ports: Ports) -> None:
        self.http_url = f"127.0.0.1:{ports.http}"
        self.grpc_url = f"127.0.0.1:{ports.grpc}"
        self.metrics_url = f"http://127.0.0.1:{ports.metrics}/metrics"
