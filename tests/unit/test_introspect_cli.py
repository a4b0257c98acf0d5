"""`gradtrust introspect`: trains on an entry's labelled data (an .npz or an image folder),
writes a loadable introspection.onnx and its report into the entry, is reproducible with a
seed, and refuses what it cannot use with a message saying what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from gradtrust.cli import main
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import INTROSPECTION_ONNX
from gradtrust.serving.introspector import Introspector
from tests.conftest import DEMO_MODEL, MODEL_REPOSITORY

FAST = ["--max-epochs", "3", "--patience", "3", "--hidden", "16"]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of the demo entry without its introspective network."""
    root = tmp_path / "repo"
    shutil.copytree(MODEL_REPOSITORY / DEMO_MODEL, root / DEMO_MODEL)
    (root / DEMO_MODEL / "1" / INTROSPECTION_ONNX).unlink()
    return root


def _npz(tmp_path: Path, digits) -> Path:
    images, labels = digits
    path = tmp_path / "data.npz"
    np.savez(
        path,
        images=images[100:],
        labels=labels[100:],
        calibration_images=images[:100],
        calibration_labels=labels[:100],
    )
    return path


def _introspect(repo: Path, *extra: str) -> int:
    return main(["introspect", "--model-repository", str(repo), *FAST, *extra])


def test_introspect_writes_a_loadable_network_and_its_report_when_data_is_an_npz(
    repo, tmp_path, digits
) -> None:
    assert _introspect(repo, "--data", str(_npz(tmp_path, digits))) == 0
    entry = repo / DEMO_MODEL
    network = Introspector(entry / "1" / INTROSPECTION_ONNX, 10, 64)
    out = OnnxClassifier(entry / "1" / "model.onnx").run(digits[0][:4], ["logits", "features"])
    prediction = network.predict(out["logits"], out["features"])
    assert prediction.class_id.shape == (4,)
    assert np.all((prediction.confidence >= 0.1) & (prediction.confidence <= 1.0))
    report = json.loads((entry / "introspection_report.json").read_text())
    assert report["train_size"] + report["validation_size"] == 100
    assert report["rank"] == 10 and report["hidden"] == 16


def test_introspect_gives_the_same_network_when_run_twice_with_one_seed(
    repo, tmp_path, digits
) -> None:
    data = str(_npz(tmp_path, digits))
    path = repo / DEMO_MODEL / "1" / INTROSPECTION_ONNX
    weights = []
    for _ in range(2):
        assert _introspect(repo, "--data", data, "--seed", "3") == 0
        weights.append(
            [
                np.asarray(onnx.numpy_helper.to_array(t))
                for t in onnx.load(str(path)).graph.initializer
            ]
        )
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_introspect_reads_an_image_folder_and_reports_when_asked(repo, tmp_path, digits) -> None:
    images, labels = digits
    folder = tmp_path / "folder"
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / str(label)
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(image[0] * 255).astype(np.uint8)).save(target / f"{i}.png")
    report = tmp_path / "report.md"
    code = _introspect(repo, "--data", str(folder), "--report", str(report), "--severities", "5")
    assert code == 0
    text = report.read_text()
    assert "| clean |" in text and "| corruptions pooled |" in text
    assert (repo / DEMO_MODEL / "1" / INTROSPECTION_ONNX).is_file()


def test_introspect_refuses_naming_prepare_when_the_model_has_no_features(
    repo, tmp_path, digits, capsys
) -> None:
    path = repo / DEMO_MODEL / "1" / "model.onnx"
    model = onnx.load(str(path))
    keep = [o for o in model.graph.output if o.name != "features"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(path))
    assert _introspect(repo, "--data", str(_npz(tmp_path, digits))) == 2
    assert "gradtrust prepare" in capsys.readouterr().err
    assert not (repo / DEMO_MODEL / "1" / INTROSPECTION_ONNX).exists()
