"""Metrics for judging a trust score: does it rank the classifier's mistakes last?

Every function takes one score per sample (higher = more trust, as every score in
:mod:`gradtrust.core.scores` is served) and a boolean per sample saying whether the
classifier was right. Nothing here knows which score produced the values.

Ties are handled the same way everywhere a *count* of kept samples is fixed (AUAC,
AUFC, AURC): samples with equal scores are kept in a random order, and the counts the
metric is made of are their exact **expected values over that random order** (a tied
group straddling the cut contributes each member with the kept share of the group as
weight). So a score that
cannot tell samples apart earns chance level, never credit from the input order.
Threshold metrics (AUROC, FPR at 95 % TPR) keep or drop a tied group as a whole.

Undefined cases return ``nan`` on purpose and are documented per function (AUROC and
FPR95 need both classes present); everything else is defined for any N >= 1.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gradtrust.errors import InvalidInputError

Floats = NDArray[np.float64]
Bools = NDArray[np.bool_]

RETAINED_GRID: Floats = np.arange(1, 101, dtype=np.float64) / 100.0
"""Retained fractions 0.01, 0.02, ..., 1.00: the grid AUAC and AUFC average over."""

ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error (Guo et al. 2017)."""


def _validate(scores: ArrayLike, flags: ArrayLike, what: str) -> tuple[Floats, Bools]:
    """Check a (scores, flags) pair: 1-D, same length >= 1, finite scores, 0/1 flags."""
    s = np.asarray(scores, dtype=np.float64)
    f_raw = np.asarray(flags)
    if s.ndim != 1 or f_raw.ndim != 1:
        raise InvalidInputError(
            f"scores and {what} must be 1-D (one value per sample), got shapes "
            f"{s.shape} and {f_raw.shape}"
        )
    if s.size != f_raw.size:
        raise InvalidInputError(
            f"scores have {s.size} samples but {what} have {f_raw.size}: "
            "pass one of each per sample"
        )
    if s.size == 0:
        raise InvalidInputError("no samples: a metric needs at least one (score, label) pair")
    if not np.isfinite(s).all():
        raise InvalidInputError(
            f"scores hold {int(np.count_nonzero(~np.isfinite(s)))} NaN or infinite values; "
            "every score in gradtrust.core.scores is finite, so check how these were produced"
        )
    if f_raw.dtype != np.bool_ and not np.isin(f_raw, (0, 1)).all():
        raise InvalidInputError(f"{what} must be booleans (or 0/1), got values {np.unique(f_raw)}")
    return s, f_raw.astype(bool)


def _expected_cumulative(scores: Floats, columns: Floats) -> Floats:
    """``E[sum of each column over the k highest-scoring samples]`` for k = 0..N, (N + 1, K).

    Ties are broken uniformly at random and the expectation is exact: it is linear in k
    inside a tied group, so it is the linear interpolation between group boundaries.
    """
    order = np.argsort(-scores, kind="stable")
    s_sorted = scores[order]
    last_of_group = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))
    kept = np.concatenate(([0.0], last_of_group + 1.0))
    totals = np.vstack((np.zeros((1, columns.shape[1])), np.cumsum(columns[order], axis=0)))
    at_bounds = totals[np.concatenate(([0], last_of_group + 1))]
    k = np.arange(scores.size + 1, dtype=np.float64)
    return np.stack([np.interp(k, kept, col) for col in at_bounds.T], axis=1)


def expected_kept_correct(scores: ArrayLike, correct: ArrayLike) -> Floats:
    """``E[#correct among the k highest-scoring samples]`` for k = 0..N (length N + 1),
    ties broken uniformly at random (exact expectation)."""
    s, c = _validate(scores, correct, "correct")
    return _expected_cumulative(s, c.astype(np.float64)[:, None])[:, 0]


