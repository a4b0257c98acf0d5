"""Turn a trust score into P(correct), and pick a low-trust threshold that means something.

A raw GradTrust of 4.2 says nothing by itself; "about 93 % of predictions like this one
were right" does. :class:`TrustCalibration` holds a monotone (isotonic) map from each
score to the probability that the prediction is correct, fitted on a labelled
calibration split, plus the low-trust threshold chosen on the same split for a stated
target. It is stored as plain JSON and applied with ``np.interp``: the server needs
numpy only (no scikit-learn).

JSON format (``trust_calibration.json`` in a model-repository entry)::

    {
      "format": "gradtrust-trust-calibration", "version": 1,
      "score": "gradtrust",                      # the score the threshold applies to
      "maps": {"gradtrust": {"x": [...], "y": [...]}, "msp": {...}, ...},
      "low_trust_threshold": 2.71,               # low trust = score < threshold
      "target": {"kind": "flag_rate", "value": 0.1},   # or "error_recall"
      "achieved_on_calibration": 0.098,
      "fitted_on": {"samples": 5500, "wrong": 742, "data": "..."}
    }

``x`` is strictly increasing, ``y`` non-decreasing in [0, 1]; a value v maps to
``np.interp(v, x, y)`` (flat beyond both ends).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.evaluation.metrics import ece

Floats = NDArray[np.float64]

FORMAT = "gradtrust-trust-calibration"
VERSION = 1
FILENAME = "trust_calibration.json"
TargetKind = Literal["flag_rate", "error_recall"]
TARGET_KINDS: tuple[TargetKind, ...] = ("flag_rate", "error_recall")
TOLERANCE_SIGMAS = 3.0
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


@dataclass(frozen=True)
class IsotonicMap:
    """A monotone map score -> P(correct), applied as ``np.interp(v, x, y)``."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    def __post_init__(self) -> None:
        xs, ys = np.asarray(self.x, dtype=np.float64), np.asarray(self.y, dtype=np.float64)
        if xs.ndim != 1 or xs.size == 0 or xs.size != ys.size:
            raise ConfigError("a calibration map needs equally long, non-empty x and y lists")
        if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
            raise ConfigError("a calibration map holds non-finite breakpoints: re-run calibrate")
        if (np.diff(xs) <= 0).any() or (np.diff(ys) < 0).any():
            raise ConfigError(
                "a calibration map needs strictly increasing x and non-decreasing y: "
                "re-run `gradtrust calibrate` instead of editing the file"
            )
        if (ys < 0).any() or (ys > 1).any():
            raise ConfigError("calibration map values must be probabilities in [0, 1]")

    @classmethod
    def fit(cls, scores: ArrayLike, correct: ArrayLike) -> IsotonicMap:
        """Isotonic regression of the 0/1 correctness on the score."""
        xs, ys = isotonic_breakpoints(scores, np.asarray(correct, dtype=np.float64))
        return cls(tuple(float(v) for v in xs), tuple(float(v) for v in np.clip(ys, 0.0, 1.0)))

    def __call__(self, values: ArrayLike) -> Floats:
        """P(correct) per value, float64, same shape as ``values``; NaN stays NaN."""
        v = np.asarray(values, dtype=np.float64)
        return np.interp(v, np.asarray(self.x), np.asarray(self.y))

    def to_dict(self) -> dict[str, list[float]]:
        return {"x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IsotonicMap:
        try:
            return cls(tuple(float(v) for v in data["x"]), tuple(float(v) for v in data["y"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"a calibration map needs numeric 'x' and 'y' lists ({exc})") from exc


@dataclass(frozen=True)
class ThresholdTarget:
    """What the low-trust threshold promises: flag at most ``value`` of the traffic
    (``flag_rate``), or catch at least ``value`` of the errors (``error_recall``)."""

    kind: TargetKind
    value: float

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise InvalidInputError(f"target kind must be one of {TARGET_KINDS}, got {self.kind!r}")
        if not 0.0 < self.value < 1.0:
            raise InvalidInputError(f"target value must be a fraction in (0, 1), got {self.value}")

    @classmethod
    def parse(cls, text: str) -> ThresholdTarget:
        """Read ``flag-rate=0.1`` or ``error-recall=0.8`` (a percentage like 10% works too)."""
        kind, sep, value = text.partition("=")
        kind = kind.strip().replace("-", "_")
        if not sep or kind not in TARGET_KINDS:
            raise InvalidInputError(
                f"cannot read target {text!r}: write flag-rate=0.1 (flag at most 10 % of "
                "traffic) or error-recall=0.8 (catch at least 80 % of errors)"
            )
        value = value.strip()
        try:
            number = float(value[:-1]) / 100.0 if value.endswith("%") else float(value)
        except ValueError as exc:
            raise InvalidInputError(f"target value {value!r} is not a number") from exc
        return cls(cast(TargetKind, kind), number)

    def __str__(self) -> str:
        verb = "flag at most" if self.kind == "flag_rate" else "catch at least"
        noun = "of traffic" if self.kind == "flag_rate" else "of errors"
        return f"{verb} {100 * self.value:g} % {noun}"


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
class TrustCalibration:
    """Isotonic maps score -> P(correct) and the chosen low-trust threshold for ``score``."""

    maps: Mapping[str, IsotonicMap]
    low_trust_threshold: float
    target: ThresholdTarget
    achieved_on_calibration: float
    score: str = "gradtrust"
    fitted_on: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score not in self.maps:
            raise ConfigError(f"calibration has no map for its threshold score {self.score!r}")
        if not math.isfinite(self.low_trust_threshold):
            raise ConfigError("calibration low_trust_threshold must be a finite number")

    @classmethod
    def fit(
        cls,
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
        maps = {name: IsotonicMap.fit(values, c) for name, values in scores.items()}
        threshold = choose_threshold(scores[score], c, target)
        return cls(
            maps=maps,
            low_trust_threshold=threshold,
            target=target,
            achieved_on_calibration=achieved(scores[score], c, threshold, target.kind),
            score=score,
            fitted_on={"samples": int(c.size), "wrong": int(np.count_nonzero(~c)), "data": data},
        )

    def apply(self, gradtrust: ArrayLike) -> Floats:
        """TRUST_PROB: P(correct) for each value of the threshold score (float64, same shape)."""
        return self.maps[self.score](gradtrust)

    def apply_score(self, name: str, values: ArrayLike) -> Floats:
        """P(correct) from another calibrated score (``maps`` lists which)."""
        if name not in self.maps:
            raise InvalidInputError(f"no calibration map for {name!r}; have {sorted(self.maps)}")
        return self.maps[name](values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "score": self.score,
            "maps": {name: m.to_dict() for name, m in self.maps.items()},
            "low_trust_threshold": self.low_trust_threshold,
            "target": {"kind": self.target.kind, "value": self.target.value},
            "achieved_on_calibration": self.achieved_on_calibration,
            "fitted_on": dict(self.fitted_on),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrustCalibration:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ConfigError(
                f"not a {FORMAT} version {VERSION} file (format={data.get('format')!r}, "
                f"version={data.get('version')!r}): re-run `gradtrust calibrate`"
            )
        try:
            target = ThresholdTarget(data["target"]["kind"], float(data["target"]["value"]))
            return cls(
                maps={name: IsotonicMap.from_dict(m) for name, m in data["maps"].items()},
                low_trust_threshold=float(data["low_trust_threshold"]),
                target=target,
                achieved_on_calibration=float(data.get("achieved_on_calibration", math.nan)),
                score=str(data.get("score", "gradtrust")),
                fitted_on=dict(data.get("fitted_on", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"malformed trust calibration ({exc!r}): re-run calibrate") from exc

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the calibration as indented JSON (NaN-free: unknown values become null)."""
        text = json.dumps(_nan_to_none(self.to_dict()), indent=2, allow_nan=False)
        Path(path).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> TrustCalibration:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read trust calibration {path}: {exc}") from exc
        if isinstance(data.get("achieved_on_calibration"), type(None)):
            data["achieved_on_calibration"] = math.nan
        return cls.from_dict(data)


def load_model_calibration(entry: str | os.PathLike[str]) -> TrustCalibration | None:
    """The calibration of a model-repository entry (``<entry>/trust_calibration.json``), or
    None when the entry has none. A file that exists but is invalid raises ConfigError."""
    path = Path(entry) / FILENAME
    return TrustCalibration.from_json(path) if path.is_file() else None


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


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
