"""Static checks of everything under deploy/ and of docker-compose.yml.

Prometheus' own promtool checks the config and the rules and runs the rules' unit tests;
amtool checks the Alertmanager config; the compose file and the Kubernetes manifests are
validated against published schemas read from installed packages (no downloads, no container
engine, no cluster). promtool and amtool come from Debian (`make test-tools`).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

from gradtrust.ops import drain
from gradtrust.ops.exporter import METRIC_NAMES as EXPORTER_METRIC_NAMES
from gradtrust.ops.serve_command import DEFAULT_MAX_REQUEST_S
from gradtrust.ops.supervisor import RESTARTS_METRIC
from gradtrust.serving.telemetry import METRIC_NAMES as MODEL_METRIC_NAMES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gradtrust.json"
K8S = DEPLOY / "kubernetes"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yml"
KUBERNETES_VERSION = "1.32"
TRITON_JOB = "gradtrust-triton"

REQUIRED_ALERTS = {
    "GradTrustLowTrustRateHigh",
    "GradTrustMedianConfidenceFalling",
    "GradTrustDistributionShift",
    "GradTrustNoInferenceTraffic",
    "GradTrustUncalibratedInProduction",
    "TritonDown",
}
#: Every gradtrust_ metric of the endpoint: the stubs', the exporter's own and the
#: supervisor's restart counter (the serve process's registry).
METRIC_NAMES = (*MODEL_METRIC_NAMES, *EXPORTER_METRIC_NAMES, RESTARTS_METRIC)
# Triton's own metrics that the rules, the dashboard and the autoscaler rely on.
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_pending_request_count",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed; run `make test-tools` (Debian's prometheus packages)"
        )
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _rules() -> list[dict[str, Any]]:
    return [rule for f in RULE_FILES for g in _load_yaml(f)["groups"] for rule in g["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


def _k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.parent.name == "prometheus-adapter":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]
    return exprs


def grafana_to_promql(expr: str, model: str = "m", version: str = "1") -> str:
    """Replace Grafana's template variables with concrete values, as Grafana would."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
        .replace("$model", model)
        .replace("$version", version)
    )


def _metric_names_in(expr: str) -> set[str]:
    """Exported metric names in a query (not recording-rule names, which contain colons)."""
    return set(re.findall(r"(?<![:\w])((?:gradtrust|nv)_[a-z_]+)(?![:\w])", expr))


def _recorded_names_in(expr: str) -> set[str]:
    return set(re.findall(r"(?<![\w:])([a-z_]+:[a-z0-9_]+:[a-z0-9_]+)", expr))


def _histogram_base(name: str) -> str:
    """The family of a series name: gradtrust_trust_bucket -> gradtrust_trust."""
    if name in set(METRIC_NAMES) | TRITON_METRICS:
        return name
    return re.sub(r"_(bucket|sum|count)$", "", name)


# --- Prometheus and Alertmanager, checked by their own tools ------------------------------


def test_promtool_accepts_the_prometheus_config_and_its_rule_files_when_checked():
    result = _run(_tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(RULE_FILES)} rule files found" in result.stdout


