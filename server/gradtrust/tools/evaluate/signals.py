"""The candidate signals TRUST_PROB may be fitted from, and the choice between them.

Every input a model offers (the scores of :mod:`gradtrust.core.scores`, the gradient
features of :mod:`gradtrust.core.trust_features`) is a candidate as it is; softmax
confidence paired with each other input, and the L2 logistic combination of all inputs,
are candidates too. :func:`select_signal` judges them by grouped cross-validation, per part
of the data (clean images, corrupted copies), against softmax confidence. Nothing here
knows which score names exist: new scores become candidates without a change here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gradtrust.core.calibration import InputScaling, Signal
from gradtrust.errors import GradTrustError, InvalidInputError
from gradtrust.tools.evaluate import metrics as M

Floats = NDArray[np.float64]
Bools = NDArray[np.bool_]
Inputs = Mapping[str, Floats]

COMBINATION = "combination"
CONFIDENCE = "msp"
"""The softmax confidence every signal is compared with (served as CONFIDENCE)."""
L2_GRID = (0.01, 0.1, 1.0, 10.0)
CV_FOLDS = 4


class CalibrationRefused(GradTrustError):
    """Calibration would promise something the data does not support; nothing is written."""


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


def group_folds(groups: NDArray[np.int64], folds: int, seed: int) -> NDArray[np.int64]:
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
    fold = group_folds(g, CV_FOLDS, seed)
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
    #: The chosen signal's out-of-fold values (each calibration sample scored by the fit on
    #: the other folds): what the probability map's part weighting is judged on.
    out_of_fold: Floats = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)

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
    fold = group_folds(g, CV_FOLDS, seed + 1)
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
        out_of_fold=values[chosen],
    )
