"""Fit a model's TRUST_PROB on labelled data: the probability map, the low-trust
threshold, and the whole fit that ``gradtrust calibrate`` runs.

:func:`fit_trust_calibration` chooses the signal (:mod:`gradtrust.tools.evaluate.signals`:
every input, pairs with softmax confidence, the logistic combination; judged by grouped
cross-validation), refits it on all of the calibration data, maps it to a probability
(:func:`fit_probability_map`) and picks the threshold for a target.
:mod:`gradtrust.tools.evaluate.assessment` then measures the candidates on held-out data
and refuses a signal that ranks errors worse than softmax confidence beyond the noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gradtrust.core.calibration import (
    ProbabilityMap,
    Signal,
    TargetKind,
    ThresholdTarget,
    TrustCalibration,
    compute_inputs,
)
from gradtrust.errors import InvalidInputError
from gradtrust.tools.evaluate import metrics as M
from gradtrust.tools.evaluate.signals import (
    COMBINATION,
    CONFIDENCE,
    CV_FOLDS,
    CalibrationRefused,
    Selection,
    fit_candidate,
    group_folds,
    part_weights,
    select_signal,
)

Floats = NDArray[np.float64]
Bools = NDArray[np.bool_]
Inputs = Mapping[str, Floats]

MIN_ERRORS = 30
"""Fewer wrong predictions than this in the calibration data: nothing is fitted. A map,
a threshold and a choice between signals all rest on the errors; with fewer than about 30
the AUROC of the choice alone has a standard error above 0.05."""
MIN_BLOCK = 30
BLOCK_FRACTION = 0.01
TOLERANCE_SIGMAS = 3.0


# ---- the probability map ----------------------------------------------------------------


def _pav(x: Floats, hits: Floats, counts: Floats) -> tuple[list[float], list[float], list[float]]:
    """Pool-adjacent-violators over x-sorted groups: blocks of (sum x*n, hits, n) whose
    accuracies strictly increase."""
    sx: list[float] = []
    sh: list[float] = []
    sn: list[float] = []
    for xi, hi, ni in zip(x * counts, hits, counts, strict=True):
        sx.append(float(xi))
        sh.append(float(hi))
        sn.append(float(ni))
        while len(sn) > 1 and sh[-2] / sn[-2] >= sh[-1] / sn[-1]:
            _merge_last(sx, sh, sn)
    return sx, sh, sn


def _merge_last(*stacks: list[float]) -> None:
    for stack in stacks:
        top = stack.pop()
        stack[-1] += top


def _smoothed(hits: float, n: float) -> float:
    return (hits + 1.0) / (n + 2.0)


def fit_probability_map(
    signal: ArrayLike,
    correct: ArrayLike,
    min_block: int | None = None,
    weights: ArrayLike | None = None,
) -> ProbabilityMap:
    """Centred isotonic regression of correctness on the signal, with a minimum block size
    and Laplace smoothing (the reasons are in :class:`ProbabilityMap`).

    Steps: pool equal signal values; pool adjacent violators; merge any block smaller than
    ``min_block`` (default ``max(30, 1 % of N)``) into the neighbour whose accuracy is
    closer (merging neighbours keeps the fit monotone); smooth each block's accuracy to
    ``(right + 1) / (n + 2)`` and pool again wherever smoothing broke the order. One knot
    per block at its mean signal; the tails' scales are how far the signal reached beyond
    the outer knots. ``weights`` (summing to N) weigh the samples, block sizes
    included.
    """
    s = np.asarray(signal, dtype=np.float64).ravel()
    c = np.asarray(correct).astype(bool).ravel()
    w = np.ones(s.size) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if s.size == 0 or s.size != c.size or not np.isfinite(s).all():
        raise InvalidInputError("a probability map needs finite signal values, one per label")
    m = max(MIN_BLOCK, math.ceil(BLOCK_FRACTION * s.size)) if min_block is None else min_block
    values, inverse = np.unique(s, return_inverse=True)
    counts = np.bincount(inverse, weights=w)
    hits = np.bincount(inverse, weights=w * c)
    sx, sh, sn = _pav(values.astype(np.float64), hits.astype(np.float64), counts.astype(np.float64))
    while len(sn) > 1 and min(sn) < m:
        i = int(np.argmin(sn))
        if i == 0:
            j = 1
        elif i == len(sn) - 1:
            j = i - 1
        else:
            acc = sh[i] / sn[i]
            j = i - 1 if acc - sh[i - 1] / sn[i - 1] <= sh[i + 1] / sn[i + 1] - acc else i + 1
        lo, hi = min(i, j), max(i, j)
        sx[lo] += sx.pop(hi)
        sh[lo] += sh.pop(hi)
        sn[lo] += sn.pop(hi)
    centres = np.asarray(sx) / np.asarray(sn)
    sx2, sh2, sn2 = _pav_smoothed(centres, np.asarray(sh), np.asarray(sn))
    xs = np.asarray(sx2) / np.asarray(sn2)
    ys = np.asarray([_smoothed(h, n) for h, n in zip(sh2, sn2, strict=True)])
    spacing = float(xs[-1] - xs[0]) / (xs.size - 1) if xs.size > 1 else 1.0
    reach = (float(xs[0] - s.min()), float(s.max() - xs[-1]))
    tail = (reach[0] if reach[0] > 0 else spacing, reach[1] if reach[1] > 0 else spacing)
    return ProbabilityMap(
        tuple(float(v) for v in xs),
        tuple(float(v) for v in ys),
        tail if all(math.isfinite(w) and w > 0 for w in tail) else None,
    )


def fit_part_weighted_map(
    signal: ArrayLike, correct: ArrayLike, weights: ArrayLike
) -> ProbabilityMap:
    """:func:`fit_probability_map` on the samples whose weight is positive, their weights
    scaled to sum to their number (a part weighted 0 is left out, not fitted as empty
    blocks; block sizes count the samples that are in)."""
    s = np.asarray(signal, dtype=np.float64)
    c = np.asarray(correct).astype(bool)
    w = np.asarray(weights, dtype=np.float64)
    keep = w > 0
    kept = w[keep] * (np.count_nonzero(keep) / w[keep].sum())
    return fit_probability_map(s[keep], c[keep], weights=kept)


def _pav_smoothed(
    centres: Floats, hits: Floats, counts: Floats
) -> tuple[list[float], list[float], list[float]]:
    """Pool neighbouring blocks while their smoothed accuracies do not increase."""
    sx: list[float] = []
    sh: list[float] = []
    sn: list[float] = []
    for xi, hi, ni in zip(centres * counts, hits, counts, strict=True):
        sx.append(float(xi))
        sh.append(float(hi))
        sn.append(float(ni))
        while len(sn) > 1 and _smoothed(sh[-2], sn[-2]) >= _smoothed(sh[-1], sn[-1]):
            _merge_last(sx, sh, sn)
    return sx, sh, sn


# ---- how much each part weighs in the map ------------------------------------------------

CLEAN_WEIGHTS = tuple(sorted((i / 40 for i in range(41)), key=lambda w: (abs(w - 0.5), -w)))
"""The clean part's share of the total weight the map may be fitted with (steps of 2.5 %),
nearest to equal weights first."""


def balanced_weights(parts: ArrayLike, clean_weight: float) -> Floats:
    """Sample weights summing to N under which the clean part (0) weighs ``clean_weight`` of
    the total and the shifted part (1) the rest (0.5: :func:`part_weights`)."""
    p = np.asarray(parts, dtype=np.int64)
    n_clean, n_shifted = int(np.count_nonzero(p == 0)), int(np.count_nonzero(p != 0))
    if n_clean == 0 or n_shifted == 0:
        return np.ones(p.size)
    share = np.where(p == 0, clean_weight / n_clean, (1.0 - clean_weight) / n_shifted)
    return np.asarray(share * p.size, dtype=np.float64)


CHOSEN_RULE = (
    "equal weights unless, out of fold, TRUST_PROB is then less calibrated (ECE) than "
    "softmax confidence on one part; then the weight nearest to equal with which it is no "
    "worse on both; else the one with the smallest worst excess"
)
STATED_RULE = "the clean share of traffic the user stated (--clean-share)"


@dataclass(frozen=True)
class MapBalance:
    """The clean part's weight in the probability map, and why: for each weight tried, the
    out-of-fold ECE of TRUST_PROB minus that of softmax confidence on each part."""

    clean_weight: float
    excess: dict[float, dict[str, float]]
    #: True when the user stated the clean share of their traffic (``--clean-share``)
    #: instead of letting the rule choose.
    stated: bool = False

    @property
    def chosen_excess(self) -> dict[str, float]:
        """Out-of-fold ECE of TRUST_PROB minus softmax confidence's, per part, at the chosen
        weight."""
        return self.excess[self.clean_weight]

    @property
    def no_worse(self) -> bool:
        """Whether, at the chosen weight, TRUST_PROB was out of fold no less calibrated than
        softmax confidence on every part."""
        return max(self.chosen_excess.values()) <= 0.0

    @classmethod
    def from_selection(cls, selection: Mapping[str, Any]) -> MapBalance | None:
        """The balance a calibration file records in its ``selection`` (None when it was
        fitted without shifted data), so readers of the file judge it as the fit did."""
        recorded = selection.get("map_balance")
        if not recorded:
            return None
        by_weight = recorded["ece_minus_softmax_by_weight"]
        return cls(
            float(recorded["clean_weight"]),
            {float(w): {p: float(v) for p, v in parts.items()} for w, parts in by_weight.items()},
            recorded.get("rule") == STATED_RULE,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_weight": self.clean_weight,
            "rule": STATED_RULE if self.stated else CHOSEN_RULE,
            "ece_minus_softmax_by_weight": {
                f"{w:g}": dict(parts) for w, parts in self.excess.items()
            },
        }


def choose_map_balance(
    signal_out_of_fold: ArrayLike,
    confidence: ArrayLike,
    correct: ArrayLike,
    groups: ArrayLike,
    parts: ArrayLike,
    seed: int = 0,
    stated: float | None = None,
) -> MapBalance:
    """How much the clean part weighs when the probability map is fitted.

    One monotone map cannot be calibrated for two populations whose accuracy at the same
    signal value differs; equal weights make it under-state clean accuracy and over-state
    shifted accuracy. Which population traffic will look like is unknown, so the promise
    made is the one a user can check: TRUST_PROB no less calibrated than the softmax
    confidence it is served beside, on clean and on shifted data. Each weight of
    :data:`CLEAN_WEIGHTS` is judged out of fold (maps fitted on the other folds' out-of-fold
    signal values, folds by source image); equal weights are kept when they keep that
    promise, else the nearest weight that does, else the one whose worst excess is smallest.

    ``stated``: the clean share of the user's traffic, when they know it better than this
    rule can guess; it is then the weight, judged out of fold like the others for the report.
    """
    s = np.asarray(signal_out_of_fold, dtype=np.float64)
    msp = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct).astype(bool)
    p = np.asarray(parts, dtype=np.int64)
    fold = group_folds(np.asarray(groups, dtype=np.int64), CV_FOLDS, seed + 2)
    labels = {0: "clean", 1: "shifted"}
    base = {labels[q]: M.ece(msp[p == q], y[p == q]) for q in (0, 1) if (p == q).any()}
    excess: dict[float, dict[str, float]] = {}
    tried = CLEAN_WEIGHTS if stated is None or stated in CLEAN_WEIGHTS else (*CLEAN_WEIGHTS, stated)
    for clean_weight in tried:
        weights = balanced_weights(p, clean_weight)
        prob = np.zeros(s.size)
        for k in range(CV_FOLDS):
            train, test = fold != k, fold == k
            prob_map = fit_part_weighted_map(s[train], y[train], weights[train])
            prob[test] = prob_map(s[test])
        excess[clean_weight] = {
            labels[q]: M.ece(prob[p == q], y[p == q]) - base[labels[q]]
            for q in (0, 1)
            if labels[q] in base
        }
    if stated is not None:
        return MapBalance(stated, excess, stated=True)
    keeping = [w for w in CLEAN_WEIGHTS if max(excess[w].values()) <= 0.0]
    chosen = keeping[0] if keeping else min(CLEAN_WEIGHTS, key=lambda w: max(excess[w].values()))
    return MapBalance(chosen, excess)


# ---- thresholds -----------------------------------------------------------------------------


def achieved(
    scores: ArrayLike,
    correct: ArrayLike,
    threshold: float,
    kind: TargetKind,
    weights: ArrayLike | None = None,
) -> float:
    """The flag rate (share of all samples with score < threshold) or the error recall
    (share of wrong predictions with score < threshold), shares by ``weights`` when given;
    nan for recall with no errors."""
    s = np.asarray(scores, dtype=np.float64)
    w = np.ones(s.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    flagged = s < threshold
    if kind == "flag_rate":
        return float(np.average(flagged, weights=w))
    wrong = ~np.asarray(correct).astype(bool)
    return float(np.average(flagged[wrong], weights=w[wrong])) if wrong.any() else math.nan


def choose_threshold(
    scores: ArrayLike,
    correct: ArrayLike,
    target: ThresholdTarget,
    weights: ArrayLike | None = None,
) -> float:
    """The threshold (low trust = score < threshold) that meets ``target`` on these samples
    (each counted with its weight, when ``weights`` are given).

    flag_rate X: the highest threshold flagging at most X of the samples. error_recall Y:
    the lowest threshold flagging at least Y of the wrong predictions. The threshold is
    put midway between neighbouring observed values, so it generalises symmetrically.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    c = np.asarray(correct).astype(bool).ravel()
    if s.size == 0 or s.size != c.size or not np.isfinite(s).all():
        raise InvalidInputError("choose_threshold needs finite scores and one label per score")
    w = np.ones(s.size) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    values = np.unique(s)
    order = np.argsort(s, kind="stable")
    cumulative = np.concatenate(([0.0], np.cumsum(w[order])))
    below = cumulative[np.searchsorted(s[order], values, side="left")]  # weight of s < value
    if target.kind == "flag_rate":
        allowed = np.flatnonzero(below <= target.value * cumulative[-1] * (1 + 1e-12))
        i = int(allowed[-1])  # below[0] == 0, so there is always one
        return float(values[0]) if i == 0 else float((values[i - 1] + values[i]) / 2.0)
    if c.all():
        raise InvalidInputError(
            "an error-recall target needs wrong predictions in the calibration data; "
            "use a flag-rate target or harder calibration data (--mix corruptions)"
        )
    wrong_order = np.argsort(s[~c], kind="stable")
    wrong = s[~c][wrong_order]
    caught = np.cumsum(w[~c][wrong_order])
    need = target.value * caught[-1] * (1 - 1e-12)
    last = wrong[int(np.searchsorted(caught, need, side="left"))]  # flag every sample <= last
    higher = values[values > last]
    return float((last + higher[0]) / 2.0) if higher.size else float(np.nextafter(last, np.inf))


