"""How faithful is a heatmap? Progressive pixel deletion and insertion (causal metrics).

A map ranks the pixels of an image. *Deletion* replaces the top-ranked pixels by a baseline,
a growing fraction at a time, and records the probability of the class the model predicted
for the untouched image: a faithful map makes it fall fast, so a **lower deletion AUC is
better**. *Insertion* starts from the baseline and puts the top-ranked original pixels back:
the probability should rise fast, so a **higher insertion AUC is better**. (This follows the
causal metrics of Petsiuk et al.'s RISE paper, also used to compare CAM variants.)

Conventions, chosen to be simple and stated once:

- The baseline is a constant, 0.0 by default (the black background of MNIST-like digits),
  or any array broadcastable to the images (for example a blurred copy, as RISE uses for
  insertion). Deletion and insertion use the same baseline argument.
- A "pixel" is one spatial position: every channel at that position changes together.
- Pixels are ranked by decreasing map value; ties keep raster order (stable sort), so a
  map with large flat regions is evaluated deterministically.
- ``steps`` + 1 points at fractions ``0, 1/steps, ..., 1``; step s changes the
  ``round(s * H * W / steps)`` top pixels.
- AUC is the trapezoid rule over the fraction of pixels in [0, 1], so it lies in [0, 1].
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gradtrust.errors import InvalidInputError

Floats = NDArray[np.float64]
PredictProba = Callable[[np.ndarray], np.ndarray]


def _check_inputs(images: ArrayLike, maps: ArrayLike, steps: int) -> tuple[np.ndarray, Floats]:
    x = np.asarray(images)
    m = np.asarray(maps, dtype=np.float64)
    if x.ndim != 4 or x.dtype.kind != "f":
        raise InvalidInputError(
            f"images must be a float array (batch, channels, height, width), got {x.dtype} "
            f"{x.shape}; convert integer pixels to the float scale the model expects"
        )
    if m.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise InvalidInputError(
            f"maps must have shape {(x.shape[0], x.shape[2], x.shape[3])} (one per image), "
            f"got {m.shape}"
        )
    if not np.isfinite(m).all():
        raise InvalidInputError("maps hold NaN or infinite values; rank pixels by finite values")
    try:
        valid = not isinstance(steps, bool) and operator.index(steps) >= 1
    except TypeError:
        valid = False
    if not valid:
        raise InvalidInputError(f"steps must be a positive integer, got {steps!r}")
    return x, m


def _probabilities(predict_proba: PredictProba, batch: np.ndarray) -> Floats:
    probs = np.asarray(predict_proba(batch), dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != batch.shape[0]:
        raise InvalidInputError(
            f"predict_proba must return (batch, classes) probabilities for {batch.shape[0]} "
            f"images, got shape {probs.shape}"
        )
    return probs


def _curve(
    predict_proba: PredictProba,
    images: ArrayLike,
    maps: ArrayLike,
    steps: int,
    baseline: float | ArrayLike,
    batch_size: int,
    insert: bool,
) -> Floats:
    x, m = _check_inputs(images, maps, steps)
    steps = operator.index(steps)
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    n, _, height, width = x.shape
    base = np.broadcast_to(np.asarray(baseline, dtype=x.dtype), x.shape)
    pixels = height * width
    # rank[i, pixel] = position of that pixel in image i's order (0 = highest map value).
    order = np.argsort(-m.reshape(n, pixels), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(pixels)[None, :], axis=1)
    counts = np.rint(np.linspace(0, pixels, steps + 1)).astype(np.intp)
    predicted = np.concatenate(
        [
            np.argmax(_probabilities(predict_proba, x[i : i + batch_size]), axis=1)
            for i in range(0, n, batch_size)
        ]
    ).astype(np.intp)

    curve = np.empty((n, steps + 1))
    per_chunk = max(1, batch_size // (steps + 1))
    for i in range(0, n, per_chunk):
        j = min(n, i + per_chunk)
        # changed[b, s, pixel]: pixel is among the top counts[s] of image b.
        changed = rank[i:j, None, :] < counts[None, :, None]
        changed = changed.reshape(j - i, steps + 1, 1, height, width)
        original = x[i:j, None]
        start = base[i:j, None]
        perturbed = (
            np.where(changed, original, start) if insert else np.where(changed, start, original)
        )
        flat = perturbed.reshape((j - i) * (steps + 1), *x.shape[1:])
        probs = np.concatenate(
            [
                _probabilities(predict_proba, flat[k : k + batch_size])
                for k in range(0, flat.shape[0], batch_size)
            ]
        ).reshape(j - i, steps + 1, -1)
        curve[i:j] = np.take_along_axis(probs, predicted[i:j, None, None], axis=2)[..., 0]
    return curve


def deletion_curve(
    predict_proba: PredictProba,
    images: ArrayLike,
    maps: ArrayLike,
    steps: int = 28,
    baseline: float | ArrayLike = 0.0,
    batch_size: int = 1024,
) -> Floats:
    """Probability of the originally predicted class as the top pixels are set to ``baseline``.

    ``predict_proba`` maps float images (M, channels, H, W) to probabilities (M, C); it is
    called on at most ``batch_size`` images at a time. Returns (N, steps + 1), column s
    after removing the fraction s / steps of the pixels. Lower area = more faithful map.
    """
    return _curve(predict_proba, images, maps, steps, baseline, batch_size, insert=False)


def insertion_curve(
    predict_proba: PredictProba,
    images: ArrayLike,
    maps: ArrayLike,
    steps: int = 28,
    baseline: float | ArrayLike = 0.0,
    batch_size: int = 1024,
) -> Floats:
    """Probability of the originally predicted class as top pixels are restored from ``baseline``.

    Same arguments and shape as :func:`deletion_curve`; column 0 is the baseline image,
    the last column the original. Higher area = more faithful map.
    """
    return _curve(predict_proba, images, maps, steps, baseline, batch_size, insert=True)


def auc(curve: ArrayLike) -> Floats:
    """Area under curves (..., S + 1) sampled at fractions 0, 1/S, ..., 1: trapezoid rule, (...)."""
    y = np.asarray(curve, dtype=np.float64)
    if y.ndim < 1 or y.shape[-1] < 2:
        raise InvalidInputError(f"a curve needs at least 2 points on its last axis, got {y.shape}")
    segments = y.shape[-1] - 1
    area: Floats = (y.sum(axis=-1) - 0.5 * (y[..., 0] + y[..., -1])) / segments
    return area
