"""Integration tests: each one talks to a real tritonserver. Every test in this folder is
marked ``integration`` here; fixtures for a second, differently configured server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from gradtrust.core.calibration import FILENAME as CALIBRATION_FILE
from gradtrust.ops.tritonserver import Ports, TritonServer, free_port, start_server
from gradtrust.serving.contract import INTROSPECTION_ONNX
from tests.conftest import DEMO_MODEL, DEMO_ONNX, MODEL_REPOSITORY


@pytest.fixture(scope="session")
def bare_demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The demo entry without its 'activation' output, a trust calibration and an
    introspective network, served on its own: a model that can neither explain nor give
    TRUST_PROB nor INTROSPECTIVE_*."""
    repo = tmp_path_factory.mktemp("repo")
    entry = repo / DEMO_MODEL
    shutil.copytree(MODEL_REPOSITORY / DEMO_MODEL, entry)
    (entry / CALIBRATION_FILE).unlink(missing_ok=True)
    (entry / "1" / INTROSPECTION_ONNX).unlink(missing_ok=True)
    model = onnx.load(str(DEMO_ONNX))
    keep = [o for o in model.graph.output if o.name != "activation"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(Path(entry) / "1" / "model.onnx"))
    server = start_server(
        repo,
        ports=Ports(free_port(), free_port(), free_port()),
        log_path=repo.parent / "triton.log",
        exit_timeout_s=5,
    )
    try:
        yield server
    finally:
        server.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test collected from this folder: they all start or use a real server."""
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)