def tolerance(target: ThresholdTarget, n_calibration: int, n_heldout: int) -> float:
    """How far a held-out rate may stray from the target by sampling alone: three binomial
    standard errors of the difference of two independent estimates of a rate v,
    ``3 sqrt(v (1 - v) (1/n_cal + 1/n_held))`` (for error_recall the n count errors)."""
    if n_calibration < 1 or n_heldout < 1:
        return math.inf
    v = target.value
    return TOLERANCE_SIGMAS * math.sqrt(v * (1 - v) * (1 / n_calibration + 1 / n_heldout))


# ---- the whole fit ----------------------------------------------------------------------------


def fit_trust_calibration(
    inputs: Inputs,
    correct: ArrayLike,
    groups: ArrayLike,
    target: ThresholdTarget,
    contrast_k: int = 3,
    seed: int = 0,
    force: str | None = None,
    data: str = "",
    probe: tuple[ArrayLike, ArrayLike | None] | None = None,
    parts: ArrayLike | None = None,
    clean_share: float | None = None,
) -> tuple[TrustCalibration, Selection, dict[str, tuple[Signal, ProbabilityMap]]]:
    """Choose the signal, refit it (and, for the report, every single input and the full
    combination) on all of the calibration data, fit each one's probability map, and the
    threshold on the chosen TRUST_PROB. ``parts`` marks clean (0) and shifted (1) samples:
    both then weigh the same in the logistic fits, the choice and the threshold (which then
    describes traffic that is half clean, half shifted, not one that is 98 % corrupted
    copies); in the probability map they weigh what :func:`choose_map_balance` decides, so
    that TRUST_PROB is no less calibrated than softmax confidence on either part.
    ``clean_share`` (with ``parts``): the share of clean images in the user's traffic; the
    map and the threshold are then fitted for that mix instead (the choice of the signal
    still judges each part on its own).

    Returns the calibration, how it was chosen, and the reported candidates' (signal, map)
    for :func:`assess`. Raises :class:`CalibrationRefused` with fewer than :data:`MIN_ERRORS`
    wrong predictions. ``probe``: the logits (and features) of a few samples, stored with
    the signal's inputs computed from them (see :meth:`TrustCalibration.check_probe`).
    """
    y = np.asarray(correct).astype(bool)
    wrong = int((~y).sum())
    if clean_share is not None and (parts is None or not 0.0 <= clean_share <= 1.0):
        raise InvalidInputError(
            "a clean share is a number in [0, 1] and needs clean and shifted parts "
            "(--mix corruptions)"
        )
    if wrong < MIN_ERRORS:
        raise CalibrationRefused(
            f"only {wrong} wrong predictions among {y.size} calibration samples: TRUST_PROB "
            f"needs at least {MIN_ERRORS} errors to be fitted and checked. Give more labelled "
            "data, or harder data: `--mix corruptions` adds the product's corruptions"
        )
    selection = select_signal(inputs, y, groups, seed, force, parts)
    weights = part_weights(parts, y.size)
    balance = None
    # The map and the threshold describe the traffic: half clean, half shifted unless the
    # user stated its clean share (the map's weight may still be chosen, below).
    map_weights = threshold_weights = weights
    if clean_share is not None and parts is not None:
        map_weights = threshold_weights = balanced_weights(parts, clean_share)
    if parts is not None and CONFIDENCE in inputs:
        balance = choose_map_balance(
            selection.out_of_fold, inputs[CONFIDENCE], y, groups, parts, seed, clean_share
        )
        map_weights = balanced_weights(parts, balance.clean_weight)
    names = dict.fromkeys([*inputs, COMBINATION, selection.chosen])
    fitted = {}
    for name in names:
        sig = fit_candidate(name, inputs, y, groups, seed, weights)
        fitted[name] = (sig, fit_part_weighted_map(sig(inputs), y, map_weights))
    signal, prob_map = fitted[selection.chosen]
    trust_prob = prob_map(signal(inputs))
    threshold = choose_threshold(trust_prob, y, target, threshold_weights)
    calibration = TrustCalibration(
        signal=signal,
        map=prob_map,
        low_trust_threshold=threshold,
        target=target,
        achieved_on_calibration=achieved(trust_prob, y, threshold, target.kind, threshold_weights),
        contrast_k=contrast_k,
        fitted_on={"samples": int(y.size), "wrong": wrong, "data": data},
        selection=selection.to_dict()
        | ({} if balance is None else {"map_balance": balance.to_dict()}),
        probe=_probe(signal, contrast_k, probe),
    )
    return calibration, selection, fitted


