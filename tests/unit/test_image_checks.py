"""Specification of gradtrust.serving.checks: the checks of IMAGE before the forward pass."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrust.errors import InvalidInputError
from gradtrust.serving.checks import ImageChecks
from gradtrust.serving.settings import ModelSettings

LABELS = [str(i) for i in range(10)]


def _checks(**params: str) -> ImageChecks:
    settings = ModelSettings.from_parameters({"pixel_range": "0,1", **params}, LABELS)
    return ImageChecks(settings, (1, 4, 4), "NCHW")


def _images(n: int, value: float = 0.5) -> np.ndarray:
    return np.full((n, 1, 4, 4), value, dtype=np.float32)


def test_screen_joins_the_batch_and_finds_no_problem_when_every_request_is_clean():
    parts = [_images(1), _images(2), _images(1)]
    problems, joined = _checks().screen(parts)
    assert problems == [None, None, None]
    assert joined is not None and joined.shape == (4, 1, 4, 4)


def test_screen_names_each_requests_own_samples_when_several_requests_fail():
    nan, bright = _images(3), _images(2)
    nan[2, 0, 1, 1] = np.nan
    bright[0, 0, 0, 0] = 2.0
    problems, _ = _checks().screen([_images(1), nan, bright])
    assert problems[0] is None
    assert isinstance(problems[1], InvalidInputError)
    assert "NaN or Inf pixels in sample(s) [2]" in str(problems[1])
    assert isinstance(problems[2], InvalidInputError)
    assert "outside [0, 1] in sample(s) [0]" in str(problems[2])


def test_screen_checks_each_request_alone_when_image_sizes_differ():
    checks = ImageChecks(
        ModelSettings.from_parameters({"pixel_range": "0,1"}, LABELS), (1, "h", "w"), "NCHW"
    )
    small, large = _images(1), np.full((1, 1, 8, 8), -1.0, dtype=np.float32)
    problems, joined = checks.screen([small, large])
    assert joined is None
    assert problems[0] is None and "outside [0, 1]" in str(problems[1])


def test_check_layout_refuses_a_wrong_shape_naming_the_expected_one_when_dims_differ():
    with pytest.raises(InvalidInputError, match=r"expected \[batch, 1, 4, 4\]"):
        _checks().check_layout(np.zeros((1, 1, 4, 5), np.float32))
