"""Fit a model's TRUST_PROB on labelled data, and judge it honestly on data it never saw.

``gradtrust calibrate`` runs :func:`calibrate`: every input a model offers (the scores of
:mod:`gradtrust.core.scores` and the gradient features of
:mod:`gradtrust.core.trust_features`) is a candidate signal as it is, and one more
candidate combines them all (L2 logistic regression). The calibration data is split by
source image (so corrupted copies of one digit never sit on both sides): the candidates
are ranked by out-of-fold AUROC of right vs wrong, the winner is refitted on all of the
calibration data, and its probability map and low-trust threshold are fitted there.
:func:`assess` then measures every candidate on held-out data (clean and shifted) with
bootstrap intervals, and :func:`verdict` refuses a signal that ranks errors worse than
softmax confidence beyond that noise.

Nothing here knows which score names exist: new scores in :mod:`gradtrust.core.scores`
become candidates without a change here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gradtrust.core.calibration import (
    InputScaling,
    ProbabilityMap,
    Signal,
    TargetKind,
    ThresholdTarget,
    TrustCalibration,
    compute_inputs,
)
from gradtrust.errors import GradTrustError, InvalidInputError
from gradtrust.tools.evaluate import metrics as M

Floats = NDArray[np.float64]
Bools = NDArray[np.bool_]
Inputs = Mapping[str, Floats]

COMBINATION = "combination"
CONFIDENCE = "msp"
"""The softmax confidence every signal is compared with (served as CONFIDENCE)."""
MIN_ERRORS = 30
"""Fewer wrong predictions than this in the calibration data: nothing is fitted. A map,
a threshold and a choice between signals all rest on the errors; with fewer than about 30
the AUROC of the choice alone has a standard error above 0.05."""
MIN_BLOCK = 30
BLOCK_FRACTION = 0.01
L2_GRID = (0.01, 0.1, 1.0, 10.0)
CV_FOLDS = 4
BOOTSTRAP = 200
TOLERANCE_SIGMAS = 3.0


class CalibrationRefused(GradTrustError):
    """Calibration would promise something the data does not support; nothing is written."""


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
    per block at its mean signal. ``weights`` (summing to N) weigh the samples, block sizes
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
    return ProbabilityMap(tuple(float(v) for v in xs), tuple(float(v) for v in ys))


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


# ---- the combination ----------------------------------------------------------------------


def fit_scaling(values: ArrayLike) -> InputScaling | None:
    """The :class:`InputScaling` of one input on the calibration data; None for an input
    that is constant there (it cannot help a combination)."""
    a = np.arcsinh(np.asarray(values, dtype=np.float64))
    scale = float(a.std())
    if not scale > 1e-12 * max(1.0, float(np.abs(a).max())):
        return None
    return InputScaling(float(np.median(a)), scale)


def fit_logistic(
    x: Floats, y: Bools, l2: float, weights: Floats | None = None, iterations: int = 100
) -> tuple[Floats, float]:
    """L2-regularised logistic regression: minimises ``sum_i w_i logloss_i + l2 / 2 ||b||^2``
    (the intercept is not penalised; w = 1 without ``weights``) by Newton's method with step
    halving, so it converges even where the classes are nearly separable."""
    n, d = x.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    design = np.hstack((np.ones((n, 1)), x))
    target = y.astype(np.float64)
    rate = float(np.clip(np.average(target, weights=w), 1e-3, 1 - 1e-3))
    beta = np.zeros(d + 1)
    beta[0] = math.log(rate / (1 - rate))
    penalty = np.full(d + 1, l2)
    penalty[0] = 0.0

    def objective(b: Floats) -> float:
        eta = design @ b
        return float(w @ np.logaddexp(0.0, np.where(y, -eta, eta)) + 0.5 * penalty @ b**2)

    current = objective(beta)
    for _ in range(iterations):
        p = _sigmoid(design @ beta)
        grad = design.T @ (w * (p - target)) + penalty * beta
        hess = (design * (w * p * (1 - p))[:, None]).T @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:
            trial = objective(beta - scale * step)
            if trial <= current:
                break
            scale /= 2.0
        if scale <= 1e-6:
            break
        beta -= scale * step
        done = current - trial < 1e-10 * max(1.0, abs(current))
        current = trial
        if done:
            break
    return beta[1:], float(beta[0])


def _sigmoid(eta: Floats) -> Floats:
    return np.exp(-np.logaddexp(0.0, -eta))


def _log_loss(eta: Floats, y: Bools, w: Floats) -> float:
    # log(1 + exp(-eta)) for right answers, log(1 + exp(eta)) for wrong ones.
    return float(w @ np.logaddexp(0.0, np.where(y, -eta, eta)))


def _group_folds(groups: NDArray[np.int64], folds: int, seed: int) -> NDArray[np.int64]:
    unique = np.unique(groups)
    fold_of = np.random.default_rng([seed, 7]).permutation(unique.size) % folds
    return fold_of[np.searchsorted(unique, groups)]


def fit_combination(
    inputs: Inputs,
    correct: ArrayLike,
    groups: ArrayLike | None = None,
    seed: int = 0,
    weights: ArrayLike | None = None,
) -> Signal:
    """The L2 logistic combination of every non-constant input; the penalty is chosen from
    :data:`L2_GRID` by grouped cross-validated (weighted) log-loss."""
    y = np.asarray(correct).astype(bool)
    g = np.arange(y.size) if groups is None else np.asarray(groups, dtype=np.int64)
    w = np.ones(y.size) if weights is None else np.asarray(weights, dtype=np.float64)
    names: list[str] = []
    transforms: list[InputScaling] = []
    for name, values in inputs.items():
        transform = fit_scaling(values)
        if transform is not None:
            names.append(name)
            transforms.append(transform)
    if not names:
        raise CalibrationRefused("every input is constant on the calibration data")
    x = np.stack([t(inputs[n]) for n, t in zip(names, transforms, strict=True)], axis=1)
    fold = _group_folds(g, CV_FOLDS, seed)
    losses = []
    for l2 in L2_GRID:
        loss = 0.0
        for k in range(CV_FOLDS):
            train, test = fold != k, fold == k
            if not test.any() or y[train].all() or not y[train].any():
                continue
            coef, intercept = fit_logistic(x[train], y[train], l2, w[train])
            loss += _log_loss(intercept + x[test] @ coef, y[test], w[test])
        losses.append(loss)
    l2 = L2_GRID[int(np.argmin(losses))]
    coef, intercept = fit_logistic(x, y, l2, w)
    return Signal(
        "combination",
        tuple(names),
        tuple(transforms),
        tuple(float(v) for v in coef),
        intercept,
        l2,
    )


# ---- choosing the signal --------------------------------------------------------------------


def candidate_names(inputs: Inputs) -> tuple[str, ...]:
    """Every candidate signal, simplest first: each input as it is, softmax confidence
    paired with each other input (``msp+NAME``), then the combination of all inputs."""
    pairs = [f"{CONFIDENCE}+{n}" for n in inputs if n != CONFIDENCE] if CONFIDENCE in inputs else []
    return (*inputs, *pairs, COMBINATION)


def fit_candidate(
    name: str,
    inputs: Inputs,
    correct: ArrayLike,
    groups: ArrayLike | None = None,
    seed: int = 0,
    weights: ArrayLike | None = None,
) -> Signal:
    """One candidate of :func:`candidate_names`, fitted on this data."""
    if name in inputs:
        return Signal("input", (name,))
    if name == COMBINATION:
        return fit_combination(inputs, correct, groups, seed, weights)
    first, _, second = name.partition("+")
    if first != CONFIDENCE or second not in inputs:
        raise InvalidInputError(f"unknown candidate {name!r}")
    pair = {first: inputs[first], second: inputs[second]}
    return replace(fit_combination(pair, correct, groups, seed, weights), label=name)


def part_weights(parts: ArrayLike | None, size: int) -> Floats:
    """Sample weights under which every part (clean, shifted) weighs the same in total, so
    that fifty corrupted copies of each image do not drown the clean images."""
    if parts is None:
        return np.ones(size)
    p = np.asarray(parts)
    unique, index, counts = np.unique(p, return_inverse=True, return_counts=True)
    return size / (unique.size * counts[index].astype(np.float64))


def _auroc(values: Floats, correct: Bools) -> float:
    both = correct.any() and not correct.all()
    return M.auroc(values, correct) if both and np.isfinite(values).all() else math.nan


@dataclass(frozen=True)
class Selection:
    """How the signal was chosen: out-of-fold AUROC of every candidate on the calibration
    data, per part, and which candidates were eligible."""

    chosen: str
    auroc: dict[str, float]
    gain: dict[str, dict[str, float]]
    gain_se: dict[str, dict[str, float]]
    eligible: dict[str, bool]
    forced: bool
    folds: int
    samples: int
    wrong: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "forced": self.forced,
            "rule": f"highest mean out-of-fold AUROC of right vs wrong ({self.folds} folds by "
            "source image) over the parts (clean, shifted), among candidates not "
            "significantly worse than softmax confidence on any part (AUROC difference + "
            f"{SELECTION_Z} bootstrap SE >= 0)",
            "auroc_out_of_fold": self.auroc,
            "auroc_minus_softmax_by_part": self.gain,
            "standard_error_by_part": self.gain_se,
            "eligible": self.eligible,
            "samples": self.samples,
            "wrong": self.wrong,
        }


SELECTION_BOOTSTRAP = 60
SELECTION_Z = 1.28
"""A candidate whose out-of-fold AUROC on some part is below softmax confidence's by more
than this many bootstrap standard errors (a one-sided 90 % bound) is not eligible. Stricter
than the held-out refusal (a 95 % interval), so that a candidate that merely escaped
significance here is not refused there; the constant was set looking at the demo model
and the plain cross-entropy models of ``examples/plain_ce/zoo.py``, where 1.645 let a
candidate through that the held-out check then refused and 1.0 dropped one that ties
softmax confidence on clean data and wins by 0.2 AUROC under shift."""


def select_signal(
    inputs: Inputs,
    correct: ArrayLike,
    groups: ArrayLike,
    seed: int = 0,
    force: str | None = None,
    parts: ArrayLike | None = None,
) -> Selection:
    """Judge every candidate by its out-of-fold signal (folds by source image: fitted on
    the other folds), per part (clean images, shifted copies: ``parts``; one part when
    None).

    A candidate is eligible unless, on some part, its AUROC minus softmax confidence's is
    below 0 by more than :data:`SELECTION_Z` bootstrap standard errors (softmax confidence is
    always eligible); the eligible candidate with the highest mean AUROC over the parts
    wins, a tie going to the simpler one. ``force`` names the signal instead.
    """
    y = np.asarray(correct).astype(bool)
    g = np.asarray(groups, dtype=np.int64)
    part = np.zeros(y.size, np.int64) if parts is None else np.asarray(parts, np.int64)
    known = candidate_names(inputs)
    if force is not None and force not in known:
        raise InvalidInputError(f"unknown signal {force!r}; this model offers: {', '.join(known)}")
    fold = _group_folds(g, CV_FOLDS, seed + 1)
    if any((~y[fold != k]).sum() < 2 for k in range(CV_FOLDS)):
        raise CalibrationRefused(
            "too few wrong predictions to split the calibration data for choosing a signal"
        )
    weights = part_weights(part, y.size)
    # Out-of-fold signal values: each fold scored by candidates fitted on the other folds,
    # so every calibration image takes part in the choice without judging its own fit.
    values = {name: np.zeros(y.size) for name in known}
    for k in range(CV_FOLDS):
        train, test = fold != k, fold == k
        train_inputs = {n: v[train] for n, v in inputs.items()}
        test_inputs = {n: v[test] for n, v in inputs.items()}
        for name in known:
            signal = fit_candidate(name, train_inputs, y[train], g[train], seed, weights[train])
            values[name][test] = signal(test_inputs)
    rng = np.random.default_rng([seed, 17])
    auroc: dict[str, list[float]] = {n: [] for n in known}
    gain: dict[str, dict[str, float]] = {n: {} for n in known}
    gain_se: dict[str, dict[str, float]] = {n: {} for n in known}
    eligible = dict.fromkeys(known, True)
    for p in np.unique(part):
        rows = part == p
        label = (
            "clean" if parts is not None and p == 0 else ("shifted" if parts is not None else "all")
        )
        base = _auroc(values[CONFIDENCE][rows], y[rows]) if CONFIDENCE in values else math.nan
        unique, index = np.unique(g[rows], return_inverse=True)
        draws = []
        for _ in range(SELECTION_BOOTSTRAP):
            counts = np.bincount(rng.integers(0, unique.size, unique.size), minlength=unique.size)
            draws.append(np.repeat(np.flatnonzero(rows), counts[index]))
        for name in known:
            value = _auroc(values[name][rows], y[rows])
            auroc[name].append(value)
            if not (math.isfinite(value) and math.isfinite(base)) or name == CONFIDENCE:
                continue
            diffs = [
                _auroc(values[name][d], y[d]) - _auroc(values[CONFIDENCE][d], y[d]) for d in draws
            ]
            finite = np.asarray([v for v in diffs if math.isfinite(v)])
            se = float(finite.std()) if finite.size > 2 else math.inf
            gain[name][label] = value - base
            gain_se[name][label] = se
            if value - base + SELECTION_Z * se < 0.0:
                eligible[name] = False
    mean = {n: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for n, v in auroc.items()}
    ranked = [n for n in known if eligible[n] and math.isfinite(mean[n])]
    chosen = force or max(ranked, key=lambda n: (mean[n], -known.index(n)))
    return Selection(
        chosen=chosen,
        auroc=mean,
        gain=gain,
        gain_se=gain_se,
        eligible=eligible,
        forced=force is not None,
        folds=CV_FOLDS,
        samples=int(y.size),
        wrong=int((~y).sum()),
    )


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
) -> tuple[TrustCalibration, Selection, dict[str, tuple[Signal, ProbabilityMap]]]:
    """Choose the signal, refit it (and, for the report, every single input and the full
    combination) on all of the calibration data, fit each one's probability map, and the
    threshold on the chosen TRUST_PROB. ``parts`` marks clean (0) and shifted (1) samples:
    both then weigh the same in the logistic fits, the choice, the probability map and the
    threshold (TRUST_PROB then describes traffic that is half clean, half shifted, not
    one that is 98 % corrupted copies).

    Returns the calibration, how it was chosen, and the reported candidates' (signal, map)
    for :func:`assess`. Raises :class:`CalibrationRefused` with fewer than :data:`MIN_ERRORS`
    wrong predictions. ``probe``: the logits (and features) of a few samples, stored with
    the signal's inputs computed from them (see :meth:`TrustCalibration.check_probe`).
    """
    y = np.asarray(correct).astype(bool)
    wrong = int((~y).sum())
    if wrong < MIN_ERRORS:
        raise CalibrationRefused(
            f"only {wrong} wrong predictions among {y.size} calibration samples: TRUST_PROB "
            f"needs at least {MIN_ERRORS} errors to be fitted and checked. Give more labelled "
            "data, or harder data: `--mix corruptions` adds the product's corruptions"
        )
    selection = select_signal(inputs, y, groups, seed, force, parts)
    weights = part_weights(parts, y.size)
    names = dict.fromkeys([*inputs, COMBINATION, selection.chosen])
    fitted = {}
    for name in names:
        sig = fit_candidate(name, inputs, y, groups, seed, weights)
        fitted[name] = (sig, fit_probability_map(sig(inputs), y, weights=weights))
    signal, prob_map = fitted[selection.chosen]
    trust_prob = prob_map(signal(inputs))
    threshold = choose_threshold(trust_prob, y, target, weights)
    calibration = TrustCalibration(
        signal=signal,
        map=prob_map,
        low_trust_threshold=threshold,
        target=target,
        achieved_on_calibration=achieved(trust_prob, y, threshold, target.kind, weights),
        contrast_k=contrast_k,
        fitted_on={"samples": int(y.size), "wrong": wrong, "data": data},
        selection=selection.to_dict(),
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


# ---- held-out assessment ------------------------------------------------------------------


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
