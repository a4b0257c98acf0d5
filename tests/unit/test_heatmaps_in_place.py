"""finish_maps' fast arithmetic (issue 16: upsampling as two matrix products, normalising
in place) gives the maps of the plain per-axis expressions, to rounding, keeps their exact
bounds and zeros, and never writes to the caller's array."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrust.core import heatmaps
from gradtrust.core.heatmaps import _axis, finish_maps, minmax_normalize, upsample_bilinear


def _upsample_reference(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling as ``low + frac * (high - low)`` per axis, new arrays each step."""
    for axis, n_out in ((-2, size[0]), (-1, size[1])):
        along = _axis(m.shape[axis], n_out)
        low = np.take(m, along.low, axis=axis)
        if m.shape[axis] == 1:
            m = low
            continue
        high = np.take(m, np.minimum(along.low + 1, m.shape[axis] - 1), axis=axis)
        frac = along.frac if axis == -1 else along.frac[:, None]
        m = low + frac * (high - low)
    return m


def _finish_reference(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    relu = np.maximum(raw, 0.0)
    up = _upsample_reference(relu, size)
    low = up.min(axis=(-2, -1), keepdims=True)
    span = up.max(axis=(-2, -1), keepdims=True) - low
    flat = (span <= 0) | (relu == relu[..., :1, :1]).all(axis=(-2, -1), keepdims=True)
    return np.where(flat, 0.0, (up - low) / np.where(flat, 1.0, span))


@pytest.mark.parametrize("size", [(224, 224), (28, 28), (37, 19), (7, 7), (1, 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_finish_maps_equals_the_plain_expressions_when_computed_by_matrix_products(size, seed):
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(4, 7, 7)) * rng.choice([1e-6, 1.0, 1e3], size=(4, 1, 1))
    raw[1] = -1.0  # all negative: flat after the ReLU, all zeros
    raw[2] = 0.25  # constant: constant after upsampling only to rounding, still all zeros
    got = finish_maps(raw.copy(), size)
    np.testing.assert_allclose(got, _finish_reference(raw, size), atol=1e-12, rtol=0)
    assert not got[1].any() and not got[2].any()
    for live in (got[0], got[3]):  # min-max after upsampling: exact bounds, both reached
        assert live.min() == 0.0 and live.max() == 1.0


def test_upsample_and_normalize_leave_the_callers_array_untouched_when_given_one():
    maps = np.random.default_rng(2).normal(size=(2, 5, 6))
    before = maps.copy()
    np.testing.assert_allclose(
        upsample_bilinear(maps, (11, 13)), _upsample_reference(maps, (11, 13)), atol=1e-12
    )
    minmax_normalize(maps)
    heatmaps.finish_maps(maps, (9, 9))
    np.testing.assert_array_equal(maps, before)
