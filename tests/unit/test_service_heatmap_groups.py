"""A batch's heatmap requests are explained together: one call per method and map size,
each request still getting exactly its own maps, and an error only where it is due."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gradtrust.core import heatmaps
from gradtrust.errors import InvalidInputError
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import (
    HEATMAP,
    HEATMAP_SIZE_ACTIVATION,
    HEATMAP_SIZE_INPUT,
    HEATMAP_STATS,
)
from gradtrust.serving.service import ScoringRequest, TrustService
from gradtrust.serving.settings import ModelSettings, RequestOptions
from tests.conftest import DEMO_MODEL, DEMO_ONNX, MODEL_REPOSITORY

LABELS = (MODEL_REPOSITORY / DEMO_MODEL / "labels.txt").read_text().split()


def _options(method: str, contrast_class: int | None = None, size: str = HEATMAP_SIZE_INPUT):
    return RequestOptions(None, 3, method, contrast_class, size)


@pytest.fixture(scope="module")
def service() -> TrustService:
    settings = ModelSettings.from_parameters({"pixel_range": "0,1"}, LABELS)
    return TrustService(OnnxClassifier(DEMO_ONNX), settings)


@pytest.fixture
def explain_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The real ``heatmaps.explain``, noting each call's method and number of images."""
    calls: list[tuple[str, int]] = []
    real: Callable[..., Any] = heatmaps.explain

    def noting(method: str, activation: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        calls.append((method, len(activation)))
        return real(method, activation, *args, **kwargs)

    monkeypatch.setattr(heatmaps, "explain", noting)
    return calls


def _alone(service: TrustService, request: ScoringRequest) -> dict[str, np.ndarray]:
    (answer,) = service.run([request]).answers
    assert isinstance(answer, dict)
    return answer


def _assert_same_maps(joint: object, single: dict[str, np.ndarray]) -> None:
    assert isinstance(joint, dict)
    assert set(joint) == set(single)
    # float64 maps rounded to float32: a group's products may round the last bit apart.
    np.testing.assert_allclose(joint[HEATMAP], single[HEATMAP], rtol=0, atol=1e-6)
    if HEATMAP_STATS in single:
        np.testing.assert_allclose(joint[HEATMAP_STATS], single[HEATMAP_STATS], rtol=1e-5)


def test_service_explains_one_image_requests_of_a_method_in_one_call_when_they_share_a_batch(
    service, digits, explain_calls
):
    requests = [ScoringRequest(digits[0][i : i + 1], _options("contrast")) for i in range(5)]
    answers = service.run(requests).answers
    assert explain_calls == [("contrast", 5)]
    explain_calls.clear()
    for joint, request in zip(answers, requests, strict=True):
        _assert_same_maps(joint, _alone(service, request))


def test_service_groups_heatmap_requests_by_method_and_size_when_a_batch_mixes_them(
    service, digits, explain_calls
):
    images = digits[0]
    requests = [
        ScoringRequest(images[0:2], _options("voice")),
        ScoringRequest(images[2:3], _options("gradcam")),
        ScoringRequest(images[3:4], _options("voice")),
        ScoringRequest(images[4:7], _options("gradcam", size=HEATMAP_SIZE_ACTIVATION)),
        ScoringRequest(images[7:8], _options("gradcam")),
        ScoringRequest(images[8:9], RequestOptions(None, 3, None, None)),  # no heatmap
    ]
    answers = service.run(requests).answers
    assert sorted(explain_calls) == [("gradcam", 2), ("gradcam", 3), ("voice", 3)]
    explain_calls.clear()
    for joint, request in zip(answers[:5], requests, strict=False):
        _assert_same_maps(joint, _alone(service, request))
    assert isinstance(answers[5], dict) and HEATMAP not in answers[5]
    assert answers[3][HEATMAP].shape == (3, 7, 7)  # type: ignore[index]


def test_service_keeps_each_requests_contrast_class_when_named_and_default_ones_are_grouped(
    service, digits
):
    images = digits[0]
    requests = [
        ScoringRequest(images[0:2], _options("contrast", contrast_class=7)),
        ScoringRequest(images[2:4], _options("contrast")),  # the second most probable
        ScoringRequest(images[4:5], _options("contrast", contrast_class=1)),
    ]
    answers = service.run(requests).answers
    for joint, request in zip(answers, requests, strict=True):
        _assert_same_maps(joint, _alone(service, request))
    named, default = answers[0], answers[1]
    assert isinstance(named, dict) and isinstance(default, dict)
    other = _alone(service, ScoringRequest(images[0:2], _options("contrast")))
    assert not np.allclose(named[HEATMAP], other[HEATMAP])  # class 7 is not the default


# --- a group that cannot be explained as a whole ----------------------------------------


def _gap_model(path: Path, weight: np.ndarray) -> Path:
    """A real ONNX classifier whose input is its activation: image -> global average
    pooling -> linear head, so a test can choose the activation exactly."""
    classes, channels = weight.shape
    nodes = [
        helper.make_node("Identity", ["image"], ["activation"]),
        helper.make_node("GlobalAveragePool", ["activation"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "w", "b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "gap",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", channels, 4, 4])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
            for name in ("logits", "features", "activation")
        ],
        [
            numpy_helper.from_array(weight.astype(np.float32), "w"),
            numpy_helper.from_array(np.zeros(classes, np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_service_gives_the_error_only_to_the_request_at_fault_when_its_group_fails(
    tmp_path, explain_calls
):
    rng = np.random.default_rng(3)
    weight = 100.0 * rng.uniform(0.5, 1.0, size=(4, 3))
    service = TrustService(
        OnnxClassifier(_gap_model(tmp_path / "gap.onnx", weight)),
        ModelSettings.from_parameters({}, ["a", "b", "c", "d"]),
    )
    images = rng.uniform(0.0, 1.0, size=(3, 3, 4, 4)).astype(np.float32)
    # One pixel of 1e37: its logits (the mean over 16 pixels times ~100) stay finite in
    # float32, but VOICE's product with every class's weight at that pixel does not.
    images[1, :, 2, 2] = 1e37
    requests = [ScoringRequest(images[i : i + 1], _options("voice")) for i in range(3)]
    answers = service.run(requests).answers
    assert explain_calls[0] == ("voice", 3)  # tried together first, then one by one
    assert isinstance(answers[1], InvalidInputError)
    assert "overflows float32" in str(answers[1])
    for i in (0, 2):
        _assert_same_maps(answers[i], _alone(service, requests[i]))
