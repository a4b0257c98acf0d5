"""The trust calibration of a model entry: what ``TRUST_PROB`` is, stored and applied.

``TRUST_PROB`` is the probability that a prediction is right, fitted by ``gradtrust
calibrate`` (:mod:`gradtrust.tools.evaluate.calibration`) on the user's labelled data. It is
a function of one *signal*, chosen there as the one that ranked the errors best on a
held-out part of that data:

- one input: a score of :mod:`gradtrust.core.scores` or a last-layer gradient feature of
  :mod:`gradtrust.core.trust_features`, as it is; or
- a combination: an L2-regularised logistic regression over several inputs, each first
  put on a common scale (:class:`InputScaling`), so that a heavy-tailed input cannot
  dominate the weights.

The signal is mapped to a probability by a *centred isotonic* map with Laplace smoothing
(see :class:`ProbabilityMap`): monotone, piecewise linear between the centres of the
isotonic blocks, and strictly inside (0, 1). Everything here is numpy: the server applies
a calibration with ``np.interp`` and a dot product, O(C) per sample after the forward pass.

JSON (``trust_calibration.json`` in a model-repository entry), version 2::

    {
      "format": "gradtrust-trust-calibration", "version": 2,
      "signal": {"kind": "input", "inputs": ["msp"]}
             or {"kind": "combination", "inputs": [...], "transforms": [{"center": 0.8,
                 "scale": 1.3}, ...], "coef": [...], "intercept": -1.2, "l2": 1.0},
      "contrast_k": 3,
      "map": {"x": [...], "y": [...],           # signal -> TRUST_PROB
              "tail_widths": [0.4, 0.002]},     # optional: the tails' scales
      "low_trust_threshold": 0.62,              # low trust = TRUST_PROB < threshold
      "target": {"kind": "flag_rate", "value": 0.05},
      "achieved_on_calibration": 0.049,
      "fitted_on": {"samples": 25500, "wrong": 3110, "data": "..."},
      "selection": {...},                       # how the signal was chosen (informational)
      "probe": {"logits": [[...]], "features": [[...]] or null, "values": {input: [...]}},
      "heldout_ece": {"clean": {"trust_prob": 0.02, "confidence": 0.03}, ...}  # optional
    }

The probe holds a few calibration samples and the inputs computed from them when the
file was written; loading recomputes them, so a file fitted under other score definitions
is refused (re-run calibrate) instead of silently serving a wrong TRUST_PROB.

Version 1 files (an unsmoothed isotonic map of the released-code GradTrust, whose values
reached exactly 0 and 1) are refused with a message to re-run ``gradtrust calibrate``: the
score they were fitted on is no longer the served ``GRADTRUST``.
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

from gradtrust.core import scores as score_functions
from gradtrust.core import trust_features
from gradtrust.errors import ConfigError, InvalidInputError

Floats = NDArray[np.float64]

FORMAT = "gradtrust-trust-calibration"
VERSION = 2
FILENAME = "trust_calibration.json"
TargetKind = Literal["flag_rate", "error_recall"]
TARGET_KINDS: tuple[TargetKind, ...] = ("flag_rate", "error_recall")
SignalKind = Literal["input", "combination"]
SIGNAL_KINDS: tuple[SignalKind, ...] = ("input", "combination")
PROBABILITY_FLOOR = 1e-6
"""TRUST_PROB is kept in [floor, 1 - floor]. The map's own values already lie strictly
inside (0, 1) by Laplace smoothing; this guard only keeps them distinct from 0 and 1 after
the server's cast to float32 (whose spacing just below 1 is 6e-8)."""

TAIL_SHARE = 0.01
"""Beyond its outer knots the map moves towards 1 (or 0) by at most this share of the
distance left: strictly monotone everywhere, without claiming more than the data showed."""


def _floats(values: Any, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"calibration {what} must be a list of numbers ({exc})") from exc
    if not out or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"calibration {what} must be a non-empty list of finite numbers")
    return out


def _knots(x: tuple[float, ...], y: tuple[float, ...], what: str, strict_y: bool) -> None:
    xs, ys = np.asarray(x), np.asarray(y)
    if xs.size != ys.size:
        raise ConfigError(f"calibration {what} needs equally long x and y lists")
    dy = np.diff(ys)
    if (np.diff(xs) <= 0).any() or (dy <= 0 if strict_y else dy < 0).any():
        raise ConfigError(
            f"calibration {what} needs increasing knots: re-run `gradtrust calibrate` "
            "instead of editing the file"
        )


