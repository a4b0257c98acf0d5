"""Input size limits: oversized requests are refused from their shape, before any pixel
is read, with a message naming the limit and the config parameter that sets it."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.service import TrustService
from gradtrust.serving.settings import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_REQUEST_BYTES,
    ModelSettings,
)
from tests.conftest import DEMO_ONNX

LABELS = [str(i) for i in range(10)]
DIGIT_BYTES = 1 * 28 * 28 * 4


def _service(**params: str) -> TrustService:
    return TrustService(OnnxClassifier(DEMO_ONNX), ModelSettings.from_parameters(params, LABELS))


def test_settings_use_generous_default_limits_when_config_sets_none():
    settings = ModelSettings.from_parameters({}, LABELS)
    assert settings.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES == 64 * 1024 * 1024
    assert settings.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS


@pytest.mark.parametrize("key", ["max_request_bytes", "max_image_pixels"])
@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5"])
def test_settings_refuse_a_limit_when_it_is_not_a_positive_integer(key, value):
    with pytest.raises(ConfigError, match=key):
        ModelSettings.from_parameters({key: value}, LABELS)


def test_check_request_size_accepts_a_request_when_it_is_exactly_at_the_limit():
    service = _service(max_request_bytes=str(4 * DIGIT_BYTES))
    service.checks.check_request_size((4, 1, 28, 28), 4)


def test_check_request_size_refuses_a_request_naming_the_parameter_when_one_byte_over():
    service = _service(max_request_bytes=str(4 * DIGIT_BYTES))
    with pytest.raises(InvalidInputError, match="max_request_bytes") as info:
        service.checks.check_request_size((5, 1, 28, 28), 4)
    assert f"{5 * DIGIT_BYTES} bytes" in str(info.value)


def test_check_request_size_refuses_huge_images_when_they_exceed_the_pixel_limit():
    service = _service(max_image_pixels=str(28 * 28 - 1))
    with pytest.raises(InvalidInputError, match="max_image_pixels"):
        service.checks.check_request_size((1, 1, 28, 28), 4)


def test_check_request_size_never_multiplies_into_overflow_when_dims_are_absurd():
    service = _service()
    with pytest.raises(InvalidInputError, match="max_request_bytes"):
        service.checks.check_request_size((2**40, 3, 2**20, 2**20), 4)


def test_check_images_refuses_a_batch_before_reading_pixels_when_over_the_byte_limit():
    service = _service(max_request_bytes=str(2 * DIGIT_BYTES))
    images = np.full((3, 1, 28, 28), np.nan, np.float32)  # the NaNs are never looked at
    with pytest.raises(InvalidInputError, match="max_request_bytes"):
        service.checks.check_images(images)
