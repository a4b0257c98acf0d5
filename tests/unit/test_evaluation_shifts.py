"""Corruptions: range, shape, determinism, severity ordering, on real test digits."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrust.errors import InvalidInputError
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.tools.evaluate import shifts
from gradtrust.tools.evaluate.shifts import CORRUPTIONS, SEVERITIES, corrupt, with_corruptions
from tests.conftest import DEMO_ONNX

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "elastic_transform"}


@pytest.fixture(scope="module")
def few(digits) -> tuple[np.ndarray, np.ndarray]:
    images, labels = digits
    return images[:40], labels[:40]


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_keeps_shape_and_range_and_input_when_applied(name, few):
    images = few[0].copy()
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, seed=3)
        assert out.shape == images.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(images, few[0])


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_reproducible_when_the_seed_is_fixed(name, few):
    a = corrupt(few[0], name, 3, seed=5)
    np.testing.assert_array_equal(a, corrupt(few[0], name, 3, seed=5))
    if name in RANDOM:
        assert not np.array_equal(a, corrupt(few[0], name, 3, seed=6))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_changes_images_more_when_severity_rises(name, few):
    change = [np.abs(corrupt(few[0], name, s) - few[0]).mean() for s in (1, 5)]
    assert 0 < change[0] < change[1]


def test_corruptions_lower_accuracy_when_severity_goes_from_one_to_five(digits):
    images, labels = digits
    model = OnnxClassifier(DEMO_ONNX)
    for name in CORRUPTIONS:
        acc = [
            np.mean(model.run(corrupt(images, name, s))["logits"].argmax(1) == labels)
            for s in (1, 5)
        ]
        assert acc[0] > acc[1], (name, acc)
        assert acc[0] > 0.85, (name, acc)  # severity 1 barely hurts


def test_brightness_adds_its_shift_when_pixels_stay_below_one():
    x = np.full((1, 1, 4, 4), 0.5, np.float32)
    np.testing.assert_allclose(corrupt(x, "brightness", 1), 0.51, atol=1e-7)


def test_defocus_blur_preserves_a_constant_image_when_kernel_is_normalised():
    x = np.full((2, 1, 9, 9), 0.3, np.float32)
    np.testing.assert_allclose(corrupt(x, "defocus_blur", 5), 0.3, atol=1e-6)
    np.testing.assert_allclose(corrupt(x, "motion_blur", 5), 0.3, atol=1e-6)


@pytest.mark.parametrize(
    ("images", "name", "severity", "message"),
    [
        (np.zeros((2, 3, 8, 8)), "contrast", 1, "grayscale"),
        (np.zeros((2, 1, 8, 8)), "contrast", 6, "severity"),
        (np.zeros((2, 1, 8, 8)), "fog", 1, "unknown corruption"),
    ],
)
def test_corrupt_refuses_input_when_it_cannot_apply(images, name, severity, message):
    with pytest.raises(InvalidInputError, match=message):
        corrupt(images, name, severity)


def test_with_corruptions_appends_every_copy_when_mixing(few):
    images, labels = few
    x, y = with_corruptions(images, labels, corruptions=("contrast", "pixelate"), severities=(2,))
    assert x.shape[0] == 3 * images.shape[0]
    np.testing.assert_array_equal(x[:40], images)
    np.testing.assert_array_equal(x[40:80], corrupt(images, "contrast", 2))
    np.testing.assert_array_equal(y, np.tile(labels, 3))
    assert shifts.SEVERITIES == (1, 2, 3, 4, 5)