@dataclass(frozen=True)
class ProbabilityMap:
    """A monotone map signal -> P(correct), applied as ``np.interp(v, x, y)``.

    Why this form: the fit (:func:`gradtrust.tools.evaluate.calibration.fit_probability_map`)
    is isotonic regression with a minimum block size, each block's accuracy smoothed as
    ``(right + 1) / (n + 2)`` (Laplace), with one knot per block at its mean signal. A
    nonparametric map follows any monotone signal (no assumption that the log-odds are
    linear in it, which a Platt fit needs); the minimum block size bounds the variance of
    every level, the smoothing keeps every level strictly inside (0, 1) (a block of 50
    right answers says "about 98 %", not "certainly"), and interpolating between block
    centres rather than holding each level flat leaves fewer ties for the low-trust
    threshold to split. Beyond the outer knots the map keeps rising, by at most
    :data:`TAIL_SHARE` of the remaining distance to 1 (falling, of the distance to 0 below
    the first knot), exponentially in units of how far the calibration signal reached beyond
    that knot (``tail_widths``; the mean knot spacing in files without them): a flat tail would tie
    every prediction more confident than the top block's centre, which for a confidently
    wrong model under shift is where right and wrong answers have to be told apart (served
    as float32, the tie costs ranking that softmax confidence keeps). The levels move by at
    most 1 % of the error rate they state, well inside their own sampling noise.
    """

    x: tuple[float, ...]
    y: tuple[float, ...]
    #: The tails' scales below the first and above the last knot: how far the calibration
    #: signal reached beyond them (None: the mean knot spacing). Fitted to the data, so the
    #: tail resolves the values it will meet as finely as the signal itself.
    tail_widths: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _knots(self.x, self.y, "map", strict_y=False)
        if self.tail_widths is not None and not (
            len(self.tail_widths) == 2 and all(math.isfinite(w) and w > 0 for w in self.tail_widths)
        ):
            raise ConfigError(
                "calibration map tail_widths must be two positive numbers: re-run "
                "`gradtrust calibrate`"
            )
        if min(self.y) <= 0.0 or max(self.y) >= 1.0:
            raise ConfigError(
                "calibration map values must lie strictly between 0 and 1: re-run "
                "`gradtrust calibrate`"
            )

    def __call__(self, values: ArrayLike) -> Floats:
        """P(correct) per value, float64, same shape; NaN stays NaN."""
        v = np.asarray(values, dtype=np.float64)
        x0, x1, y0, y1 = self.x[0], self.x[-1], self.y[0], self.y[-1]
        spacing = (x1 - x0) / (len(self.x) - 1) if len(self.x) > 1 else 1.0
        low, high = self.tail_widths or (spacing, spacing)
        with np.errstate(invalid="ignore", over="ignore"):
            rise = -np.expm1(-np.maximum(v - x1, 0.0) / high)  # 0 at the knot, -> 1
            fall = -np.expm1(-np.maximum(x0 - v, 0.0) / low)
        p = np.interp(v, self.x, self.y)
        p = np.where(v > x1, y1 + (1.0 - y1) * TAIL_SHARE * rise, p)
        p = np.where(v < x0, y0 - y0 * TAIL_SHARE * fall, p)
        return np.clip(p, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)

    def to_dict(self) -> dict[str, list[float]]:
        out = {"x": list(self.x), "y": list(self.y)}
        if self.tail_widths is not None:
            out["tail_widths"] = list(self.tail_widths)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbabilityMap:
        widths = data.get("tail_widths")
        tail = None if widths is None else _floats(widths, "map tail_widths")
        return cls(
            _floats(data.get("x"), "map x"),
            _floats(data.get("y"), "map y"),
            None if tail is None else cast(tuple[float, float], tail),
        )


