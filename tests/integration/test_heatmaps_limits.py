"""VOICE's per-request cap and activation-resolution maps through the real tritonserver,
over HTTP and gRPC, on the demo model (default config: max_voice_images = 8)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.utils import InferenceServerException

from gradtrust.core.heatmaps import explain
from gradtrust.serving.classifier import head_weight_from_onnx
from gradtrust.serving.settings import DEFAULT_MAX_VOICE_IMAGES
from tests.conftest import DEMO_ONNX
from tests.integration.triton_io import PROTOCOLS, infer

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_refuses_voice_naming_the_limit_when_request_has_more_images_than_cap(
    triton_server, digits, protocol
):
    images = digits[0][: DEFAULT_MAX_VOICE_IMAGES + 1]
    with pytest.raises(InferenceServerException) as info:
        infer(
            triton_server,
            protocol,
            images,
            outputs=("CLASS_ID", "HEATMAP"),
            parameters={"heatmap_method": "voice"},
        )
    message = str(info.value)
    assert f"limited to {DEFAULT_MAX_VOICE_IMAGES} image(s) per request" in message
    assert "'max_voice_images'" in message
    at_cap = infer(
        triton_server,
        protocol,
        images[:DEFAULT_MAX_VOICE_IMAGES],
        outputs=("CLASS_ID", "HEATMAP"),
        parameters={"heatmap_method": "voice"},
    )
    assert at_cap["HEATMAP"].shape == (DEFAULT_MAX_VOICE_IMAGES, 28, 28)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("method", ["gradcam", "voice"])
def test_served_heatmap_is_at_activation_resolution_when_heatmap_size_is_activation(
    triton_server, digits, protocol, method
):
    images = digits[0][:4]
    out = infer(
        triton_server,
        protocol,
        images,
        outputs=("CLASS_ID", "HEATMAP"),
        parameters={"heatmap_method": method, "heatmap_size": "activation"},
    )
    session = ort.InferenceSession(str(DEMO_ONNX), providers=["CPUExecutionProvider"])
    logits, activation = session.run(["logits", "activation"], {"image": images})
    maps, _ = explain(method, activation, head_weight_from_onnx(DEMO_ONNX), logits, size=None)
    assert out["HEATMAP"].shape == (4, *activation.shape[2:])
    np.testing.assert_allclose(out["HEATMAP"], maps, atol=1e-5)
