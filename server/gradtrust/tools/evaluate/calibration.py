"""Fitting a trust calibration (the file format and applying it live in
:mod:`gradtrust.core.calibration`, which is all the server needs)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gradtrust.core.calibration import IsotonicMap, TargetKind, ThresholdTarget, TrustCalibration
from gradtrust.errors import InvalidInputError
from gradtrust.tools.evaluate.metrics import ece

Floats = NDArray[np.float64]

TOLERANCE_SIGMAS = 3.0
"""Held-out tolerance of a threshold target, in binomial standard errors (see :func:`tolerance`)."""

"""Held-out tolerance of a threshold target, in binomial standard errors (see :func:`tolerance`)."""


def isotonic_breakpoints(
    x: ArrayLike, y: ArrayLike, weights: ArrayLike | None = None
) -> tuple[Floats, Floats]:
    """Least-squares non-decreasing fit of y on x (pool-adjacent-violators).

    Samples with equal x are pooled first (they must get one value). Returns the
    breakpoints (xs strictly increasing, ys non-decreasing): each pooled block
    contributes its lowest and highest x at the block's weighted mean.
    """
    xv = np.asarray(x, dtype=np.float64).ravel()
    yv = np.asarray(y, dtype=np.float64).ravel()
    wv = np.ones_like(xv) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not (xv.size == yv.size == wv.size) or xv.size == 0:
        raise InvalidInputError(
            f"isotonic fit needs equally long, non-empty x, y and weights; got sizes "
            f"{xv.size}, {yv.size}, {wv.size}"
        )
    if not (np.isfinite(xv).all() and np.isfinite(yv).all() and (wv > 0).all()):
        raise InvalidInputError("isotonic fit needs finite x and y and positive weights")
    order = np.argsort(xv, kind="stable")
    xv, yv, wv = xv[order], yv[order], wv[order]
    uniq, starts = np.unique(xv, return_index=True)
    w_sum = np.add.reduceat(wv, starts)
    wy_sum = np.add.reduceat(wv * yv, starts)
    # Stack of blocks [mean, weight, lowest x, highest x]; merge while not increasing.
    blocks: list[list[float]] = []
    for xi, wi, wyi in zip(uniq, w_sum, wy_sum, strict=True):
        mean, weight, lo = wyi / wi, float(wi), float(xi)
        while blocks and blocks[-1][0] >= mean:
            prev_mean, prev_weight, prev_lo, _ = blocks.pop()
            mean = (prev_mean * prev_weight + mean * weight) / (prev_weight + weight)
            weight += prev_weight
            lo = prev_lo
        blocks.append([float(mean), weight, lo, float(xi)])
    xs: list[float] = []
    ys: list[float] = []
    for mean, _, lo, hi in blocks:
        xs.append(lo)
        ys.append(mean)
        if hi > lo:
            xs.append(hi)
            ys.append(mean)
    return np.asarray(xs), np.asarray(ys)


def fit_isotonic(scores: ArrayLike, correct: ArrayLike) -> IsotonicMap:
    """Isotonic regression of the 0/1 correctness on the score."""
    xs, ys = isotonic_breakpoints(scores, np.asarray(correct, dtype=np.float64))
    return IsotonicMap(tuple(float(v) for v in xs), tuple(float(v) for v in np.clip(ys, 0.0, 1.0)))


def fit_calibration(
    scores: Mapping[str, ArrayLike],
    correct: ArrayLike,
    target: ThresholdTarget,
    score: str = "gradtrust",
    data: str = "",
) -> TrustCalibration:
    """Fit one isotonic map per score and the threshold of ``score`` for ``target``."""
    if score not in scores:
        raise InvalidInputError(f"cannot calibrate {score!r}: it is not among {list(scores)}")
    c = np.asarray(correct).astype(bool)
    maps = {name: fit_isotonic(values, c) for name, values in scores.items()}
    threshold = choose_threshold(scores[score], c, target)
    return TrustCalibration(
        maps=maps,
        low_trust_threshold=threshold,
        target=target,
        achieved_on_calibration=achieved(scores[score], c, threshold, target.kind),
        score=score,
        fitted_on={"samples": int(c.size), "wrong": int(np.count_nonzero(~c)), "data": data},
    )


def achieved(scores: ArrayLike, correct: ArrayLike, threshold: float, kind: TargetKind) -> float:
    """The flag rate (share of all samples with score < threshold) or the error recall
    (share of wrong predictions with score < threshold); nan for recall with no errors."""
    s = np.asarray(scores, dtype=np.float64)
    flagged = s < threshold
    if kind == "flag_rate":
        return float(np.mean(flagged))
    wrong = ~np.asarray(correct).astype(bool)
    return float(np.mean(flagged[wrong])) if wrong.any() else math.nan


def choose_threshold(scores: ArrayLike, correct: ArrayLike, target: ThresholdTarget) -> float:
    """The threshold (low trust = score < threshold) that meets ``target`` on these samples.

    flag_rate X: the highest threshold flagging at most X of the samples. error_recall Y:
    the lowest threshold flagging at least Y of the wrong predictions. The threshold is
    put midway between neighbouring observed values, so it generalises symmetrically.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    c = np.asarray(correct).astype(bool).ravel()
    if s.size == 0 or s.size != c.size or not np.isfinite(s).all():
        raise InvalidInputError("choose_threshold needs finite scores and one label per score")
    values = np.unique(s)
    below = np.searchsorted(np.sort(s), values, side="left")  # #(s < value) per value
    if target.kind == "flag_rate":
        allowed = np.flatnonzero(below <= target.value * s.size + 1e-9)
        i = int(allowed[-1])  # below[0] == 0, so there is always one
        return float(values[0]) if i == 0 else float((values[i - 1] + values[i]) / 2.0)
    wrong = np.sort(s[~c])
    if wrong.size == 0:
        raise InvalidInputError(
            "an error-recall target needs wrong predictions in the calibration data; "
            "use a flag-rate target or harder calibration data (e.g. --shift-mix)"
        )
    need = int(np.ceil(np.round(target.value * wrong.size, 9)))
    last = wrong[need - 1]  # flag every sample <= last
    higher = values[values > last]
    return float((last + higher[0]) / 2.0) if higher.size else float(np.nextafter(last, np.inf))


