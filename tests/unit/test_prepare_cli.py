"""``gradtrust prepare`` from the command line: a complete entry, or a clear error and no trace."""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2

from gradtrust.core import scores
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.decoding import PreprocessSpec
from gradtrust.serving.service import ScoringRequest, TrustService
from gradtrust.serving.settings import DEFAULT_SCORES, ModelSettings, RequestOptions
from gradtrust.tools.prepare import cli
from tests.conftest import MODEL_REPOSITORY
from tests.unit.test_prepare_zoo import ZOO_BY_NAME, export

GAP = ZOO_BY_NAME["gap_cnn"]  # 10 classes, input (1, 12, 12), heatmaps
RGB = ZOO_BY_NAME["softmax_cnn"]  # 5 classes, input (3, 10, 12)


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    folder = tmp_path_factory.mktemp("cli-zoo")
    return {z.name: (m := z.model(), export(z, m, folder / f"{z.name}.onnx")) for z in (GAP, RGB)}


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones too) with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def prepare(*args: object) -> int:
    return cli.main([str(a) for a in args])


def test_prepare_writes_a_complete_entry_when_given_an_onnx_classifier(tmp_path, zoo_files):
    repo = tmp_path / "repo"
    assert prepare("--onnx", zoo_files["gap_cnn"][1], "--name", "gap", "--repository", repo) == 0
    assert sorted(tree(repo / "gap")) == [
        "1/model.onnx",
        "1/model.py",
        "config.pbtxt",
        "labels.txt",
    ]
    assert (repo / "gap" / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    assert (
        "from gradtrust.triton.model import TritonPythonModel"
        in (repo / "gap" / "1" / "model.py").read_text()
    )
    assert OnnxClassifier(repo / "gap" / "1" / "model.onnx").has_activation


def test_prepare_says_the_entry_is_uncalibrated_and_how_to_calibrate_when_written(
    tmp_path, zoo_files, capsys
):
    repo = tmp_path / "repo"
    assert prepare("--onnx", zoo_files["gap_cnn"][1], "--name", "gap", "--repository", repo) == 0
    out = capsys.readouterr().out
    assert "gap is uncalibrated" in out
    assert f"gradtrust calibrate --model-repository {repo} --model gap --data FOLDER" in out
    assert not (repo / "gap" / "trust_calibration.json").exists()


def test_prepare_config_declares_inputs_from_the_graph_when_written(tmp_path, zoo_files):
    repo = tmp_path / "repo"
    prepare("--onnx", zoo_files["softmax_cnn"][1], "--name", "rgb", "--repository", repo)
    config = parse_config(repo / "rgb" / "config.pbtxt")
    reference = parse_config(MODEL_REPOSITORY / "gradtrust_mnist" / "config.pbtxt")
    assert (config.name, config.backend, config.max_batch_size) == ("rgb", "python", 64)
    image, encoded = config.input
    assert (image.name, image.data_type, list(image.dims), image.optional) == (
        "IMAGE",
        model_config_pb2.TYPE_FP32,
        [3, 10, 12],
        True,
    )
    assert (encoded.name, encoded.data_type, list(encoded.dims)) == (
        "IMAGE_BYTES",
        model_config_pb2.TYPE_STRING,
        [1],
    )
    assert list(config.output) == list(reference.output)
    assert config.HasField("dynamic_batching")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["onnx_file"] == "model.onnx"
    assert params["scores"] == ",".join(DEFAULT_SCORES)
    assert float(params["low_trust_threshold"]) == pytest.approx(4.39, abs=0.1)
    assert PreprocessSpec.from_parameters(params, (3, 10, 12)) == PreprocessSpec(3, size=(10, 12))


def test_prepare_records_preprocessing_when_mean_std_scale_and_layout_are_given(
    tmp_path, zoo_files
):
    repo = tmp_path / "repo"
    code = prepare(
        "--onnx", zoo_files["softmax_cnn"][1], "--name", "rgb", "--repository", repo,
        "--mean", "0.485,0.456,0.406", "--std", "0.229", "0.224", "0.225", "--scale", "1/255",
        "--input-size", "10", "12", "--max-batch-size", "8", "--low-trust-threshold", "2.5",
        "--scores", "msp,margin",
    )  # fmt: skip
    assert code == 0
    config = parse_config(repo / "rgb" / "config.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    spec = PreprocessSpec.from_parameters(params, (3, 10, 12))
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert spec.scale == 1 / 255 and spec.size == (10, 12)
    assert (config.max_batch_size, params["low_trust_threshold"], params["scores"]) == (
        8,
        "2.5",
        "msp,margin",
    )


def test_prepared_entry_scores_like_torch_when_run_by_the_service_in_process(tmp_path, zoo_files):
    model, path = zoo_files["gap_cnn"]
    prepare("--onnx", path, "--name", "gap", "--repository", tmp_path)
    labels = (tmp_path / "gap" / "labels.txt").read_text().split()
    service = TrustService(
        OnnxClassifier(tmp_path / "gap" / "1" / "model.onnx"), ModelSettings(tuple(labels))
    )
    images = GAP.images(4)
    options = RequestOptions(DEFAULT_SCORES, 3, None, None)
    (answer,) = service.run([ScoringRequest(images, options)]).answers
    with torch.no_grad():
        logits = model.double()(torch.from_numpy(images.astype(np.float64))).numpy()
    model.float()
    np.testing.assert_allclose(answer["GRADTRUST"][:, 0], scores.gradtrust(logits), rtol=1e-4)
    np.testing.assert_array_equal(answer["CLASS_ID"][:, 0], logits.argmax(axis=1))


def test_prepare_writes_the_given_labels_when_labels_file_matches(tmp_path, zoo_files):
    labels = tmp_path / "classes.txt"
    labels.write_text("cat\ndog\nbird\nfish\nfrog\n\n")
    code = prepare(
        "--onnx", zoo_files["softmax_cnn"][1], "--name", "rgb", "--repository", tmp_path / "r",
        "--labels", labels,
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "r" / "rgb" / "labels.txt").read_text() == "cat\ndog\nbird\nfish\nfrog\n"


def test_prepare_replaces_the_entry_when_force_is_given(tmp_path, zoo_files):
    repo = tmp_path / "repo"
    prepare("--onnx", zoo_files["gap_cnn"][1], "--name", "m", "--repository", repo)
    (repo / "m" / "stale.txt").write_text("old")
    assert prepare("--onnx", zoo_files["softmax_cnn"][1], "--name", "m", "--repository", repo,
                   "--force") == 0  # fmt: skip
    assert not (repo / "m" / "stale.txt").exists()
    assert list(parse_config(repo / "m" / "config.pbtxt").input[0].dims) == [3, 10, 12]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging left behind


def _bad_cases(tmp: Path, files: dict[str, tuple[nn.Module, Path]]) -> dict[str, tuple[list, str]]:
    gap = files["gap_cnn"][1]
    corrupt = tmp / "corrupt.onnx"
    corrupt.write_bytes(gap.read_bytes()[:200])
    headless = tmp / "headless.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, on purpose
        torch.onnx.export(
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval(),
            (torch.zeros(1, 1, 8, 8),), str(headless), dynamo=False, opset_version=17,
        )  # fmt: skip
    short = tmp / "short.txt"
    short.write_text("a\nb\nc\n")
    blank = tmp / "blank.txt"
    blank.write_text("a\n\nb\n" + "x\n" * 8)
    twice = tmp / "twice.txt"
    twice.write_text("a\na\n" + "".join(f"{i}\n" for i in range(8)))
    return {
        "corrupt": (["--onnx", corrupt], "not a valid ONNX model"),
        "missing-onnx": (["--onnx", tmp / "nope.onnx"], "not found"),
        "not-a-classifier": (["--onnx", headless], "no final linear layer"),
        "missing-labels": (
            ["--onnx", gap, "--labels", tmp / "none.txt"],
            "labels file .* not found",
        ),
        "label-count": (["--onnx", gap, "--labels", short], "lists 3 labels but the model has 10"),
        "blank-label": (["--onnx", gap, "--labels", blank], "empty line"),
        "repeated-label": (["--onnx", gap, "--labels", twice], "repeats"),
        "bad-name": (["--onnx", gap, "--name", "../escape"], "model name"),
        "threshold": (["--onnx", gap, "--low-trust-threshold", "-1"], "finite number >= 0"),
        "mean-count": (["--onnx", gap, "--mean", "0.1", "0.2"], "mean needs 1 value"),
        "size": (["--onnx", gap, "--input-size", "8", "8"], "disagrees"),
        "torch-shape": (["--torch", "tests.test_prepare_torch:build_classifier"], "--input-shape"),
        "score": (["--onnx", gap, "--scores", "msp,bogus"], "bogus"),
    }


def test_prepare_exits_non_zero_and_writes_nothing_when_input_is_bad(tmp_path, zoo_files, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    repo = tmp_path / "repo"
    prepare("--onnx", zoo_files["softmax_cnn"][1], "--name", "existing", "--repository", repo)
    before = tree(tmp_path)
    for case, (args, message) in _bad_cases(inputs, zoo_files).items():
        before = tree(tmp_path)
        named = args if "--name" in args else [*args, "--name", "new"]
        capsys.readouterr()
        assert prepare(*named, "--repository", repo) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("gradtrust: error: "), case
        assert re.search(message, err), f"{case}: {err}"
        assert tree(tmp_path) == before, case
    assert (
        prepare("--onnx", zoo_files["gap_cnn"][1], "--name", "existing", "--repository", repo) == 2
    )
    assert "already exists" in capsys.readouterr().err


def test_prepare_leaves_the_repository_unchanged_when_writing_fails_midway(
    tmp_path, zoo_files, monkeypatch, capsys
):
    repo = tmp_path / "repo"
    prepare("--onnx", zoo_files["gap_cnn"][1], "--name", "m", "--repository", repo)
    before = tree(tmp_path)
    real = Path.write_bytes

    def failing(self: Path, data: bytes) -> int:
        if self.name == "model.onnx":
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing)
    code = prepare("--onnx", zoo_files["softmax_cnn"][1], "--name", "m", "--repository", repo,
                   "--force")  # fmt: skip
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    assert tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_register_adds_the_prepare_subcommand_when_given_a_parent_parser():
    parser = argparse.ArgumentParser(prog="gradtrust")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", "--onnx", "m.onnx", "--name", "x", "--layout", "nhwc"])
    assert (args.command, args.onnx, args.layout, args.func) == (
        "prepare",
        "m.onnx",
        "NHWC",
        cli.run,
    )
