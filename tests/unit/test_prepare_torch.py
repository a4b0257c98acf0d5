"""``gradtrust prepare --torch``: TorchScript files and module:factory + state dict."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from gradtrust.serving.contract import ACTIVATION, LOGITS
from gradtrust.tools.prepare import cli


class SmallNet(nn.Module):
    """What a user's own package would define."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(x)).flatten(1))


def build_classifier() -> SmallNet:
    """The factory named on the command line: builds the architecture, untrained."""
    torch.manual_seed(0)
    return SmallNet()


def not_a_module() -> str:
    return "oops"


FACTORY = "tests.unit.test_prepare_torch:build_classifier"
SHAPE = ("--input-shape", "3", "8", "8")


def trained() -> SmallNet:
    torch.manual_seed(123)  # weights unlike the factory's, so loading them is visible
    return SmallNet().eval()


def logits_of(entry: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(
        str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: images}), strict=True))


def prepare(*args: object) -> int:
    return cli.main([str(a) for a in args])


IMAGES = np.random.default_rng(3).random((3, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("kind", ["script", "trace"])
def test_prepare_torch_serves_the_torchscript_model_when_given_a_torchscript_file(tmp_path, kind):
    model = trained()
    path = tmp_path / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what users have
        example = torch.from_numpy(IMAGES[:1])
        scripted = torch.jit.script(model) if kind == "script" else torch.jit.trace(model, example)
        torch.jit.save(scripted, str(path))
    assert prepare("--torch", path, *SHAPE, "--name", "ts", "--repository", tmp_path / "r") == 0
    out = logits_of(tmp_path / "r" / "ts", IMAGES)
    with torch.no_grad():
        np.testing.assert_allclose(
            out[LOGITS], model(torch.from_numpy(IMAGES)).numpy(), rtol=1e-4, atol=1e-5
        )
    assert ACTIVATION in out


@pytest.mark.parametrize("layout", ["plain", "checkpoint"])
def test_prepare_torch_loads_the_state_dict_when_given_module_factory_and_weights(tmp_path, layout):
    model = trained()
    weights = tmp_path / "weights.pt"
    state = model.state_dict()
    torch.save(state if layout == "plain" else {"state_dict": state, "epoch": 3}, weights)
    code = prepare(
        "--torch", FACTORY, "--weights", weights, *SHAPE, "--name", "f", "--repository", tmp_path
    )
    assert code == 0
    with torch.no_grad():
        want = model(torch.from_numpy(IMAGES)).numpy()
    np.testing.assert_allclose(
        logits_of(tmp_path / "f", IMAGES)[LOGITS], want, rtol=1e-4, atol=1e-5
    )


def test_prepare_torch_refuses_a_pickled_model_when_weights_are_not_a_plain_state_dict(
    tmp_path, capsys
):
    weights = tmp_path / "whole_model.pt"
    torch.save(trained(), weights)  # a full pickled module: loading it would run its code
    code = prepare(
        "--torch", FACTORY, "--weights", weights, *SHAPE, "--name", "f", "--repository", tmp_path
    )
    assert code == 2
    assert "weights_only=True" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whole_model.pt"]


def _bad_cases(tmp: Path) -> dict[str, tuple[list[object], str]]:
    wrong = tmp / "wrong.pt"
    torch.save(SmallNet(classes=7).state_dict(), wrong)
    state = tmp / "state.pt"
    torch.save(trained().state_dict(), state)
    return {
        "bad-module": (["--torch", "no_such_pkg.models:build", *SHAPE], "cannot import module"),
        "bad-attr": (["--torch", "tests.unit.test_prepare_torch:nothing", *SHAPE], "no attribute"),
        "not-module": (
            ["--torch", "tests.unit.test_prepare_torch:not_a_module", *SHAPE],
            "not an nn",
        ),
        "mismatch": (["--torch", FACTORY, "--weights", wrong, *SHAPE], "do not fit"),
        "missing-weights": (["--torch", FACTORY, "--weights", tmp / "no.pt", *SHAPE], "not found"),
        "not-torchscript": (["--torch", state, *SHAPE], "not a TorchScript file"),
        "wrong-shape": (["--torch", FACTORY, "--input-shape", "1", "8", "8"], "export failed"),
        "no-shape": (["--torch", FACTORY], "--input-shape"),
        "onnx-and-shape": (["--onnx", state, *SHAPE], "--torch models only"),
    }


def test_prepare_torch_exits_non_zero_and_writes_nothing_when_model_cannot_be_loaded(
    tmp_path, capsys
):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for case, (args, message) in _bad_cases(inputs).items():
        capsys.readouterr()
        code = prepare(*args, "--name", "m", "--repository", tmp_path / "repo")
        err = capsys.readouterr().err
        assert code == 2, case
        assert re.search(message, err), f"{case}: {err}"
        assert not (tmp_path / "repo").exists(), case
