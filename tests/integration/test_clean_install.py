"""What a deployment installs, tested on its own: a fresh virtual environment with exactly
the ``server`` extra (as deploy/Dockerfile installs it) serves the demo repository with
``gradtrust serve``, and a second one with only the ``client`` extra talks to it over HTTP
and gRPC. Nothing of the test environment leaks in: both run their own interpreters, and
PATH starts with their own bin folders (the Python backend stub runs the Python on PATH).

Installing takes a minute or two (pip's cache holds the wheels after the first run).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradtrust.ops.tritonserver import free_port
from tests.conftest import MODEL_REPOSITORY, ROOT
from tests.integration.triton_io import read_until_ready

pytestmark = pytest.mark.integration

DIGITS = sorted((ROOT / "examples" / "digits").glob("*.png"))


def _clean_env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _make_venv(where: Path, extra: str) -> Path:
    """A new virtual environment holding this project with ``extra`` and nothing else."""
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    bin_dir = where / "bin"
    result = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", f"{ROOT}[{extra}]"],
        capture_output=True,
        text=True,
        timeout=1200,
        env=_clean_env(bin_dir),
        cwd=where,
    )
    assert result.returncode == 0, f"pip install .[{extra}] failed:\n{result.stderr[-4000:]}"
    return bin_dir


@pytest.fixture(scope="module")
def server_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_venv(tmp_path_factory.mktemp("server-venv"), "server")


@pytest.fixture(scope="module")
def client_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_venv(tmp_path_factory.mktemp("client-venv"), "client")


@pytest.fixture(scope="module")
def served(server_bin: Path) -> Iterator[tuple[int, int]]:
    """``gradtrust serve`` from the server-only environment, on free loopback ports."""
    http, grpc = free_port(), free_port()
    cmd = [
        str(server_bin / "gradtrust"), "serve", "--model-repository", str(MODEL_REPOSITORY),
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(free_port()),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_clean_env(server_bin),
        cwd=server_bin.parent,
    )
    try:
        text = read_until_ready(proc, timeout_s=240)
        assert "ready: gradtrust_mnist" in text, text
        yield http, grpc
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _installed(bin_dir: Path, *modules: str) -> list[str]:
    """Which of ``modules`` the environment's own Python can import."""
    code = f"import importlib.util as u; print([m for m in {modules!r} if u.find_spec(m)])"
    out = subprocess.run(
        [str(bin_dir / "python"), "-c", code], capture_output=True, text=True, check=True
    )
    return list(ast.literal_eval(out.stdout.strip()))


def test_server_extra_holds_no_torch_and_no_evaluation_tools(server_bin: Path) -> None:
    assert _installed(server_bin, "torch", "sklearn", "matplotlib") == []
    assert _installed(server_bin, "onnxruntime", "PIL", "prometheus_client") == [
        "onnxruntime",
        "PIL",
        "prometheus_client",
    ]


def test_evaluation_commands_say_which_extra_they_need_when_only_server_is_installed(
    server_bin: Path,
) -> None:
    result = subprocess.run(
        [str(server_bin / "gradtrust"), "evaluate", "--help"],
        capture_output=True,
        text=True,
        env=_clean_env(server_bin),
        timeout=60,
    )
    assert result.returncode != 0
    assert "pip install 'gradtrust-serve[eval]'" in result.stderr


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_extra_serves_and_client_extra_predicts_when_installed_alone(
    served: tuple[int, int], client_bin: Path, protocol: str
) -> None:
    http, grpc = served
    url = f"localhost:{http if protocol == 'http' else grpc}"
    result = subprocess.run(
        [
            str(client_bin / "gradtrust-client"),
            "predict",
            "--json",
            "--protocol",
            protocol,
            "--url",
            url,
            *map(str, DIGITS),
        ],
        capture_output=True,
        text=True,
        env=_clean_env(client_bin),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert len(answers) == len(DIGITS)
    expected = [p.stem.rsplit("_", 1)[-1] for p in DIGITS]  # digit_7_label_7 -> "7"
    assert [str(a["label"]) for a in answers] == expected


def test_client_extra_installs_neither_onnxruntime_nor_torch(client_bin: Path) -> None:
    assert _installed(client_bin, "torch", "onnxruntime", "onnx") == []
    assert _installed(client_bin, "tritonclient", "PIL") == ["tritonclient", "PIL"]