@dataclass(frozen=True)
class InputScaling:
    """How a combination puts one input on a common scale: ``(asinh(v) - center) / scale``.

    asinh is a logarithm for large magnitudes and linear near 0, for either sign, so
    probabilities, log-ratios and raw logits (or a ratio near the float64 maximum) all end
    up on comparable scales before the weights are fitted; ``center`` and ``scale`` are the
    median and standard deviation of asinh(v) on the calibration data.
    """

    center: float
    scale: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.center) and math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError("an input scaling needs a finite center and a positive scale")

    def __call__(self, values: ArrayLike) -> Floats:
        return (np.arcsinh(np.asarray(values, dtype=np.float64)) - self.center) / self.scale

    def to_dict(self) -> dict[str, float]:
        return {"center": self.center, "scale": self.scale}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputScaling:
        return cls(float(data["center"]), float(data["scale"]))


def input_names(num_classes: int, contrast_k: int, has_features: bool) -> tuple[str, ...]:
    """Every input a signal may use for this model: the scores, then the gradient features."""
    names = [n for n in score_functions.SCORE_NAMES if has_features or not _score_needs_h(n)]
    return (*names, *trust_features.feature_names(num_classes, contrast_k, has_features))


def _score_needs_h(name: str) -> bool:
    return name in score_functions.NEEDS_FEATURES


def input_needs_features(name: str) -> bool:
    """Whether an input needs the penultimate features ``h``."""
    if name in score_functions.SCORE_NAMES:
        return _score_needs_h(name)
    return trust_features.needs_features(name)


def _is_input_name(name: str) -> bool:
    if name in score_functions.SCORE_NAMES:
        return True
    for prefix in ("cf_ratio_", "cf_grad_norm_"):
        if name.startswith(prefix):
            return name[len(prefix) :].isdigit() and int(name[len(prefix) :]) >= 1
    return name in (*trust_features.RATIO_FEATURES, *trust_features.NORM_FEATURES)


def compute_inputs(
    logits: ArrayLike,
    names: tuple[str, ...],
    features: ArrayLike | None = None,
    contrast_k: int = 3,
    known: Mapping[str, ArrayLike] | None = None,
) -> dict[str, Floats]:
    """The named inputs (scores and gradient features) of each sample, float64, validated
    once by :func:`gradtrust.core.scores.compute_scores`.

    ``known``: inputs the caller already computed from these same logits (and features),
    ``{name: (N,) values}``, used as they are; only the other names are computed. Why: the
    server computes GRADTRUST and msp for every batch anyway, and a calibration that
    uses them should not compute them a second time. When every name is known, the
    logits are not read (nor validated) at all.
    """
    given = {} if known is None else known
    out: dict[str, Floats] = {
        n: np.asarray(given[n], dtype=np.float64) for n in names if n in given
    }
    missing = [n for n in names if n not in out]
    if missing:
        score_names = [n for n in missing if n in score_functions.SCORE_NAMES]
        z = score_functions.as_logits(logits)
        out.update(score_functions.compute_scores(z, score_names, features, contrast_k))
        rest = [n for n in missing if n not in out]
        if rest:
            out.update(trust_features.compute_gradient_features(z, rest, features, contrast_k))
    return {name: out[name] for name in names}