def kept_counts(n: int, retained: ArrayLike = RETAINED_GRID) -> NDArray[np.int64]:
    """How many samples a retained fraction r keeps: ``max(1, ceil(r N))``.

    Rounding guards against ``0.29 * 100 = 28.999...`` style float error.
    """
    r = np.asarray(retained, dtype=np.float64)
    if r.ndim != 1 or r.size == 0 or (r <= 0).any() or (r > 1).any():
        raise InvalidInputError("retained fractions must be a non-empty 1-D array in (0, 1]")
    return np.maximum(1, np.ceil(np.round(r * n, 9))).astype(np.int64)


def accuracy_curve(
    scores: ArrayLike, correct: ArrayLike, retained: ArrayLike = RETAINED_GRID
) -> Floats:
    """Accuracy of the ``ceil(r N)`` most trusted samples, for each retained fraction r."""
    tp = expected_kept_correct(scores, correct)
    k = kept_counts(tp.size - 1, retained)
    return tp[k] / k


def _labels_predictions(
    scores: ArrayLike, labels: ArrayLike, predictions: ArrayLike
) -> tuple[Floats, NDArray[np.int64], NDArray[np.int64]]:
    y, p = np.asarray(labels), np.asarray(predictions)
    if y.shape != p.shape or y.dtype.kind not in "iu" or p.dtype.kind not in "iu":
        raise InvalidInputError(
            f"labels and predictions must be integer class indices of one shape, got "
            f"{y.dtype} {y.shape} and {p.dtype} {p.shape}"
        )
    s, _ = _validate(scores, y == p, "labels")
    if y.size and min(y.min(), p.min()) < 0:
        raise InvalidInputError("class indices must be >= 0")
    return s, y.astype(np.int64), p.astype(np.int64)


def f1_curve(
    scores: ArrayLike,
    labels: ArrayLike,
    predictions: ArrayLike,
    retained: ArrayLike = RETAINED_GRID,
) -> Floats:
    """Macro-F1 of the classifier on the ``ceil(r N)`` most trusted samples, per retained r.

    Per class c, over the kept samples: ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``; the
    macro average runs over the classes that occur among the kept labels or predictions.
    A tied group straddling the cut contributes each member with the kept share of the
    group as weight (expected counts), so ties are handled as in :func:`accuracy_curve`.
    """
    s, y, p = _labels_predictions(scores, labels, predictions)
    c = int(max(y.max(), p.max())) + 1
    onehot_y = np.eye(c)[y]
    onehot_p = np.eye(c)[p]
    hit = onehot_y * onehot_p
    counts = _expected_cumulative(s, np.hstack((hit, onehot_p - hit, onehot_y - hit)))
    k = kept_counts(s.size, retained)
    tp, fp, fn = counts[k, :c], counts[k, c : 2 * c], counts[k, 2 * c :]
    denom = 2 * tp + fp + fn
    present = denom > 1e-12
    f1 = np.where(present, 2 * tp / np.where(present, denom, 1.0), 0.0)
    return f1.sum(axis=1) / present.sum(axis=1)


def auac(scores: ArrayLike, correct: ArrayLike, retained: ArrayLike = RETAINED_GRID) -> float:
    """Area under the accuracy-vs-retained curve: mean of :func:`accuracy_curve` over the grid.

    Range [0, 1]; higher = better ranking. A perfect ranking of an accuracy-a classifier
    scores about ``a (1 - ln a)``, not 1: keeping more than a share a must keep errors.
    """
    return float(np.mean(accuracy_curve(scores, correct, retained)))


def aufc(
    scores: ArrayLike,
    labels: ArrayLike,
    predictions: ArrayLike,
    retained: ArrayLike = RETAINED_GRID,
) -> float:
    """Area under the macro-F1-vs-retained curve: mean of :func:`f1_curve` over the grid.

    Range [0, 1]; higher = better. It needs the labels and predictions, not just
    correctness, because F1 is computed per class.
    """
    return float(np.mean(f1_curve(scores, labels, predictions, retained)))


