"""deploy/nginx in the deployments: compose puts it in front of Triton's HTTP and gRPC ports,
and the Kubernetes overlay (deploy/nginx/kustomization.yaml) adds it as a sidecar whose ports
the Service's http and grpc ports target. The overlay is merged here the way kustomize merges it (a
container and volumes added by name, one JSON patch) and validated against Kubernetes'
schemas; the proxy itself runs for real in tests/integration/test_reverse_proxy.py."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
NGINX = ROOT / "deploy" / "nginx"
TRITON = ROOT / "deploy" / "kubernetes" / "triton"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _merged() -> tuple[dict[str, Any], dict[str, Any]]:
    """(Deployment, Service) of the overlay, merged as kustomize does."""
    kustomization = _load(NGINX / "kustomization.yaml")
    assert kustomization["resources"] == ["../kubernetes/triton"]
    deployment = copy.deepcopy(_load(TRITON / "deployment.yaml"))
    service = copy.deepcopy(_load(TRITON / "service.yaml"))
    for patch in kustomization["patches"]:
        if "path" in patch:
            sidecar = _load(NGINX / patch["path"])
            assert (sidecar["kind"], sidecar["metadata"]["name"]) == (
                deployment["kind"],
                deployment["metadata"]["name"],
            )
            pod, extra = deployment["spec"]["template"]["spec"], sidecar["spec"]["template"]["spec"]
            names = {c["name"] for c in pod["containers"]}
            assert not names & {c["name"] for c in extra["containers"]}
            pod["containers"] += extra["containers"]
            pod["volumes"] = pod.get("volumes", []) + extra["volumes"]
            pod["hostAliases"] = extra["hostAliases"]
        else:
            assert patch["target"] == {"kind": "Service", "name": service["metadata"]["name"]}
            for op in yaml.safe_load(patch["patch"]):
                _, _, _, index, key = op["path"].split("/")
                port = service["spec"]["ports"][int(index)]
                if op["op"] == "test":
                    assert port[key] == op["value"], op
                else:
                    port[key] = op["value"]
    return deployment, service


def test_overlay_validates_against_kubernetes_schemas_when_merged():
    deployment, service = _merged()
    kubernetes_validate.validate(deployment, "1.32", strict=True)
    kubernetes_validate.validate(service, "1.32", strict=True)


@pytest.mark.parametrize(
    ("port_name", "listen_pattern"), [("http", r"(\d+)"), ("grpc", r"(\d+) http2")]
)
def test_service_port_reaches_nginx_and_nginx_reaches_triton_when_merged(port_name, listen_pattern):
    deployment, service = _merged()
    pod = deployment["spec"]["template"]["spec"]
    proxy = next(c for c in pod["containers"] if c["name"] == "proxy")
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    port = next(p for p in service["spec"]["ports"] if p["name"] == port_name)
    assert port["targetPort"] in {p["name"] for p in proxy["ports"]}
    conf = (NGINX / "nginx.conf").read_text()
    listen = re.search(rf"^\s*listen {listen_pattern};", conf, re.M)
    assert listen and int(listen[1]) == next(
        p["containerPort"] for p in proxy["ports"] if p["name"] == port["targetPort"]
    )
    # The upstream this server block passes to is Triton's port of the same name.
    upstream_name = "triton_http" if port_name == "http" else "triton_grpc"
    upstream = re.search(rf"upstream {upstream_name} {{\s*server (\w+):(\d+);", conf)
    assert upstream is not None
    assert upstream[1] in pod["hostAliases"][0]["hostnames"]
    assert pod["hostAliases"][0]["ip"] == "127.0.0.1"
    assert int(upstream[2]) == next(
        p["containerPort"] for p in triton["ports"] if p["name"] == port_name
    )


def test_overlay_mounts_the_shipped_nginx_conf_read_only_when_merged():
    kustomization = _load(NGINX / "kustomization.yaml")
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["nginx.conf"] and (NGINX / "nginx.conf").is_file()
    deployment, _ = _merged()
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("configMap"))
    assert volume["configMap"]["name"] == generator["name"]
    proxy = next(c for c in pod["containers"] if c["name"] == "proxy")
    mount = next(m for m in proxy["volumeMounts"] if m["name"] == volume["name"])
    assert mount["mountPath"] == "/etc/nginx/nginx.conf" and mount["readOnly"] is True
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert ":" in proxy["image"] and not proxy["image"].endswith(":latest")


def test_compose_publishes_http_and_grpc_only_through_the_proxy_when_loaded():
    services = _load(ROOT / "docker-compose.yml")["services"]
    assert not services["triton"].get("ports")  # Triton's own ports stay inside
    proxy = services["proxy"]
    assert proxy["ports"] == ["127.0.0.1:8000:8080", "127.0.0.1:8001:8081"]
    assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert proxy["image"] == next(
        c["image"]
        for c in _load(NGINX / "kubernetes-sidecar.yaml")["spec"]["template"]["spec"]["containers"]
    )
