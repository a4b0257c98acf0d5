"""The batch pixel screen's one-pass shortcut (float32 pixels, pixel_range [0, hi]) clears a
batch only when the exact checks would, and answers every edge value as they do."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrust.errors import InvalidInputError
from gradtrust.serving.checks import ImageChecks
from gradtrust.serving.settings import ModelSettings

LABELS = [str(i) for i in range(10)]
F32 = np.float32


def _checks(pixel_range: str) -> ImageChecks:
    settings = ModelSettings.from_parameters({"pixel_range": pixel_range}, LABELS)
    return ImageChecks(settings, (1, 4, 4), "NCHW")


def _edge_values(hi: float) -> list[float]:
    h = F32(hi)
    return [
        0.0,
        -0.0,
        float(h),
        float(np.nextafter(h, F32(np.inf))),
        float(np.nextafter(h, F32(0))),
        float(np.nextafter(F32(0), F32(1))),  # the smallest subnormal
        float(np.nextafter(F32(0), F32(-1))),  # its negative
        float(h) / 2,
        -1.0,
        float(np.nan),
        float(-np.float32(np.nan)),  # NaN with the sign bit set
        float(np.inf),
        float(-np.inf),
        float(np.finfo(F32).max),
    ]


def _exact(checks: ImageChecks, image: np.ndarray) -> str | None:
    """The request's problem from the exact per-request checks (min and max pixels)."""
    try:
        checks.check_images(image)
    except InvalidInputError as err:
        return str(err)
    return None


@pytest.mark.parametrize("pixel_range", ["0,1", "0,255", "0,0.3", "-1,1", "0.5,1"])
def test_screen_answers_each_request_as_the_exact_checks_when_pixels_sit_on_the_edges(
    pixel_range,
):
    checks = _checks(pixel_range)
    hi = float(pixel_range.split(",")[1])
    parts = []
    for value in _edge_values(hi):
        image = np.full((1, 1, 4, 4), F32(hi) / 2, dtype=F32)
        image[0, 0, 2, 3] = value
        parts.append(image)
    problems, _ = checks.screen(parts)
    got = [None if p is None else str(p) for p in problems]
    assert got == [_exact(checks, part) for part in parts]
    # Each request on its own (a batch of one: the shortcut's usual case) too.
    for part in parts:
        (alone,), _ = checks.screen([part])
        assert (None if alone is None else str(alone)) == _exact(checks, part)


def test_screen_clears_a_clean_float32_batch_in_one_pass_when_pixel_range_starts_at_zero():
    clean = np.random.default_rng(0).random((3, 1, 4, 4), dtype=F32)
    assert _checks("0,1")._cleared_in_one_pass(clean)
    negative_zero = clean.copy()
    negative_zero[1, 0, 0, 0] = -0.0  # valid, but left to the exact checks
    assert not _checks("0,1")._cleared_in_one_pass(negative_zero)
    assert _checks("0,1").screen([negative_zero])[0] == [None]


@pytest.mark.parametrize("pixel_range", ["0,0.3", "-1,1", "0.5,1"])
def test_screen_uses_only_the_exact_checks_when_the_range_is_not_zero_to_a_float32_value(
    pixel_range,
):
    clean = np.full((2, 1, 4, 4), 0.6 if pixel_range == "0.5,1" else 0.2, dtype=F32)
    assert not _checks(pixel_range)._cleared_in_one_pass(clean)
    assert _checks(pixel_range).screen([clean])[0] == [None]


def test_screen_uses_only_the_exact_checks_when_pixels_are_not_native_float32():
    for dtype in (np.float64, np.float16, np.uint8, np.dtype(">f4")):
        images = np.zeros((2, 1, 4, 4), dtype=dtype)
        assert not _checks("0,1")._cleared_in_one_pass(images)
        assert _checks("0,1").screen([images])[0] == [None]
