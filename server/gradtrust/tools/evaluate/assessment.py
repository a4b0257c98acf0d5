"""Every candidate measured on held-out data, with bootstrap intervals, and the verdict
that refuses a signal ranking errors worse than softmax confidence beyond the noise."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gradtrust.core.calibration import ProbabilityMap, Signal, softmax_was_better
from gradtrust.tools.evaluate import metrics as M
from gradtrust.tools.evaluate.signals import CONFIDENCE

Floats = NDArray[np.float64]
Bools = NDArray[np.bool_]
Inputs = Mapping[str, Floats]

BOOTSTRAP = 200


@dataclass(frozen=True)
class Interval:
    """A value and its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        if not math.isfinite(self.value):
            return "n/a"
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass
class Assessment:
    """Every candidate's AUROC, AURC and ECE on one held-out part, with intervals, and each
    candidate's AUROC minus softmax confidence's (paired bootstrap)."""

    part: str
    samples: int
    wrong: int
    accuracy: float
    rows: dict[str, dict[str, Interval]] = field(default_factory=dict)
    auroc_gain: dict[str, Interval] = field(default_factory=dict)
    signals: dict[str, Floats] = field(default_factory=dict)
    probabilities: dict[str, Floats] = field(default_factory=dict)
    correct: Bools = field(default_factory=lambda: np.zeros(0, bool))


RAW_CONFIDENCE = "CONFIDENCE (softmax, as served)"


def _metrics(signal: Floats, prob: Floats, correct: Bools) -> tuple[float, float, float]:
    both = correct.any() and not correct.all()
    return (
        M.auroc(signal, correct) if both else math.nan,
        M.aurc(signal, correct),
        M.ece(prob, correct),
    )


def assess(
    part: str,
    fitted: Mapping[str, tuple[Signal, ProbabilityMap]],
    inputs: Inputs,
    correct: ArrayLike,
    groups: ArrayLike | None = None,
    resamples: int = BOOTSTRAP,
    seed: int = 0,
) -> Assessment:
    """Measure every candidate on held-out data: AUROC (right vs wrong, of the signal),
    AURC (of the signal) and ECE (of its probability map); the served softmax confidence
    as a row of its own. Intervals: 2.5 and 97.5 percentiles of ``resamples`` bootstrap
    draws of whole source images (a corrupted copy is drawn with its image)."""
    y = np.asarray(correct).astype(bool)
    g = np.arange(y.size) if groups is None else np.asarray(groups, dtype=np.int64)
    signals = {name: sig(inputs) for name, (sig, _) in fitted.items()}
    probs = {name: fitted[name][1](signals[name]) for name in fitted}
    signals[RAW_CONFIDENCE] = np.asarray(inputs[CONFIDENCE], dtype=np.float64)
    probs[RAW_CONFIDENCE] = signals[RAW_CONFIDENCE]
    point = {n: _metrics(signals[n], probs[n], y) for n in signals}
    draws: dict[str, list[tuple[float, float, float]]] = {n: [] for n in signals}
    unique, index = np.unique(g, return_inverse=True)
    rng = np.random.default_rng([seed, 5])
    from tqdm import tqdm  # only here: importing this module needs numpy alone

    for _ in tqdm(range(resamples), desc=f"bootstrap {part}", unit="draw", leave=False):
        counts = np.bincount(rng.integers(0, unique.size, unique.size), minlength=unique.size)
        take = np.repeat(np.arange(y.size), counts[index])
        for n in signals:
            draws[n].append(_metrics(signals[n][take], probs[n][take], y[take]))
    result = Assessment(part, int(y.size), int((~y).sum()), float(y.mean()))
    base = np.asarray([d[0] for d in draws[RAW_CONFIDENCE]])
    for n in signals:
        values = np.asarray(draws[n])
        row = {}
        for j, metric in enumerate(("auroc", "aurc", "ece")):
            row[metric] = _interval(point[n][j], values[:, j])
        result.rows[n] = row
        if n != RAW_CONFIDENCE:
            result.auroc_gain[n] = _interval(
                point[n][0] - point[RAW_CONFIDENCE][0], values[:, 0] - base
            )
    result.signals, result.probabilities, result.correct = signals, probs, y
    return result


def _interval(value: float, draws: Floats) -> Interval:
    finite = draws[np.isfinite(draws)]
    if not math.isfinite(value) or finite.size < 10:
        return Interval(value, math.nan, math.nan)
    low, high = np.percentile(finite, [2.5, 97.5])
    return Interval(float(value), float(low), float(high))


def verdict(chosen: str, assessments: Sequence[Assessment]) -> list[str]:
    """Why the chosen signal must be refused (empty: accepted): on any held-out part, the
    bootstrap interval of its AUROC minus softmax confidence's lies entirely below 0."""
    problems = []
    for a in assessments:
        gain = a.auroc_gain.get(chosen)
        if gain is not None and math.isfinite(gain.high) and gain.high < 0.0:
            problems.append(
                f"on {a.part} held-out data ({a.samples} samples, {a.wrong} wrong) the chosen "
                f"signal {chosen!r} ranks errors worse than softmax confidence: AUROC "
                f"difference {gain.value:+.3f}, 95 % interval [{gain.low:+.3f}, {gain.high:+.3f}]"
            )
    return problems


def heldout_ece(chosen: str, assessments: Sequence[Assessment]) -> dict[str, dict[str, float]]:
    """The ECE of TRUST_PROB (the ``chosen`` signal's map) and of softmax confidence on
    each held-out part where both are known: what the calibration file records
    (``TrustCalibration.heldout_ece``) and what :func:`calibration_warnings` judges."""
    out = {}
    for a in assessments:
        row, soft = a.rows.get(chosen), a.rows.get(RAW_CONFIDENCE)
        if row is None or soft is None:
            continue
        ece, base = row["ece"].value, soft["ece"].value
        if math.isfinite(ece) and math.isfinite(base):
            out[a.part] = {"trust_prob": ece, "confidence": base}
    return out


def calibration_warnings(chosen: str, assessments: Sequence[Assessment]) -> list[str]:
    """Where the served TRUST_PROB is less calibrated (ECE) than the softmax confidence it is
    served beside, on a held-out part: not a refusal (the ranking holds), but a user must be
    told, because on that kind of traffic CONFIDENCE is the better probability."""
    by_part = heldout_ece(chosen, assessments)
    return [
        f"on {a.part} held-out data ({a.samples} samples, {a.wrong} wrong) TRUST_PROB "
        f"is less calibrated than softmax confidence (ECE {by_part[a.part]['trust_prob']:.4f} "
        f"against {by_part[a.part]['confidence']:.4f}): one map of this signal does not fit "
        "clean and shifted traffic alike on this model. Calibrate on data that looks like "
        "your traffic (--mix clean for clean traffic, given enough errors, or --clean-share "
        "with the clean share of your traffic), and read TRUST_PROB on "
        f"{a.part} traffic with that in mind"
        for a in assessments
        if a.part in by_part and softmax_was_better(by_part[a.part])
    ]