def _probe(
    signal: Signal, contrast_k: int, samples: tuple[ArrayLike, ArrayLike | None] | None
) -> dict[str, Any]:
    if samples is None:
        return {}
    logits = np.asarray(samples[0], dtype=np.float64)
    features = None if samples[1] is None else np.asarray(samples[1], dtype=np.float64)
    if not signal.needs_features:
        features = None
    values = compute_inputs(logits, signal.inputs, features, contrast_k)
    return {
        "logits": logits.tolist(),
        "features": None if features is None else features.tolist(),
        "values": {n: v.tolist() for n, v in values.items()},
    }


# ---- the target and ECE on held-out data (what a served round trip asserts) ---------------


@dataclass(frozen=True)
class HeldOutCheck:
    """A calibration judged on data it was not fitted on."""

    ece_trust_prob: float
    ece_confidence: float
    achieved: float
    target: ThresholdTarget
    tolerance: float

    @property
    def ece_improved(self) -> bool:
        """TRUST_PROB's ECE is no worse than the served softmax confidence's."""
        return self.ece_trust_prob <= self.ece_confidence

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
    trust_prob: ArrayLike,
    confidence: ArrayLike,
    correct: ArrayLike,
) -> HeldOutCheck:
    """Judge ``calibration`` on held-out samples from their TRUST_PROB (served, or
    :meth:`TrustCalibration.apply` here) and softmax confidence."""
    prob = np.asarray(trust_prob, dtype=np.float64).ravel()
    c = np.asarray(correct).astype(bool).ravel()
    target = calibration.target
    fitted = calibration.fitted_on
    if target.kind == "flag_rate":
        n_cal, n_held = int(fitted.get("samples", 0)), int(c.size)
    else:
        n_cal, n_held = int(fitted.get("wrong", 0)), int(np.count_nonzero(~c))
    return HeldOutCheck(
        ece_trust_prob=M.ece(prob, c),
        ece_confidence=M.ece(np.asarray(confidence, dtype=np.float64).ravel(), c),
        achieved=achieved(prob, c, calibration.low_trust_threshold, target.kind),
        target=target,
        tolerance=tolerance(target, n_cal, n_held),
    )
