"""Explanation heatmaps through the real tritonserver: equal to the in-process maps, and
clear errors when a request cannot be explained."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.utils import InferenceServerException

from gradtrust.core.heatmaps import explain
from gradtrust.serving.classifier import head_weight_from_onnx
from tests.conftest import DEMO_ONNX
from tests.integration.triton_io import PROTOCOLS, infer

pytestmark = pytest.mark.integration

HEATMAP_OUTPUTS = ("CLASS_ID", "HEATMAP")


@pytest.fixture(scope="module")
def net(digits) -> dict[str, np.ndarray]:
    images = digits[0][:6]
    session = ort.InferenceSession(str(DEMO_ONNX), providers=["CPUExecutionProvider"])
    logits, activation = session.run(["logits", "activation"], {"image": images})
    return {"images": images, "logits": logits, "activation": activation}


def _expected(net, method, contrast_class=None):
    return explain(
        method,
        net["activation"],
        head_weight_from_onnx(DEMO_ONNX),
        net["logits"],
        size=(28, 28),
        contrast_class=contrast_class,
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("method", ["gradcam", "counterfactual", "contrast", "voice"])
def test_served_heatmap_equals_in_process_map_when_method_is_requested(
    triton_server, net, protocol, method
):
    outputs = (*HEATMAP_OUTPUTS, "HEATMAP_STATS") if method == "voice" else HEATMAP_OUTPUTS
    out = infer(
        triton_server,
        protocol,
        net["images"],
        outputs=outputs,
        parameters={"heatmap_method": method},
    )
    maps, stats = _expected(net, method)
    assert out["HEATMAP"].shape == (6, 28, 28)
    assert out["HEATMAP"].min() >= 0.0 and out["HEATMAP"].max() <= 1.0
    np.testing.assert_allclose(out["HEATMAP"], maps, atol=1e-5)
    if method == "voice":
        np.testing.assert_allclose(out["HEATMAP_STATS"], stats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("contrast_class", [7, "7"])
def test_served_contrast_map_uses_named_class_when_request_gives_index_or_label(
    triton_server, net, protocol, contrast_class
):
    out = infer(
        triton_server,
        protocol,
        net["images"],
        outputs=HEATMAP_OUTPUTS,
        parameters={"heatmap_method": "contrast", "contrast_class": contrast_class},
    )
    maps, _ = _expected(net, "contrast", contrast_class=7)
    np.testing.assert_allclose(out["HEATMAP"], maps, atol=1e-5)
    default, _ = _expected(net, "contrast")
    assert not np.allclose(maps, default), "the named class made no difference"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_implies_gradcam_when_heatmap_is_named_without_method(triton_server, net, protocol):
    out = infer(triton_server, protocol, net["images"], outputs=HEATMAP_OUTPUTS)
    np.testing.assert_allclose(out["HEATMAP"], _expected(net, "gradcam")[0], atol=1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"heatmap_method": "occlusion"}, "unknown heatmap_method 'occlusion'"),
        ({"heatmap_method": "contrast", "contrast_class": 12}, "out of range"),
        ({"heatmap_method": "contrast", "contrast_class": "seven"}, "neither a class index"),
    ],
)
def test_server_rejects_unexplainable_request_with_clear_error_when_parameters_are_bad(
    triton_server, net, protocol, params, message
):
    with pytest.raises(InferenceServerException) as info:
        infer(triton_server, protocol, net["images"], outputs=HEATMAP_OUTPUTS, parameters=params)
    assert message in str(info.value)
    assert infer(triton_server, protocol, net["images"][:1])["GRADTRUST"].shape == (1, 1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_refuses_heatmap_clearly_when_model_cannot_produce_one(
    bare_demo_server, net, protocol
):
    with pytest.raises(InferenceServerException) as info:
        infer(
            bare_demo_server,
            protocol,
            net["images"],
            outputs=HEATMAP_OUTPUTS,
            parameters={"heatmap_method": "gradcam"},
        )
    assert "cannot produce a HEATMAP" in str(info.value)
    plain = infer(bare_demo_server, protocol, net["images"])
    np.testing.assert_array_equal(plain["CLASS_ID"][:, 0], net["logits"].argmax(axis=1))
