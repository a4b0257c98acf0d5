"""Turn a trust score into P(correct), and pick a low-trust threshold that means something.

A raw GradTrust of 4.2 says nothing by itself; "about 93 % of predictions like this one
were right" does. :class:`TrustCalibration` holds a monotone (isotonic) map from each
score to the probability that the prediction is correct, fitted (by
:mod:`gradtrust.tools.evaluate.calibration`) on a labelled calibration split, plus
the low-trust threshold chosen on the same split for a stated
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

Floats = NDArray[np.float64]

FORMAT = "gradtrust-trust-calibration"
VERSION = 1
FILENAME = "trust_calibration.json"
TargetKind = Literal["flag_rate", "error_recall"]
TARGET_KINDS: tuple[TargetKind, ...] = ("flag_rate", "error_recall")


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

    def apply(self, gradtrust: ArrayLike) -> Floats:
        """TRUST_PROB: P(correct) for each value of the threshold score (float64, same shape)."""
        return self.maps[self.score](gradtrust)

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
