"""A real Prometheus scraping the real server's metrics endpoint (gradtrust.ops.exporter):
the gradtrust metrics arrive with the right counts and the right types (histograms as
histograms, in Prometheus' metadata), and every PromQL expression of the rules, the
dashboard and the autoscaler parses and returns data.

Prometheus is Debian's binary (`make test-tools`), started on a free loopback port with the
project's rule files and a 1-second scrape and evaluation interval.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from tritonclient.utils import InferenceServerException

from gradtrust.ops.tritonserver import free_port
from gradtrust.serving.telemetry import (
    CONFIDENCE_BUCKETS,
    HISTOGRAMS,
    TRUST_BUCKETS,
    TRUST_PROBABILITY_BUCKETS,
)
from tests.integration.triton_io import infer, model_samples, settled
from tests.unit.test_deploy import (
    K8S,
    RULE_FILES,
    TRITON_JOB,
    _dashboard_exprs,
    _rules,
    adapter_to_promql,
    grafana_to_promql,
)

pytestmark = pytest.mark.integration

SCRAPE_WAIT_S = 30.0


# --- a Prometheus server for the session's Triton ------------------------------------------


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus answered {body} for {path} {params}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises (with Prometheus' message) when the expression does not parse."""
        try:
            data = self.api("query", query=expr)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{expr!r}: {err.read().decode()}") from err
        return data["result"]

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


