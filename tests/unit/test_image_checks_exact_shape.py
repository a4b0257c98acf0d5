"""ImageChecks.check_layout's shortcut for models whose IMAGE dims are all fixed: it
accepts exactly what the full checks accept, and refuses the rest with their message."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gradtrust.errors import InvalidInputError
from gradtrust.serving.checks import ImageChecks
from gradtrust.serving.settings import ModelSettings

SHAPES = [(3, 8, 8), (8, 8, 3), (1, 4, 4), (16,)]


def _outcome(checks: ImageChecks, images: object) -> str | None:
    try:
        checks.check_layout(images)  # type: ignore[arg-type]
    except InvalidInputError as err:
        return str(err)
    return None


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("model_shape", SHAPES)
def test_check_layout_decides_as_the_full_checks_when_every_image_dim_is_fixed(model_shape, layout):
    candidates: list[object] = [[1.0], np.array(["a"]), np.zeros((2, 3), dtype=bool)]
    for shape, dtype in itertools.product(
        [(1, *model_shape), (4, *model_shape), (0, *model_shape), (1, 3, 8, 9), (2, 3, 8)],
        [np.float32, np.float64, np.uint8, np.int16, np.complex64, np.bool_],
    ):
        candidates.append(np.zeros(shape, dtype=dtype))
    for max_bytes, max_pixels in [(10**9, 10**9), (300, 10**9), (10**9, 63), (768, 64)]:
        settings = ModelSettings(
            labels=("a", "b"), max_request_bytes=max_bytes, max_image_pixels=max_pixels
        )
        fast = ImageChecks(settings, model_shape, layout)
        full = ImageChecks(settings, model_shape, layout)
        full._exact_shape = None  # the full checks only
        for images in candidates:
            assert _outcome(fast, images) == _outcome(full, images), (images, max_bytes)


def test_check_layout_refuses_every_request_when_the_fixed_image_exceeds_max_image_pixels():
    settings = ModelSettings(labels=("a", "b"), max_image_pixels=63)
    checks = ImageChecks(settings, (3, 8, 8), "NCHW")
    with pytest.raises(InvalidInputError, match="max_image_pixels"):
        checks.check_layout(np.zeros((1, 3, 8, 8), dtype=np.float32))


def test_screen_decides_as_the_exact_checks_when_a_float32_batch_is_not_contiguous():
    settings = ModelSettings(labels=("a", "b"), pixel_min=0.0, pixel_max=1.0)
    checks = ImageChecks(settings, (1, 4, 4), "NCHW")
    wide = np.random.default_rng(0).random((2, 1, 4, 8), dtype=np.float32)
    clean = wide[:, :, :, ::2]  # a strided view: every other column
    assert not clean.flags.c_contiguous
    assert checks.screen([clean])[0] == [None]
    for bad in (np.nan, np.inf, -0.5, 1.5):
        images = wide.copy()
        images[1, 0, 2, 4] = bad  # inside the view
        images[0, 0, 2, 5] = bad  # outside it: must not count
        (problem,), _ = checks.screen([images[:, :, :, ::2]])
        assert problem is not None and "sample(s) [1]" in str(problem), bad