def tolerance(target: ThresholdTarget, n_calibration: int, n_heldout: int) -> float:
    """How far a held-out rate may stray from the target by sampling alone.

    ``3 * sqrt(v (1 - v) (1/n_cal + 1/n_held))``: three binomial standard errors of the
    difference of two independent estimates of a rate v. For flag_rate the n are sample
    counts, for error_recall the counts of wrong predictions.
    """
    if n_calibration < 1 or n_heldout < 1:
        return math.inf
    v = target.value
    return TOLERANCE_SIGMAS * math.sqrt(v * (1 - v) * (1 / n_calibration + 1 / n_heldout))


@dataclass(frozen=True)
class HeldOutCheck:
    """A calibration judged on data it was not fitted on (what the round-trip test asserts)."""

    ece_trust_prob: float
    ece_confidence: float
    achieved: float
    target: ThresholdTarget
    tolerance: float

    @property
    def ece_improved(self) -> bool:
        return self.ece_trust_prob < self.ece_confidence

    @property
    def target_met(self) -> bool:
        """flag_rate: at most target + tolerance; error_recall: at least target - tolerance."""
        if self.target.kind == "flag_rate":
            return self.achieved <= self.target.value + self.tolerance
        return self.achieved >= self.target.value - self.tolerance

    @property
    def passed(self) -> bool:
        return self.ece_improved and self.target_met


def check_heldout(
    calibration: TrustCalibration,
    gradtrust: ArrayLike,
    confidence: ArrayLike,
    correct: ArrayLike,
    trust_prob: ArrayLike | None = None,
) -> HeldOutCheck:
    """Judge ``calibration`` on held-out samples.

    Pass the served ``TRUST_PROB`` as ``trust_prob`` to check the server; without it the
    map is applied here. ``confidence`` is the softmax confidence (MSP) it must beat.
    """
    g = np.asarray(gradtrust, dtype=np.float64).ravel()
    c = np.asarray(correct).astype(bool).ravel()
    prob = calibration.apply(g) if trust_prob is None else np.asarray(trust_prob).ravel()
    target = calibration.target
    fitted = calibration.fitted_on
    if target.kind == "flag_rate":
        n_cal, n_held = int(fitted.get("samples", 0)), int(c.size)
    else:
        n_cal, n_held = int(fitted.get("wrong", 0)), int(np.count_nonzero(~c))
    return HeldOutCheck(
        ece_trust_prob=ece(prob, c),
        ece_confidence=ece(np.asarray(confidence, dtype=np.float64).ravel(), c),
        achieved=achieved(g, c, calibration.low_trust_threshold, target.kind),
        target=target,
        tolerance=tolerance(target, n_cal, n_held),
    )
