"""HEATMAP through the Triton-free service on the real demo model: the head prepared once,
maps at the activation's resolution on request, and the per-request cap on VOICE."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrust.core import heatmaps
from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import ACTIVATION, HEATMAP, HEATMAP_STATS, LOGITS
from gradtrust.serving.service import ScoringRequest, TrustService
from gradtrust.serving.settings import (
    DEFAULT_MAX_VOICE_IMAGES,
    ModelSettings,
    RequestOptions,
    parse_request,
)
from gradtrust_client import TrustClient, overlay_png, upsample_heatmap
from gradtrust_client.errors import InvalidImageError, InvalidRequestError
from tests.conftest import DEMO_ONNX, MODEL_REPOSITORY
from tests.unit.test_client_unit import FakeTransport

LABELS = (MODEL_REPOSITORY / "gradtrust_mnist" / "labels.txt").read_text().split()


class CountingClassifier(OnnxClassifier):
    """The real demo classifier, counting how often the head weight is read."""

    head_reads = 0

    def head_weight(self) -> np.ndarray:
        self.head_reads += 1
        return super().head_weight()


def _service(**params: str) -> TrustService:
    settings = ModelSettings.from_parameters({"pixel_range": "0,1", **params}, LABELS)
    return TrustService(CountingClassifier(DEMO_ONNX), settings)


def _options(method: str, size: str = "input") -> RequestOptions:
    return parse_request(
        {"heatmap_method": method, "heatmap_size": size}, ModelSettings(tuple(LABELS)), False, True
    )


# --------------------------------------------------------------------------- parameters


def test_parse_request_defaults_heatmap_size_to_input_when_not_given() -> None:
    options = parse_request({}, ModelSettings(tuple(LABELS)), False, True)
    assert options.heatmap_size == "input"
    assert _options("gradcam", " activation ").heatmap_size == "activation"


def test_parse_request_refuses_heatmap_size_listing_valid_values_when_unknown() -> None:
    with pytest.raises(InvalidInputError, match="unknown heatmap_size 'full'.*input, activation"):
        _options("gradcam", "full")


def test_model_settings_read_max_voice_images_when_configured() -> None:
    assert ModelSettings.from_parameters({}, LABELS).max_voice_images == DEFAULT_MAX_VOICE_IMAGES
    assert ModelSettings.from_parameters({"max_voice_images": "3"}, LABELS).max_voice_images == 3
    with pytest.raises(ConfigError, match="max_voice_images' must be an integer >= 0"):
        ModelSettings.from_parameters({"max_voice_images": "-1"}, LABELS)


# --------------------------------------------------------------------------- the prepared head


def test_service_reads_head_weight_once_when_many_heatmap_requests_follow(digits) -> None:
    service = _service()
    for method in heatmaps.METHODS:
        answers = service.run([ScoringRequest(digits[0][:2], _options(method))]).answers
        assert isinstance(answers[0], dict) and answers[0][HEATMAP].shape == (2, 28, 28)
    assert isinstance(service.classifier, CountingClassifier)
    assert service.classifier.head_reads == 1
    assert service.head is not None and not service.head.weight.flags.writeable


# --------------------------------------------------------------------------- activation resolution


@pytest.mark.parametrize("method", heatmaps.METHODS)
def test_service_returns_activation_resolution_map_when_heatmap_size_is_activation(
    method: str, digits
) -> None:
    service = _service()
    images = digits[0][:3]
    low, full = (
        service.run([ScoringRequest(images, _options(method, size))]).answers[0]
        for size in ("activation", "input")
    )
    assert isinstance(low, dict) and isinstance(full, dict)
    net = service.classifier.run(images, [LOGITS, ACTIVATION])
    expected, stats = heatmaps.explain(
        method, net[ACTIVATION], service.head, net[LOGITS], size=None
    )
    assert low[HEATMAP].shape == (3, *net[ACTIVATION].shape[2:])
    np.testing.assert_allclose(low[HEATMAP], expected, atol=1e-6)
    if method == "voice":
        np.testing.assert_allclose(low[HEATMAP_STATS], stats, atol=1e-6)
    else:  # the low-resolution stage of the input-size map
        up = heatmaps.minmax_normalize(heatmaps.upsample_bilinear(low[HEATMAP], (28, 28)))
        np.testing.assert_allclose(up, full[HEATMAP], atol=1e-5)


# --------------------------------------------------------------------------- the VOICE cap


def test_service_refuses_voice_naming_the_limit_when_request_has_more_images_than_cap(
    digits,
) -> None:
    service = _service(max_voice_images="2")
    images = digits[0]
    answers = service.run(
        [
            ScoringRequest(images[:3], _options("voice")),
            ScoringRequest(images[:2], _options("voice")),
            ScoringRequest(images[:3], _options("gradcam")),
        ]
    ).answers
    assert isinstance(answers[0], InvalidInputError)
    message = str(answers[0])
    assert "limited to 2 image(s) per request" in message
    assert "'max_voice_images'" in message and "this request has 3" in message
    assert isinstance(answers[1], dict) and answers[1][HEATMAP].shape == (2, 28, 28)
    assert isinstance(answers[2], dict) and answers[2][HEATMAP].shape == (3, 28, 28)


def test_service_refuses_every_voice_request_saying_it_is_off_when_cap_is_zero(digits) -> None:
    service = _service(max_voice_images="0")
    answer = service.run([ScoringRequest(digits[0][:1], _options("voice"))]).answers[0]
    assert isinstance(answer, InvalidInputError)
    assert "turned off" in str(answer) and "'max_voice_images' is 0" in str(answer)


# --------------------------------------------------------------------------- the client


@pytest.fixture
def fake_client() -> tuple[TrustClient, FakeTransport]:
    client = TrustClient("fake:8000")
    fake = FakeTransport()
    client._transport = fake  # type: ignore[assignment]
    return client, fake


def test_trust_client_sends_heatmap_size_only_when_activation_is_asked(fake_client) -> None:
    client, fake = fake_client
    images = np.zeros((1, 1, 28, 28), np.float32)
    client.explain(images, "gradcam")
    client.explain(images, "voice", heatmap_size="activation")
    assert fake.calls[0][2] == {"heatmap_method": "gradcam"}
    assert fake.calls[1][2] == {"heatmap_method": "voice", "heatmap_size": "activation"}
    with pytest.raises(InvalidRequestError, match="unknown heatmap_size 'full'.*input, activation"):
        client.explain(images, "gradcam", heatmap_size="full")


def test_upsample_heatmap_zeroes_constant_maps_and_refuses_wrong_shapes() -> None:
    np.testing.assert_array_equal(upsample_heatmap(np.full((7, 7), 0.4), (28, 28)), 0.0)
    with pytest.raises(InvalidImageError, match=r"\(h, w\) or \(N, h, w\)"):
        upsample_heatmap(np.zeros(7), (28, 28))


def test_overlay_png_upsamples_activation_resolution_map_when_sizes_differ(tmp_path) -> None:
    low = np.zeros((7, 7))
    low[3, 3] = 1.0
    out = overlay_png(np.zeros((1, 28, 28)), low, "Why 7?", tmp_path / "o.png", scale=2)
    assert out.is_file() and out.stat().st_size > 0
