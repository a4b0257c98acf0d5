"""Packaging promises: each extra installs what its layer imports and nothing heavier
(the clean-install tests in tests/integration/test_clean_install.py install them for real)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HEAVY = ("torch", "onnxruntime", "onnxruntime-gpu", "nvidia-pytriton", "onnx")


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_client_extra_and_base_dependencies_exclude_torch_and_onnxruntime_when_installed():
    client = _names(PROJECT["dependencies"]) | _names(PROJECT["optional-dependencies"]["client"])
    assert not client & set(HEAVY), client & set(HEAVY)
    assert "tritonclient" in client


def test_server_extra_installs_no_torch_because_serving_never_imports_it():
    server = _names(PROJECT["optional-dependencies"]["server"])
    assert "torch" not in server
    assert {"onnxruntime-gpu", "pillow", "nvidia-pytriton"} <= server


def test_eval_extra_pins_cpu_installable_torch():
    evaluation = PROJECT["optional-dependencies"]["eval"]
    assert any(r.startswith("torch==") for r in evaluation), "an unpinned torch pulls CUDA"


def test_both_command_line_tools_are_installed_when_package_is_installed():
    assert set(PROJECT["scripts"]) == {"gradtrust", "gradtrust-client"}