def aurc(scores: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk-coverage curve (Geifman et al.): mean over k = 1..N of the error
    rate of the k most trusted samples. Range [0, 1]; **lower** = better."""
    tp = expected_kept_correct(scores, correct)
    k = np.arange(1, tp.size, dtype=np.float64)
    return float(np.mean(1.0 - tp[1:] / k))


def auroc(scores: ArrayLike, positive: ArrayLike) -> float:
    """Probability that a random positive outscores a random negative (ties count 1/2).

    Positives are the correct predictions (misprediction detection) or the
    in-distribution samples (OOD detection). Range [0, 1]; 0.5 = chance. ``nan`` when
    either class is absent (all correct, all wrong, a single sample).
    """
    s, pos = _validate(scores, positive, "positive flags")
    n_pos = int(np.count_nonzero(pos))
    n_neg = s.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Mid-ranks: every member of a tied group gets the mean of the group's 1-based ranks.
    starts = np.flatnonzero(np.concatenate(([True], s_sorted[1:] != s_sorted[:-1])))
    ends = np.append(starts[1:], s.size)
    mid = (starts + 1 + ends) / 2.0
    ranks[order] = np.repeat(mid, ends - starts)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def fpr_at_tpr(scores: ArrayLike, positive: ArrayLike, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold whose true-positive rate is >= ``tpr``.

    A sample is accepted when its score is >= the threshold, so a tied group is accepted
    as a whole. Range [0, 1]; **lower** = better. ``nan`` when either class is absent.
    """
    if not 0.0 < tpr <= 1.0:
        raise InvalidInputError(f"tpr must be in (0, 1], got {tpr}")
    s, pos = _validate(scores, positive, "positive flags")
    n_pos = int(np.count_nonzero(pos))
    n_neg = s.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Thresholds at the positives' own values: the k-th highest positive accepts >= k of them.
    pos_desc = np.sort(s[pos])[::-1]
    need = int(np.ceil(np.round(tpr * n_pos, 9)))
    threshold = pos_desc[need - 1]
    return float(np.count_nonzero(s[~pos] >= threshold) / n_neg)


def ece(probabilities: ArrayLike, correct: ArrayLike, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``sum_b (n_b / N) |accuracy_b - mean confidence_b|``.

    ``n_bins`` equal-width bins on [0, 1], right-closed ((0, 1/15], ..., (14/15, 1]; 0
    joins the first). Probabilities must lie in [0, 1]. Range [0, 1]; **lower** = better.
    """
    p, c = _validate(probabilities, correct, "correct")
    if (p < 0).any() or (p > 1).any():
        raise InvalidInputError(
            "ECE needs probabilities in [0, 1]; calibrate raw scores first "
            "(gradtrust.tools.evaluate.calibration)"
        )
    if n_bins < 1:
        raise InvalidInputError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], p, side="left")
    conf = np.bincount(idx, weights=p, minlength=n_bins)
    hits = np.bincount(idx, weights=c.astype(np.float64), minlength=n_bins)
    return float(np.abs(hits - conf).sum() / p.size)


def misprediction_metrics(
    scores: ArrayLike, labels: ArrayLike, predictions: ArrayLike
) -> dict[str, float]:
    """All ranking metrics of one score at once: auac, aufc, aurc, auroc, fpr95."""
    correct = np.asarray(labels) == np.asarray(predictions)
    return {
        "auac": auac(scores, correct),
        "aufc": aufc(scores, labels, predictions),
        "aurc": aurc(scores, correct),
        "auroc": auroc(scores, correct),
        "fpr95": fpr_at_tpr(scores, correct),
    }


def ood_metrics(in_scores: ArrayLike, out_scores: ArrayLike) -> dict[str, float]:
    """AUROC and FPR at 95 % TPR of in-distribution (positive) vs out-of-distribution."""
    s_in = np.asarray(in_scores, dtype=np.float64).ravel()
    s_out = np.asarray(out_scores, dtype=np.float64).ravel()
    s = np.concatenate((s_in, s_out))
    is_in = np.concatenate((np.ones(s_in.size, bool), np.zeros(s_out.size, bool)))
    return {"ood_auroc": auroc(s, is_in), "ood_fpr95": fpr_at_tpr(s, is_in)}