@dataclass(frozen=True)
class Signal:
    """What TRUST_PROB is a monotone function of: one input as it is (``kind="input"``), or
    ``intercept + sum_i coef_i * transform_i(input_i)`` (``kind="combination"``, the
    log-odds of an L2-regularised logistic regression)."""

    kind: SignalKind
    inputs: tuple[str, ...]
    transforms: tuple[InputScaling, ...] = ()
    coef: tuple[float, ...] = ()
    intercept: float = 0.0
    l2: float = 0.0
    #: The candidate's name when it is not the default (``msp+feature_norm``, a pair).
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SIGNAL_KINDS:
            raise ConfigError(f"signal kind must be one of {SIGNAL_KINDS}, got {self.kind!r}")
        unknown = [n for n in self.inputs if not _is_input_name(n)]
        if not self.inputs or unknown:
            raise ConfigError(
                f"calibration signal uses unknown input(s) {unknown or '(none)'}: it was made "
                "by another version; re-run `gradtrust calibrate`"
            )
        if self.kind == "input" and len(self.inputs) != 1:
            raise ConfigError("an 'input' signal has exactly one input")
        if self.kind == "combination" and not (
            len(self.transforms) == len(self.coef) == len(self.inputs)
            and all(math.isfinite(v) for v in (*self.coef, self.intercept))
        ):
            raise ConfigError(
                "a combination signal needs one transform and one finite coefficient per input"
            )

    @property
    def name(self) -> str:
        """The input's name, the label, or ``"combination"``."""
        return self.label or (self.inputs[0] if self.kind == "input" else "combination")

    @property
    def needs_features(self) -> bool:
        return any(input_needs_features(n) for n in self.inputs)

    def __call__(self, inputs: Mapping[str, ArrayLike]) -> Floats:
        """The signal from ``{input name: (N,) values}``."""
        if self.kind == "input":
            return np.asarray(inputs[self.inputs[0]], dtype=np.float64)
        # One arcsinh over all inputs at once: InputScaling per column, folded into the
        # weights (coef / scale) and the intercept (- coef * center / scale).
        x = np.arcsinh(np.stack([np.asarray(inputs[n], np.float64) for n in self.inputs], 1))
        center = np.array([t.center for t in self.transforms])
        weight = np.asarray(self.coef) / np.array([t.scale for t in self.transforms])
        return (self.intercept - float(center @ weight)) + x @ weight

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "inputs": list(self.inputs)}
        if self.label:
            data["label"] = self.label
        if self.kind == "combination":
            data |= {
                "transforms": [t.to_dict() for t in self.transforms],
                "coef": list(self.coef),
                "intercept": self.intercept,
                "l2": self.l2,
            }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signal:
        kind = str(data.get("kind"))
        inputs = tuple(str(n) for n in data.get("inputs", ()))
        if kind != "combination":
            return cls(cast(SignalKind, kind), inputs)
        return cls(
            "combination",
            inputs,
            tuple(InputScaling.from_dict(t) for t in data.get("transforms", ())),
            _floats(data.get("coef"), "coef"),
            float(data.get("intercept", math.nan)),
            float(data.get("l2", 0.0)),
            str(data.get("label", "")),
        )


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


