"""Packaging promises: the client installs without the server's heavy dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HEAVY = ("torch", "onnxruntime", "onnxruntime-gpu", "nvidia-pytriton", "onnx")


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_client_extra_and_base_dependencies_exclude_torch_and_onnxruntime_when_installed():
    client = _names(PROJECT["dependencies"]) | _names(PROJECT["optional-dependencies"]["client"])
    assert not client & set(HEAVY), client & set(HEAVY)
    assert "tritonclient" in client


def test_server_extra_pins_cpu_installable_torch_when_installed():
    server = PROJECT["optional-dependencies"]["server"]
    assert any(r.startswith("torch==") for r in server), "an unpinned torch pulls a CUDA build"


def test_both_command_line_tools_are_installed_when_package_is_installed():
    assert set(PROJECT["scripts"]) == {"gradtrust", "gradtrust-client"}
