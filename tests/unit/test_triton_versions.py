"""Every deployment runs a Triton release without the known vulnerabilities, and the
advisory table behind that rule (gradtrust.ops.triton_versions) says what it should."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gradtrust.errors import ServerError
from gradtrust.ops.triton_versions import (
    ADVISORIES,
    MINIMUM_RELEASE,
    PINNED_RELEASE,
    RELEASES,
    advisories_for,
    refuse_vulnerable,
    release_is_fixed,
    release_of,
)

ROOT = Path(__file__).resolve().parents[2]
#: Our image's tag carries the Triton release it is built on: <version>-triton<YY.MM>.
OUR_TAG = re.compile(r"gradtrust-serve-triton:[\w.]+-triton(\d{2}\.\d{2})\b")


def _dockerfile_release() -> str:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+nvcr\.io/nvidia/tritonserver:(\d{2}\.\d{2})-py3\s*$", text, re.M)
    return str(base)


def _pinned_elsewhere() -> dict[str, list[str]]:
    """Release named by each deployment file that refers to our image."""
    found: dict[str, list[str]] = {}
    files = [ROOT / "docker-compose.yml", *sorted((ROOT / "deploy" / "kubernetes").rglob("*.yaml"))]
    for path in files:
        text = path.read_text()
        releases = OUR_TAG.findall(text)
        for doc in yaml.safe_load_all(text):  # kustomize's images: newTag
            for image in (doc or {}).get("images", []) if isinstance(doc, dict) else []:
                if image.get("name") == "gradtrust-serve-triton":
                    match = re.fullmatch(r"[\w.]+-triton(\d{2}\.\d{2})", str(image["newTag"]))
                    releases.append(match[1] if match else f"unpinned:{image['newTag']}")
        if releases or "gradtrust-serve-triton" in text:
            found[str(path.relative_to(ROOT))] = releases or ["unpinned"]
    return found


def test_dockerfile_pins_a_release_with_every_known_fix_when_read():
    release = _dockerfile_release()
    assert release == PINNED_RELEASE
    assert release_is_fixed(release), f"{release} is older than {MINIMUM_RELEASE}"


def test_compose_and_kubernetes_pin_the_dockerfiles_release_when_they_name_our_image():
    pinned = _pinned_elsewhere()
    assert {"docker-compose.yml", "deploy/kubernetes/triton/deployment.yaml"} <= set(pinned)
    assert "deploy/kubernetes/triton/kustomization.yaml" in pinned
    assert "deploy/kubernetes/kserve/servingruntime.yaml" in pinned
    for path, releases in pinned.items():
        for release in releases:
            assert release == _dockerfile_release(), f"{path} pins {release}"


@pytest.mark.parametrize("release", ["24.10", "24.12", "25.06", "26.04", "26.06"])
def test_release_check_fails_when_a_release_predates_a_fix(release):
    assert not release_is_fixed(release)


def test_minimum_release_is_the_newest_fix_when_advisories_are_listed():
    assert MINIMUM_RELEASE == "26.07"
    assert release_is_fixed(MINIMUM_RELEASE) and release_is_fixed(PINNED_RELEASE)
    assert {a.fixed_in for a in ADVISORIES} <= set(RELEASES)


def test_bundled_wheel_server_has_the_cves_named_in_the_issue_when_checked():
    ids = " ".join(a.ids for a in advisories_for("2.51.0"))
    for cve in ("23310", "23311", "23319", "23320", "23334"):
        assert f"CVE-2025-{cve}" in ids
    assert "common PR #156" in ids  # deep JSON nesting, fixed in 26.05
    assert release_of("2.51.0") == "24.10"


@pytest.mark.parametrize(
    ("version", "still_open"),
    [
        ("2.59.0", {"25.07", "26.03", "26.05", "26.06", "26.07"}),  # 25.06
        ("2.59.1", {"26.03", "26.05", "26.06", "26.07"}),  # 25.07: the August 2025 fixes
        ("2.68.0", {"26.05", "26.06", "26.07"}),  # 26.04: no iterative JSON parsing yet
        ("2.69.0", {"26.06", "26.07"}),
        ("2.73.0", set()),
        ("2.80.0", set()),  # a newer release than the table knows
    ],
)
def test_advisories_apply_until_their_fix_release_when_a_server_reports_its_version(
    version, still_open
):
    assert {a.fixed_in for a in advisories_for(version)} == still_open


def test_production_refuses_vulnerable_server_naming_fixes_and_override_when_version_is_old():
    with pytest.raises(ServerError) as info:
        refuse_vulnerable("2.51.0", "--allow-vulnerable-triton")
    message = str(info.value)
    assert "2.51.0" in message and "CVE-2025-23310" in message
    assert (
        f"tritonserver:{PINNED_RELEASE}-py3" in message and "--allow-vulnerable-triton" in message
    )
    refuse_vulnerable(RELEASES[PINNED_RELEASE], "--allow-vulnerable-triton")  # no error
    refuse_vulnerable("2.71.0", "--x")  # 26.07: only a non-critical advisory was open before
