"""Render triton/prometheusrule.yaml from deploy/prometheus/rules/*.yml (the one source).

Run from anywhere after changing the rules:  python deploy/kubernetes/render_prometheusrule.py
tests/test_deploy.py fails while the two disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES_DIR = HERE.parent / "prometheus" / "rules"
TARGET = HERE / "triton" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/rules/*.yml by deploy/kubernetes/render_prometheusrule.py:
# edit the rules there, then re-run the script. The "release" label must match your
# Prometheus' ruleSelector (kube-prometheus-stack selects on its Helm release name).
"""


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL, descriptions) as readable literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else (">" if len(value) > 80 else None)
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def rule_groups(rules_dir: Path = RULES_DIR) -> list[dict]:
    """All rule groups of the rules files, in file-name order."""
    groups: list[dict] = []
    for path in sorted(rules_dir.glob("*.yml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return groups


def render(rules_dir: Path = RULES_DIR) -> str:
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "gradtrust-serve",
            "labels": {"release": "kube-prometheus-stack"},
        },
        "spec": {"groups": rule_groups(rules_dir)},
    }
    body = yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=100)
    return HEADER + body


def main() -> int:
    TARGET.write_text(render())
    sys.stdout.write(f"wrote {TARGET}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