def _wait_for(what: str, check: Callable[[], Any], timeout_s: float = SCRAPE_WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last: {last}")


@contextlib.contextmanager
def running_prometheus(
    metrics_url: str, work: Path, rule_files: list[Path] | None = None
) -> Iterator[Prometheus]:
    """A real Prometheus scraping ``metrics_url`` every second as job gradtrust-triton,
    evaluating ``rule_files`` (default: the project's) every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus server is not installed; run `make test-tools`")
    target = urllib.parse.urlsplit(metrics_url)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in (RULE_FILES if rule_files is None else rule_files)],
        "scrape_configs": [
            {
                "job_name": TRITON_JOB,
                "metrics_path": target.path,
                "static_configs": [{"targets": [target.netloc]}],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = work / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited: {server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        _wait_for("prometheus to become ready", ready)
        _wait_for(
            "the first scrape of Triton", lambda: server.query(f'up{{job="{TRITON_JOB}"}} == 1')
        )
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def prometheus(
    triton_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    with running_prometheus(
        triton_server.metrics_url, tmp_path_factory.mktemp("prometheus")
    ) as server:
        yield server


# --- what the server exports right now, read directly from its metrics port -----------------

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, labels other than model/version)
_EXPORTED = re.compile(r"gradtrust_.+|nv_inference_.+")


def _key(name: str, labels: dict[str, str]) -> Key:
    return name, tuple(sorted((k, v) for k, v in labels.items() if k not in ("model", "version")))


def _scrape(server: Any) -> dict[Key, float]:
    """The model's samples straight from the server's metrics endpoint."""
    return {
        _key(name, labels): value
        for name, labels, value in model_samples(server)
        if _EXPORTED.fullmatch(name)
    }


def _prometheus_values(prom: Prometheus, model: str) -> dict[Key, float]:
    """The same samples as Prometheus stored them (its own job/instance labels dropped)."""
    result = prom.query(f'{{__name__=~"{_EXPORTED.pattern}",model="{model}"}}')
    values: dict[Key, float] = {}
    for r in result:
        labels = {k: v for k, v in r["metric"].items() if k not in ("job", "instance")}
        values[_key(labels.pop("__name__"), labels)] = float(r["value"][1])
    return values


def _le(label: str) -> float:
    return math.inf if label == "+Inf" else float(label)


@dataclass
class Traffic:
    """What the test sent, what the server answered, and Prometheus' counters around it."""

    rule: str  # the score low trust is judged on: "gradtrust" or "trust_prob"
    threshold: float
    before: dict[Key, float]
    after: dict[Key, float] = field(default_factory=dict)
    gradtrust: list[float] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    trust_prob: list[float] = field(default_factory=list)
    requests_ok: int = 0
    requests_invalid: int = 0
    heatmap_requests: int = 0

    def delta(self, name: str, **labels: str) -> float:
        """Change of a sample, summed over its other labels (e.g. Triton's failure reason)."""

        def total(values: dict[Key, float]) -> float:
            want = set(labels.items())
            return sum(v for (n, extra), v in values.items() if n == name and want <= set(extra))

        return total(self.after) - total(self.before)

    def le_labels(self, name: str) -> dict[float, str]:
        return {_le(dict(extra)["le"]): dict(extra)["le"] for (n, extra) in self.after if n == name}

    def edges(self, name: str) -> list[float]:
        return sorted(self.le_labels(name))


def low_trust_rule(server: Any) -> tuple[str, float]:
    """(score, threshold) of the served model's low-trust rule, as its gauge exports it."""
    rules = [
        (labels["score"], value)
        for name, labels, value in model_samples(server)
        if name == "gradtrust_low_trust_threshold"
    ]
    assert len(rules) == 1, rules
    return rules[0]


def _inputs(digits: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """Real digits, and inputs a digit classifier should not trust: uniform noise, sparse
    dots, and overlays of two or three different digits; in batches of several sizes."""
    images = digits[0]
    rng = np.random.default_rng(20261129)
    n = len(images)
    a, b, c = (rng.integers(0, n, 128) for _ in range(3))
    noise = rng.random((16, *images.shape[1:]), dtype=np.float32)
    dots = (rng.random((16, *images.shape[1:])) < 0.15).astype(np.float32)
    overlays2 = np.clip(images[a[:64]] + images[b[:64]], 0.0, 1.0)
    overlays3 = np.clip(images[a[64:]] + images[b[64:]] + images[c[64:]], 0.0, 1.0)
    return [images[:1], images[1:33], noise, dots, overlays2, overlays3, images[33:40]]


@pytest.fixture(scope="module")
def traffic(triton_server: Any, prometheus: Prometheus, digits: Any) -> Traffic:
    """Sends the traffic once, sequentially (so every request runs as its own batch)."""
    model = triton_server.model_name
    # Earlier tests' predictions may still be on their way to the endpoint: wait them out.
    current = settled(lambda: _scrape(triton_server))
    # Prometheus' view must have caught up with the server before the traffic starts.
    before = _wait_for(
        "Prometheus to hold the server's current counters",
        lambda: (v := _prometheus_values(prometheus, model)) == current and v,
    )
    rule, threshold = low_trust_rule(triton_server)
    sent = Traffic(rule, threshold, before)
    cheap = ("GRADTRUST", "CONFIDENCE") + (("TRUST_PROB",) if rule == "trust_prob" else ())

    def record(out: dict[str, np.ndarray]) -> None:
        sent.gradtrust += out["GRADTRUST"][:, 0].astype(float).tolist()
        sent.confidence += out["CONFIDENCE"][:, 0].astype(float).tolist()
        if "TRUST_PROB" in out:
            sent.trust_prob += out["TRUST_PROB"][:, 0].astype(float).tolist()
        sent.requests_ok += 1

    for batch in _inputs(digits):
        record(infer(triton_server, "http", batch, outputs=cheap))
    record(infer(triton_server, "grpc", digits[0][40:44], outputs=(*cheap, "HEATMAP")))
    sent.heatmap_requests += 1
    # The demo entry has an introspective network: one request asks for its prediction.
    record(infer(triton_server, "http", digits[0][44:48], outputs=(*cheap, "INTROSPECTIVE_AGREES")))
    with pytest.raises(InferenceServerException, match="outside"):
        infer(triton_server, "http", np.full((1, 1, 28, 28), 2.0, np.float32))
    sent.requests_invalid += 1
    final = settled(lambda: _scrape(triton_server))
    sent.after = _wait_for(
        "Prometheus to scrape the counters after the traffic",
        lambda: (v := _prometheus_values(prometheus, model)) == final and v,
    )
    return sent


# --- the counts ---------------------------------------------------------------------------


def test_prometheus_counts_every_prediction_and_low_trust_one_when_traffic_is_scraped(traffic):
    g = np.array(traffic.gradtrust)
    judged = np.array(traffic.trust_prob) if traffic.rule == "trust_prob" else g
    low = int(np.count_nonzero(judged < traffic.threshold))
    assert low >= 1, (
        f"none of {g.size} predictions (noise, dots, digit overlays) had {traffic.rule} below "
        f"the model's low-trust threshold {traffic.threshold}; lowest was {judged.min():.3f}"
    )
    assert traffic.delta("gradtrust_predictions_total") == g.size
    assert traffic.delta("gradtrust_low_trust_predictions_total") == low
    assert traffic.delta("gradtrust_invalid_requests_total") == traffic.requests_invalid
    # Triton itself counts the Python backend's error responses as successful requests (2.51),
    # which is why the model counts invalid requests on its own.
    requests = traffic.requests_ok + traffic.requests_invalid
    answered = traffic.delta("nv_inference_request_success")
    assert answered + traffic.delta("nv_inference_request_failure") == requests
    assert answered >= traffic.requests_ok
    # Triton counts the invalid request's image as an inference too.
    assert traffic.delta("nv_inference_count") == g.size + traffic.requests_invalid


def test_prometheus_counts_one_timing_per_batch_when_traffic_is_scraped(traffic):
    # Requests were sent one after another, so each ran as its own batch.
    assert traffic.delta("gradtrust_trust_compute_seconds_count") == traffic.requests_ok
    assert traffic.delta("gradtrust_heatmap_compute_seconds_count") == traffic.heatmap_requests
    assert traffic.delta("gradtrust_trust_compute_seconds_sum") > 0
    assert traffic.delta("gradtrust_heatmap_compute_seconds_sum") > 0


def _assert_buckets(traffic: Traffic, name: str, values: np.ndarray) -> None:
    """Bucket deltas equal the served values' cumulative counts. The server observed float64
    scores and served them as float32, so a value within rounding of an edge counts either way."""
    for le, label in traffic.le_labels(name).items():
        got = traffic.delta(name, le=label)
        near = np.isclose(values, le, rtol=1e-5, atol=1e-7)
        lower = np.count_nonzero((values <= le) & ~near)
        upper = np.count_nonzero((values <= le) | near)
        assert lower <= got <= upper, f"{name} le={label}: {got} not in [{lower}, {upper}]"


def test_prometheus_histograms_match_served_scores_when_traffic_is_scraped(traffic):
    g = np.array(traffic.gradtrust)
    assert traffic.edges("gradtrust_trust_bucket")[:-1] == list(TRUST_BUCKETS)
    assert traffic.edges("gradtrust_confidence_bucket")[:-1] == list(CONFIDENCE_BUCKETS)
    _assert_buckets(traffic, "gradtrust_trust_bucket", g)
    _assert_buckets(traffic, "gradtrust_confidence_bucket", np.array(traffic.confidence))
    names = ["gradtrust_trust", "gradtrust_confidence"]
    if traffic.rule == "trust_prob":  # a calibrated model: TRUST_PROB's distribution too
        edges = traffic.edges("gradtrust_trust_probability_bucket")[:-1]
        assert edges == list(TRUST_PROBABILITY_BUCKETS)
        _assert_buckets(traffic, "gradtrust_trust_probability_bucket", np.array(traffic.trust_prob))
        names.append("gradtrust_trust_probability")
    for name in names:
        assert traffic.delta(f"{name}_count") == g.size
    assert math.isclose(traffic.delta("gradtrust_trust_sum"), float(g.sum()), rel_tol=1e-5)
    assert math.isclose(
        traffic.delta("gradtrust_confidence_sum"), float(sum(traffic.confidence)), rel_tol=1e-5
    )


def test_prometheus_metadata_types_every_distribution_as_a_histogram_when_scraped(
    traffic, prometheus
):
    def metadata() -> dict[str, Any] | None:
        data = prometheus.api("metadata")
        return data if all(name in data for name in ("gradtrust_trust", *HISTOGRAMS[2:])) else None

    found = _wait_for("Prometheus' metadata of the gradtrust metrics", metadata)
    types = {name: entries[0]["type"] for name, entries in found.items()}
    for name in HISTOGRAMS:
        if name == "gradtrust_trust_probability" and traffic.rule != "trust_prob":
            assert name not in types  # only calibrated models export it
            continue
        assert types.get(name) == "histogram", (name, types.get(name))
    for name in (
        "gradtrust_predictions_total",
        "gradtrust_low_trust_predictions_total",
        "gradtrust_invalid_requests_total",
    ):
        assert types.get(name) == "counter", (name, types.get(name))
    assert types.get("gradtrust_model_calibrated") == "gauge"
    assert types.get("gradtrust_triton_up") == "gauge"
    bad = {n: t for n, t in types.items() if n.startswith("gradtrust_") and t == "unknown"}
    assert not bad, bad


# --- every query of the rules, the dashboard and the autoscaler ----------------------------


def _measured(expr: str) -> str:
    """An alert's expression without its threshold comparisons: what it measures."""
    return re.sub(r"\s*(==|!=|>=|<=|>|<)\s*-?\d+(\.\d+)?(e-?\d+)?", "", expr)


def test_every_rule_parses_and_evaluates_without_error_when_prometheus_runs_it(traffic, prometheus):
    def all_evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return (
            rules
            if rules and all(r.get("lastEvaluation", "0001").startswith("20") for r in rules)
            else None
        )

    rules = _wait_for("every rule to be evaluated", all_evaluated)
    assert {r["name"] for r in rules} == {r.get("alert", r.get("record")) for r in _rules()}
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


#: Rules with data only while an uncalibrated model serves in production, which this
#: module's server does not do: test_metrics_exposition.py runs them against one that does.
PRODUCTION_ONLY = {
    "model_version:gradtrust_uncalibrated_production_replicas:count",
    "GradTrustUncalibratedInProduction",
}


def test_every_rule_expression_returns_data_when_run_against_live_metrics(traffic, prometheus):
    for rule in _rules():
        expr = rule["expr"]
        prometheus.query(expr)  # parses
        if rule.get("alert", rule.get("record")) in PRODUCTION_ONLY:
            continue
        measured = expr if "record" in rule else _measured(expr)
        _wait_for(f"data from {measured!r}", lambda e=measured: prometheus.query(e), timeout_s=15)


def test_every_dashboard_query_returns_data_when_variables_name_the_served_model(
    traffic, prometheus, triton_server
):
    values = prometheus.api("label/model/values", **{"match[]": "gradtrust_predictions_total"})
    assert triton_server.model_name in values  # what the $model variable offers
    for expr in _dashboard_exprs():
        query = grafana_to_promql(expr, model=triton_server.model_name, version="1")
        _wait_for(f"data from {query!r}", lambda q=query: prometheus.query(q), timeout_s=15)


def test_autoscaler_queries_return_data_when_run_against_live_metrics(
    traffic, prometheus, triton_server
):
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        series = prometheus.query(rule["seriesQuery"].replace('namespace!="",pod!=""', ""))
        assert series, rule["seriesQuery"]
        query = adapter_to_promql(rule["metricsQuery"], f'model="{triton_server.model_name}"')
        result = prometheus.query(query)
        assert result and all(math.isfinite(float(r["value"][1])) for r in result), query