@dataclass(frozen=True)
class TrustCalibration:
    """TRUST_PROB = ``map(signal(inputs))``, and the low-trust threshold on TRUST_PROB."""

    signal: Signal
    map: ProbabilityMap
    low_trust_threshold: float
    target: ThresholdTarget
    achieved_on_calibration: float
    contrast_k: int = 3
    fitted_on: Mapping[str, Any] = field(default_factory=dict)
    selection: Mapping[str, Any] = field(default_factory=dict)
    #: A few calibration samples' logits (and features) with the signal inputs computed
    #: from them at fit time: :meth:`check_probe` recomputes them on load, so a file fitted
    #: with other score definitions is refused instead of serving a wrong TRUST_PROB.
    probe: Mapping[str, Any] = field(default_factory=dict)
    #: ECE of TRUST_PROB and of softmax confidence on each held-out part calibrate judged
    #: it on, ``{part: {"trust_prob": e, "confidence": e}}`` (empty in files written before
    #: it was recorded). Kept so that the server can say, in its log and its metrics, where
    #: CONFIDENCE was the better probability (:meth:`less_calibrated_parts`).
    heldout_ece: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.low_trust_threshold <= 1.0:
            raise ConfigError(
                "calibration low_trust_threshold is a TRUST_PROB value and must lie in [0, 1], "
                f"got {self.low_trust_threshold!r}"
            )
        if int(self.contrast_k) < 1:
            raise ConfigError(f"calibration contrast_k must be >= 1, got {self.contrast_k}")

    @property
    def needs_features(self) -> bool:
        """Whether applying it needs the model's penultimate features."""
        return self.signal.needs_features

    def less_calibrated_parts(self) -> tuple[str, ...]:
        """The held-out parts on which TRUST_PROB was less calibrated (higher ECE) than the
        softmax confidence served beside it, when calibrate judged it."""
        return tuple(part for part, ece in self.heldout_ece.items() if softmax_was_better(ece))

    def signal_values(
        self,
        logits: ArrayLike,
        features: ArrayLike | None = None,
        known: Mapping[str, ArrayLike] | None = None,
    ) -> Floats:
        """The signal of each sample (finite logits and, when needed, features); ``known``
        inputs are reused, not recomputed (:func:`compute_inputs`)."""
        inputs = compute_inputs(logits, self.signal.inputs, features, self.contrast_k, known)
        return self.signal(inputs)

    def apply(
        self,
        logits: ArrayLike,
        features: ArrayLike | None = None,
        known: Mapping[str, ArrayLike] | None = None,
    ) -> Floats:
        """TRUST_PROB of each sample, float64 (N,), strictly inside (0, 1). ``known``: inputs
        already computed from the same rows (the server passes its GRADTRUST and msp)."""
        return self.map(self.signal_values(logits, features, known))

    def check_probe(self) -> None:
        """Recompute the probe's inputs; raise ConfigError where this package computes them
        differently from the package that fitted the calibration."""
        if not self.probe:
            return
        try:
            logits = np.asarray(self.probe["logits"], dtype=np.float64)
            raw = self.probe.get("features")
            features = None if raw is None else np.asarray(raw, dtype=np.float64)
            expected = {n: np.asarray(v, dtype=np.float64) for n, v in self.probe["values"].items()}
            got = compute_inputs(logits, tuple(expected), features, self.contrast_k)
        except (KeyError, TypeError, ValueError, InvalidInputError) as exc:
            raise ConfigError(f"malformed calibration probe ({exc}): re-run calibrate") from exc
        changed = [
            n for n in expected if not np.allclose(got[n], expected[n], rtol=1e-7, atol=1e-9)
        ]
        if changed:
            raise ConfigError(
                f"this package computes the calibration input(s) {changed} differently from the "
                "one that fitted trust_calibration.json (score definitions changed): re-run "
                "`gradtrust calibrate` for this entry"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "signal": self.signal.to_dict(),
            "contrast_k": int(self.contrast_k),
            "map": self.map.to_dict(),
            "low_trust_threshold": self.low_trust_threshold,
            "target": {"kind": self.target.kind, "value": self.target.value},
            "achieved_on_calibration": self.achieved_on_calibration,
            "fitted_on": dict(self.fitted_on),
            "selection": dict(self.selection),
            "probe": dict(self.probe),
        } | ({"heldout_ece": _plain(self.heldout_ece)} if self.heldout_ece else {})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrustCalibration:
        version = data.get("version")
        if data.get("format") != FORMAT or version != VERSION:
            why = (
                "version 1 mapped the released-code GradTrust, which is no longer the served "
                "score, and could say exactly 0 or 1"
                if data.get("format") == FORMAT and version == 1
                else f"format={data.get('format')!r}, version={version!r}"
            )
            raise ConfigError(
                f"not a {FORMAT} version {VERSION} file ({why}): re-run `gradtrust calibrate` "
                "for this entry"
            )
        try:
            achieved = data.get("achieved_on_calibration")
            calibration = cls(
                signal=Signal.from_dict(data["signal"]),
                map=ProbabilityMap.from_dict(data["map"]),
                low_trust_threshold=float(data["low_trust_threshold"]),
                target=ThresholdTarget(data["target"]["kind"], float(data["target"]["value"])),
                achieved_on_calibration=math.nan if achieved is None else float(achieved),
                contrast_k=int(data.get("contrast_k", 3)),
                fitted_on=dict(data.get("fitted_on", {})),
                selection=dict(data.get("selection", {})),
                probe=dict(data.get("probe", {})),
                heldout_ece={
                    str(part): {
                        "trust_prob": float(ece["trust_prob"]),
                        "confidence": float(ece["confidence"]),
                    }
                    for part, ece in data.get("heldout_ece", {}).items()
                },
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"malformed trust calibration ({exc!r}): re-run calibrate") from exc
        calibration.check_probe()
        return calibration

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
        if not isinstance(data, dict):
            raise ConfigError(f"trust calibration {path} is not a JSON object: re-run calibrate")
        return cls.from_dict(data)


def load_model_calibration(entry: str | os.PathLike[str]) -> TrustCalibration | None:
    """The calibration of a model-repository entry (``<entry>/trust_calibration.json``), or
    None when the entry has none. A file that exists but is invalid raises ConfigError."""
    path = Path(entry) / FILENAME
    return TrustCalibration.from_json(path) if path.is_file() else None


def softmax_was_better(ece: Mapping[str, float]) -> bool:
    """Whether, on one held-out part (``{"trust_prob": e, "confidence": e}``), TRUST_PROB's
    ECE was higher than softmax confidence's."""
    return ece["trust_prob"] > ece["confidence"]


def _plain(ece: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    return {str(part): {k: float(v) for k, v in values.items()} for part, values in ece.items()}


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value