def test_promtool_accepts_every_rule_file_when_checked():
    assert RULE_FILES, "no rule files under deploy/prometheus/rules"
    result = _run(_tool("promtool"), "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_rules_pass_when_run():
    assert RULE_TESTS, "no promtool tests under deploy/prometheus/tests"
    result = _run(_tool("promtool"), "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_accepts_the_alertmanager_config_when_checked():
    config = DEPLOY / "alertmanager" / "alertmanager.yml"
    result = _run(_tool("amtool"), "check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_rule_when_checked(tmp_path):
    # The checks above can fail: a typo in PromQL is caught.
    bad = tmp_path / "bad.yml"
    bad.write_text("groups: [{name: g, rules: [{alert: A, expr: 'rate(x[5m]'}]}]\n")
    assert _run(_tool("promtool"), "check", "rules", str(bad)).returncode != 0


# --- the alerts themselves ----------------------------------------------------------------


def test_rules_define_the_five_required_alerts_when_loaded():
    assert set(_alerts()) >= REQUIRED_ALERTS


@pytest.mark.parametrize("name", sorted(REQUIRED_ALERTS))
def test_alert_has_summary_description_and_severity_when_defined(name):
    alert = _alerts()[name]
    assert alert["labels"]["severity"] in {"critical", "warning", "info"}
    assert alert["annotations"]["summary"].strip()
    assert len(alert["annotations"]["description"]) > 40
    assert "for" in alert


@pytest.mark.parametrize("name", sorted(REQUIRED_ALERTS))
def test_every_alert_has_promtool_cases_that_fire_and_stay_quiet_when_tested(name):
    cases = [
        case
        for f in RULE_TESTS
        for test in _load_yaml(f)["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == name
    ]
    assert any(case.get("exp_alerts") for case in cases), f"no test where {name} fires"
    assert any(not case.get("exp_alerts") for case in cases), f"no test where {name} is quiet"


def test_rules_use_only_model_and_version_from_gradtrust_metrics_when_aggregating():
    for rule in _rules():
        for by in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            assert {s.strip() for s in by.split(",")} <= {"model", "version", "le"}, rule


def test_rules_reference_only_exported_metrics_when_written():
    known = set(METRIC_NAMES) | TRITON_METRICS
    for rule in _rules():
        for name in _metric_names_in(rule["expr"]):
            assert _histogram_base(name) in known, (
                f"{name} in {rule.get('alert', rule.get('record'))}"
            )


def test_prometheus_scrapes_the_triton_job_the_alerts_select_when_configured():
    config = _load_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = jobs[TRITON_JOB]["static_configs"][0]["targets"]
    assert targets == ["triton:8002"]
    assert f'job="{TRITON_JOB}"' in _alerts()["TritonDown"]["expr"]


# --- Grafana ------------------------------------------------------------------------------


def test_dashboard_panels_use_the_datasource_variable_and_unique_ids_when_loaded():
    dashboard = _dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "version"} <= variables
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]


def test_dashboard_shows_trust_confidence_low_trust_throughput_and_latency_when_loaded():
    names = {_histogram_base(n) for e in _dashboard_exprs() for n in _metric_names_in(e)}
    assert {
        "gradtrust_trust",
        "gradtrust_trust_probability",
        "gradtrust_model_calibrated",
        "gradtrust_confidence",
        "gradtrust_low_trust_predictions_total",
        "gradtrust_predictions_total",
        "nv_inference_count",
        "nv_inference_request_duration_us",
    } <= names
    assert names <= set(METRIC_NAMES) | TRITON_METRICS
    recorded = {r["record"] for r in _rules() if "record" in r}
    for expr in _dashboard_exprs():
        assert _recorded_names_in(expr) <= recorded, expr
    # Every per-model query follows the $model variable (the exporter's gauges are per server).
    per_model = [e for e in _dashboard_exprs() if any(n in e for n in MODEL_METRIC_NAMES)]
    assert all('model=~"$model"' in e for e in per_model)


def test_promtool_parses_every_dashboard_and_autoscaler_query_when_variables_are_filled(tmp_path):
    adapter = _load_yaml(K8S / "prometheus-adapter" / "values.yaml")
    queries = [grafana_to_promql(e) for e in _dashboard_exprs()]
    queries += [adapter_to_promql(rule["metricsQuery"]) for rule in adapter["rules"]["custom"]]
    rules = [{"record": f"check:query_{i}:test", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = _run(_tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def adapter_to_promql(query: str, selector: str = 'model="m"', group_by: str = "instance") -> str:
    """Fill prometheus-adapter's template placeholders the way the adapter does."""
    return (
        query.replace("<<.LabelMatchers>>", selector)
        .replace("<<.GroupBy>>", group_by)
        .replace("<<.Series>>", "")
    )


# --- docker compose -----------------------------------------------------------------------


def _compose_schema() -> dict[str, Any]:
    # The Compose Specification's schema, as vendored by check-jsonschema.
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=["compose", "gpu-override"])
def test_compose_file_validates_against_the_compose_spec_when_loaded(path):
    jsonschema.Draft202012Validator(_compose_schema()).validate(_load_yaml(path))


def test_compose_schema_rejects_a_misspelt_key_when_validating():
    broken = _load_yaml(COMPOSE)
    broken["services"]["triton"]["portz"] = ["8000:8000"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(_compose_schema()).validate(broken)


def test_compose_runs_triton_prometheus_alertmanager_and_grafana_when_started():
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"triton", "proxy", "prometheus", "alertmanager", "grafana"}
    assert services["triton"]["build"]["dockerfile"] == "deploy/Dockerfile"
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name} image is not pinned"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_keeps_the_metrics_port_off_the_host_when_started():
    triton = _load_yaml(COMPOSE)["services"]["triton"]
    assert not any(str(p).endswith(":8002") for p in triton.get("ports", []))
    assert "8002" in [str(p) for p in triton["expose"]]


def test_compose_reserves_a_gpu_only_with_the_override_file_when_merged():
    assert "deploy" not in _load_yaml(COMPOSE)["services"]["triton"]
    devices = _load_yaml(COMPOSE_GPU)["services"]["triton"]["deploy"]["resources"]
    device = devices["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_compose_mounts_point_at_files_that_exist_when_started():
    for service in _load_yaml(COMPOSE)["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


# --- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_builds_on_a_pinned_triton_image_when_read():
    text = (DEPLOY / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", base), base
    assert "nvidia-pytriton" in text  # named in order to be left out
    assert re.search(r"not d\.startswith\('nvidia-pytriton'\)", text)
    assert "COPY model_repository /models" in text
    assert re.search(r"^EXPOSE 8000 8001 8002$", text, flags=re.M)
    assert re.search(r"^USER (?!root)\S+", text, flags=re.M)
    assert "/v2/health/ready" in text


# --- Kubernetes ---------------------------------------------------------------------------


def _validate_core(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _validate_operator(doc: dict[str, Any]) -> None:
    """prometheus-operator kinds, against models generated from the operator's CRD schemas.

    The models ignore unknown fields, so a round trip that loses a field reveals a typo.
    """
    model = getattr(prometheus_operator, doc["kind"]).model_validate(doc)
    back = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if back != doc:
        raise jsonschema.ValidationError(f"unknown or misplaced fields in {doc['kind']}: {doc}")


def _kserve_schema() -> dict[str, Any]:
    return json.loads((ROOT / "tests" / "schemas" / "kserve-subset.schema.json").read_text())


_KSERVE_MODEL_KEYS = {"modelFormat", "runtime", "runtimeVersion", "protocolVersion", "storageUri"}


def _validate_kserve(doc: dict[str, Any]) -> None:
    """KServe kinds: a hand-written schema for KServe's own fields, plus Kubernetes' Container
    schema for the container fields that KServe inlines."""
    jsonschema.Draft202012Validator(_kserve_schema()).validate(doc)
    if doc["kind"] == "InferenceService":
        model = doc["spec"]["predictor"]["model"]
        containers = [{k: v for k, v in model.items() if k not in _KSERVE_MODEL_KEYS}]
    else:
        containers = doc["spec"]["containers"]
    for container in containers:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "check"},
            "spec": {"containers": [{"name": "kserve-container", **container}]},
        }
        _validate_core(pod)


def _validate(doc: dict[str, Any]) -> None:
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    if group == "monitoring.coreos.com":
        _validate_operator(doc)
    elif group == "serving.kserve.io":
        _validate_kserve(doc)
    else:
        _validate_core(doc)


_K8S_DOCS = list(_k8s_documents())


@pytest.mark.parametrize(
    "path,doc",
    _K8S_DOCS,
    ids=[f"{p.relative_to(K8S)}:{d['kind']}" for p, d in _K8S_DOCS],
)
def test_kubernetes_manifest_validates_against_its_schema_when_loaded(path, doc):
    _validate(doc)


def _by_kind(kind: str, folder: str = "triton") -> dict[str, Any]:
    (doc,) = [d for p, d in _K8S_DOCS if d["kind"] == kind and p.parent.name == folder]
    return doc


@pytest.mark.parametrize(
    "kind,folder,path,value",
    [
        ("Deployment", "triton", ["spec", "template", "spec", "containerz"], []),
        ("Deployment", "triton", ["spec", "replicas"], "two"),
        ("HorizontalPodAutoscaler", "triton", ["spec", "maxReplicas"], "8"),
        ("PodMonitor", "triton", ["spec", "podMetricsEndpoints", 0, "intervall"], "15s"),
        ("PrometheusRule", "triton", ["spec", "groups", 0, "rules", 0, "expr"], ["up"]),
        ("InferenceService", "kserve", ["spec", "predictor", "model", "storageURI"], "s3://x"),
        ("InferenceService", "kserve", ["spec", "predictor", "model", "imagePullPolicy"], 7),
        ("ServingRuntime", "kserve", ["spec", "containers", 0, "argz"], ["x"]),
    ],
)
def test_kubernetes_validation_rejects_a_broken_manifest_when_a_field_is_wrong(
    kind, folder, path, value
):
    doc = copy.deepcopy(_by_kind(kind, folder))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate(doc)


def test_kustomization_lists_every_manifest_of_its_folder_when_applied():
    folder = K8S / "triton"
    listed = _load_yaml(folder / "kustomization.yaml")["resources"]
    present = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


def test_prometheusrule_carries_exactly_the_rule_files_when_compared():
    rule = _by_kind("PrometheusRule")
    groups = [g for f in RULE_FILES for g in _load_yaml(f)["groups"]]
    assert rule["spec"]["groups"] == groups, (
        "deploy/kubernetes/triton/prometheusrule.yaml is stale: run "
        "python deploy/kubernetes/render_prometheusrule.py"
    )


def test_deployment_probes_triton_health_endpoints_when_running():
    container = _by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}


def _drain_bound_s(args: list[str]) -> int:
    """The exit timeout `gradtrust serve` would use with these arguments on the bundled
    model repository: --drain-timeout, else the bound computed from the queues."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("--drain-timeout=")]
    if given:
        return int(given[0])
    seconds = [a.split("=", 1)[1] for a in args if a.startswith("--max-request-seconds=")]
    max_request_s = float(seconds[0]) if seconds else DEFAULT_MAX_REQUEST_S
    return drain.exit_timeout_s(drain.model_queues(ROOT / "model_repository"), max_request_s)


def test_orchestrators_wait_for_the_whole_drain_when_they_stop_the_server():
    # Killed before its drain ends, the server drops accepted work (docs/SECURITY.md).
    pod = _by_kind("Deployment")["spec"]["template"]["spec"]
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    bound = _drain_bound_s(triton["args"])
    assert bound >= 600  # the demo's queue is unbounded: 64 assumed requests of 10 s
    assert pod["terminationGracePeriodSeconds"] >= bound + 10
    runtime = _by_kind("ServingRuntime", "kserve")["spec"]["containers"][0]
    predictor = _by_kind("InferenceService", "kserve")["spec"]["predictor"]
    assert predictor["terminationGracePeriodSeconds"] >= _drain_bound_s(runtime["args"]) + 10
    compose = _load_yaml(COMPOSE)["services"]["triton"]
    grace = re.fullmatch(r"(\d+)m", compose["stop_grace_period"])
    assert grace and int(grace[1]) * 60 >= _drain_bound_s(compose.get("command", [])) + 10


def test_service_podmonitor_and_hpa_point_at_the_deployment_when_applied():
    deployment = _by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _by_kind("Service")["spec"]["selector"].items() <= pod_labels.items()
    monitor = _by_kind("PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The job label comes from a pod label whose value the TritonDown alert selects.
    assert pod_labels[monitor["spec"]["jobLabel"]] == TRITON_JOB
    container_ports = {
        p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= container_ports
    hpa = _by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_hpa_scales_on_queue_metrics_the_adapter_defines_when_applied():
    adapter = _load_yaml(K8S / "prometheus-adapter" / "values.yaml")["rules"]["custom"]
    defined = {rule["name"]["as"] for rule in adapter}
    used = {
        m["pods"]["metric"]["name"] for m in _by_kind("HorizontalPodAutoscaler")["spec"]["metrics"]
    }
    assert used and used <= defined
    sources = {m for rule in adapter for m in _metric_names_in(rule["metricsQuery"])}
    assert {"nv_inference_queue_duration_us", "nv_inference_pending_request_count"} <= sources


def test_kserve_example_uses_the_triton_runtime_and_the_alerts_job_when_applied():
    isvc = _by_kind("InferenceService", "kserve")
    runtime = _by_kind("ServingRuntime", "kserve")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["runtime"] == runtime["metadata"]["name"]
    # gradtrust serve, which serves the metrics port the PodMonitor scrapes.
    assert runtime["spec"]["containers"][0]["args"][:2] == ["gradtrust", "serve"]
    monitor = _by_kind("PodMonitor", "kserve")
    relabel = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]
    assert (relabel["targetLabel"], relabel["replacement"]) == ("job", TRITON_JOB)
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels["serving.kserve.io/inferenceservice"] == isvc["metadata"]["name"]


# --- documentation ------------------------------------------------------------------------


def test_monitoring_doc_names_every_metric_and_alert_when_read():
    doc = (ROOT / "docs" / "MONITORING.md").read_text()
    for name in (*METRIC_NAMES, *REQUIRED_ALERTS):
        assert name in doc, name
