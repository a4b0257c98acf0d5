"""Wrapping a classifier already deployed in Triton: config parameters, BLS calls, the CLI."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from gradtrust.core import scores
from gradtrust.errors import ConfigError, GradTrustError
from gradtrust.serving.bls import BlsClassifier, WrapSpec, image_input, triton_infer
from gradtrust.serving.contract import FEATURES, LOGITS
from gradtrust.serving.service import ScoringRequest, TrustService
from gradtrust.serving.settings import DEFAULT_SCORES, ModelSettings, RequestOptions
from gradtrust.tools.prepare import cli

RNG = np.random.default_rng(11)
W = RNG.normal(size=(5, 8))  # the deployed model: z = relu(x.flatten() @ P) @ W.T
P = RNG.normal(size=(12, 8))


def deployed(calls: list[dict[str, Any]]) -> Any:
    """A fake deployed classifier answering like a BLS call would."""

    def infer(model: str, version: int, input_name: str, images: np.ndarray, outputs: Any):
        calls.append({"model": model, "version": version, "input": input_name, "n": len(images)})
        h = np.maximum(images.reshape(len(images), -1) @ P, 0)
        table = {"scores_out": (h @ W.T).astype(np.float32), "embedding": h.astype(np.float32)}
        return {name: table[name] for name in outputs}

    return infer


def test_wrap_spec_reads_and_writes_its_parameters_when_all_are_given():
    spec = WrapSpec("resnet_trt", "input", "scores_out", "embedding", 3)
    assert WrapSpec.from_parameters(spec.to_parameters()) == spec
    assert WrapSpec.from_parameters({"onnx_file": "model.onnx"}) is None


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"wrapped_model": "m", "wrapped_input": "x"}, "wrapped_logits"),
        ({"wrapped_logits": "z"}, "need wrapped_model"),
        (
            {
                "wrapped_model": "m",
                "wrapped_input": "x",
                "wrapped_logits": "z",
                "wrapped_version": "latest",
            },
            "integer",
        ),
    ],  # fmt: skip
)
def test_wrap_spec_raises_config_error_when_parameters_are_incomplete(params, words):
    with pytest.raises(ConfigError, match=words):
        WrapSpec.from_parameters(params)


def test_image_input_reads_dims_and_dtype_when_config_has_image():
    config = {"input": [{"name": "IMAGE_BYTES"}, {"name": "IMAGE", "data_type": "TYPE_FP32",
                                                 "dims": ["1", "3", "4"]}]}  # fmt: skip
    assert image_input(config) == ((1, 3, 4), "float32")
    with pytest.raises(ConfigError, match="no input named IMAGE"):
        image_input({"input": []})


def test_bls_classifier_maps_deployed_outputs_to_logits_and_features_when_run():
    calls: list[dict[str, Any]] = []
    classifier = BlsClassifier(
        WrapSpec("dep", "pixels", "scores_out", "embedding", 2), deployed(calls), (1, 3, 4),
        "float32", 5,
    )  # fmt: skip
    images = RNG.random((3, 1, 3, 4)).astype(np.float32)
    out = classifier.run(images, (LOGITS, FEATURES))
    h = np.maximum(images.reshape(3, -1) @ P, 0)
    np.testing.assert_allclose(out[FEATURES], h, rtol=1e-5)
    np.testing.assert_allclose(out[LOGITS], h @ W.T, rtol=1e-4, atol=1e-5)
    assert calls == [{"model": "dep", "version": 2, "input": "pixels", "n": 3}]
    assert classifier.has_features and not classifier.has_activation


def test_bls_classifier_raises_when_deployed_class_count_differs_from_labels():
    classifier = BlsClassifier(
        WrapSpec("dep", "pixels", "scores_out"), deployed([]), (1, 3, 4), "float32", 7
    )
    with pytest.raises(GradTrustError, match="5 logits but labels.txt lists 7"):
        classifier.run(np.zeros((2, 1, 3, 4), np.float32))


def test_trust_service_scores_a_wrapped_model_like_its_logits_when_run_in_process():
    classifier = BlsClassifier(
        WrapSpec("dep", "pixels", "scores_out", "embedding"), deployed([]), (1, 3, 4),
        "float32", 5,
    )  # fmt: skip
    service = TrustService(classifier, ModelSettings(tuple("abcde")))
    images = RNG.random((4, 1, 3, 4)).astype(np.float32)
    (answer,) = service.run(
        [ScoringRequest(images, RequestOptions(DEFAULT_SCORES, 3, None, None))]
    ).answers
    z = deployed([])("dep", -1, "pixels", images, ["scores_out"])["scores_out"]
    np.testing.assert_allclose(answer["GRADTRUST"][:, 0], scores.gradtrust(z), rtol=1e-5)
    assert answer["SCORES"].shape == (4, len(DEFAULT_SCORES))


class FakeResponse:
    def __init__(self, outputs: dict[str, np.ndarray], error: str | None = None) -> None:
        self.outputs, self.message = outputs, error

    def has_error(self) -> bool:
        return self.message is not None

    def error(self) -> Any:
        return SimpleNamespace(message=lambda: self.message)


def fake_pb_utils(response: FakeResponse, seen: dict[str, Any]) -> Any:
    class Request:
        def __init__(self, **kwargs: Any) -> None:
            seen.update(kwargs)

        def exec(self) -> FakeResponse:
            return response

    return SimpleNamespace(
        InferenceRequest=Request,
        Tensor=lambda name, value: (name, value),
        get_output_tensor_by_name=lambda r, name: (
            SimpleNamespace(as_numpy=lambda: r.outputs[name]) if name in r.outputs else None
        ),
    )


def test_triton_infer_sends_one_bls_request_when_called():
    seen: dict[str, Any] = {}
    z = np.ones((2, 3), np.float32)
    infer = triton_infer(fake_pb_utils(FakeResponse({"z": z}), seen))
    images = np.zeros((2, 4), np.float32)
    assert infer("dep", 4, "x", images, ["z"])["z"] is z
    assert (seen["model_name"], seen["model_version"], seen["requested_output_names"]) == (
        "dep",
        4,
        ["z"],
    )
    assert seen["inputs"][0][0] == "x"


@pytest.mark.parametrize(
    ("response", "words"),
    [(FakeResponse({}, "model 'dep' is not found"), "not found"), (FakeResponse({}), "no output")],
)
def test_triton_infer_raises_a_clear_error_when_the_deployed_model_fails(response, words):
    infer = triton_infer(fake_pb_utils(response, {}))
    with pytest.raises(GradTrustError, match=words):
        infer("dep", -1, "x", np.zeros((1, 4), np.float32), ["z"])


def test_prepare_wrap_writes_an_entry_without_onnx_when_given_a_deployed_model(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    code = cli.main(
        ["--wrap", "dep", "--wrap-input", "pixels", "--wrap-logits", "scores_out",
         "--input-shape", "3", "16", "16", "--labels", str(labels), "--name", "dep_trust",
         "--repository", str(tmp_path / "repo")]
    )  # fmt: skip
    assert code == 0
    entry = tmp_path / "repo" / "dep_trust"
    assert sorted(p.name for p in entry.rglob("*") if p.is_file()) == [
        "config.pbtxt",
        "labels.txt",
        "model.py",
    ]
    config = text_format.Parse((entry / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert WrapSpec.from_parameters(params) == WrapSpec("dep", "pixels", "scores_out")
    assert "gradnorm" not in params["scores"].split(",")  # no features were named
    assert list(config.input[0].dims) == [3, 16, 16]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--wrap-logits", "z", "--input-shape", "3", "8", "8"], "--wrap-input"),
        (
            [
                "--wrap-input",
                "x",
                "--wrap-logits",
                "z",
                "--input-shape",
                "3",
                "8",
                "8",
                "--scores",
                "gradnorm",
            ],
            "--wrap-features",
        ),
        (["--wrap-input", "x", "--wrap-logits", "z"], "--input-shape"),
    ],  # fmt: skip
    ids=["no-input", "gradnorm-without-features", "no-shape"],
)
def test_prepare_wrap_exits_non_zero_and_writes_nothing_when_options_are_missing(
    tmp_path, capsys, extra, words
):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    args = ["--wrap", "dep", *extra, "--labels", str(labels), "--name", "w"]
    assert cli.main([*args, "--repository", str(tmp_path / "repo")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_prepare_wrap_needs_labels_when_no_labels_file_is_given(tmp_path, capsys):
    args = ["--wrap", "d", "--wrap-input", "x", "--wrap-logits", "z", "--input-shape", "4"]
    assert cli.main([*args, "--name", "w", "--repository", str(tmp_path)]) == 2
    assert "--wrap needs --labels" in capsys.readouterr().err
