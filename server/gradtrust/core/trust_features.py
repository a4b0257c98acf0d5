"""Closed-form last-layer gradient features of a prediction: what a calibrated trust
probability may be fitted from, besides the scores of :mod:`gradtrust.core.scores`.

The tutorial's introspective features backpropagate a loss between the prediction and a
contrast target through the last layer ``z = W h + b`` and look at the gradient of ``W``.
For cross-entropy towards a class ``q`` that gradient is the outer product
``G_q = (p - e_q) h^T``; for the all-ones "confounding" label (cross-entropy summed over
every class) it is ``G_1 = (C p - 1) h^T``. Both have zero mean over their C x D entries
(the first factor sums to 0), so their Frobenius norms and population variances are

    ||G_q|| = ||p - e_q|| ||h||,      Var(G_q) = ||p - e_q||^2 ||h||^2 / (C D),

and a variance *ratio* of two such gradients does not depend on ``h`` at all. Every
feature here is therefore a closed form over the logits (and ``||h||`` for the norms): no
backward pass. All are logarithms, computed from log-probabilities, so none saturates for
confident predictions and all are invariant to adding a constant to every logit.

=================== ============================================================ ========
feature             definition (P the prediction, Q_k its k-th runner-up)          needs h
=================== ============================================================ ========
``cf_ratio_k``      ``log Var(G_Qk) / Var(G_P)`` for k = 1..K (the terms that      no
                    ``contrast_trust`` averages)
``ones_ratio``      ``log Var(G_1) / Var(G_P)`` (confounding label vs prediction)  no
``pred_grad_norm``  ``-log ||G_P||`` (small gradient towards P = confident)      yes
``cf_grad_norm_k``  ``log ||G_Qk||`` for k = 1..K                                  yes
``ones_grad_norm``  ``log ||G_1||``                                                yes
``feature_norm``    ``log ||h||``                                                  yes
=================== ============================================================ ========

Signs follow the package convention (higher = more trust) where the usual case gives one;
a calibration fit does not rely on it (a combination learns its own weights, and a single
feature that ranks errors the wrong way simply loses the selection). ``K`` is the
calibration's ``contrast_k`` capped at ``C - 1``. Logarithms of an exact zero (uniform
probabilities make ``C p - 1`` vanish; an all-zero ``h``) are floored at
``log(float64 tiny)`` (about -708), so every feature is finite for finite input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gradtrust.errors import InvalidInputError

Floats = NDArray[np.float64]

_TINY = float(np.finfo(np.float64).tiny)
_LOG_TINY = float(np.log(_TINY))
# Logit differences beyond this change no probability (exp(-745) is 0 in float64); the cap
# only keeps log-probabilities finite when finite logits span more than the float64 range.
_SPAN_CAP = 1e4

RATIO_FEATURES = ("ones_ratio",)
NORM_FEATURES = ("pred_grad_norm", "ones_grad_norm", "feature_norm")


def feature_names(num_classes: int, contrast_k: int, has_features: bool) -> tuple[str, ...]:
    """Every gradient feature available for a model with ``num_classes`` classes, in a
    stable order; the norms only when the model exposes its penultimate features."""
    k = min(int(contrast_k), num_classes - 1)
    names = [f"cf_ratio_{i}" for i in range(1, k + 1)] + list(RATIO_FEATURES)
    if has_features:
        names += ["pred_grad_norm"] + [f"cf_grad_norm_{i}" for i in range(1, k + 1)]
        names += ["ones_grad_norm", "feature_norm"]
    return tuple(names)


def needs_features(name: str) -> bool:
    """Whether a gradient feature needs ``h`` (the norms do; the ratios do not)."""
    return name in NORM_FEATURES or name.startswith("cf_grad_norm_")


def _log_norms(z: Floats, k: int) -> tuple[Floats, Floats, Floats]:
    """``log ||p - e_P||^2`` (N,), ``log ||p - e_Qi||^2`` (N, k) and ``log ||C p - 1||^2`` (N,),
    from log-probabilities without cancellation near p_P = 1, in two exp passes and with
    a partition (not a sort) for the runner-ups, so it stays O(C) per sample."""
    n, c = z.shape
    rows = np.arange(n)
    pred = np.argmax(z, axis=1)
    with np.errstate(over="ignore"):
        shifted = np.maximum(z - z[rows, pred][:, None], -_SPAN_CAP)  # log(p_c / p_P) <= 0
    e = np.exp(shifted)
    total = e.sum(axis=1)  # in [1, C]
    p = e / total[:, None]
    log_total = np.log(total)
    # ||p - e_P||^2 = (1 - p_P)^2 + sum_{c != P} p_c^2, with 1 - p_P = sum_{c != P} p_c: both
    # sums taken relative to the runner-up, so they stay exact where p_P rounds to 1.
    shifted[rows, pred] = -np.inf
    runner_up = shifted.max(axis=1)
    rel = np.exp(shifted - runner_up[:, None])  # 0 at P, 1 at the runner-up
    log_rest = runner_up - log_total + np.log(rel.sum(axis=1))
    log_sq = 2.0 * (runner_up - log_total) + np.log(np.einsum("nc,nc->n", rel, rel))
    log_pred = np.logaddexp(2.0 * log_rest, log_sq)
    sum_sq = np.einsum("nc,nc->n", p, p)
    others = p.copy()
    others[rows, pred] = -1.0
    q = np.sort(np.partition(others, c - k, axis=1)[:, c - k :], axis=1)[:, ::-1]
    # ||p - e_q||^2 = (1 - p_q)^2 + sum_c p_c^2 - p_q^2 >= p_P^2 >= 1 / C^2: no underflow.
    log_cf = np.log((1.0 - q) ** 2 + sum_sq[:, None] - q**2)
    ones = np.einsum("nc,nc->n", c * p - 1.0, c * p - 1.0)
    log_ones = np.log(np.maximum(ones, _TINY))
    return log_pred, log_cf, log_ones


def compute_gradient_features(
    logits: ArrayLike,
    names: Sequence[str],
    features: ArrayLike | None = None,
    contrast_k: int = 3,
) -> dict[str, Floats]:
    """The named gradient features of each sample, ``{name: (N,) float64}`` in order.

    ``logits`` (N, C) and ``features`` (N, D) must be finite (the caller validates them,
    as :func:`gradtrust.core.scores.compute_scores` does); ``features`` only when a name
    needs ``h``. Per sample: no value depends on the rest of the batch.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise InvalidInputError(f"logits must have shape (batch, classes >= 2), got {z.shape}")
    n, c = z.shape
    k = min(int(contrast_k), c - 1)
    known = feature_names(c, k, has_features=True)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InvalidInputError(
            f"unknown gradient feature(s) {unknown} for {c} classes and contrast_k {k}; "
            f"known: {', '.join(known)}"
        )
    log_norm_h = np.zeros(n)
    if any(needs_features(name) for name in names):
        if features is None:
            raise InvalidInputError(
                "these gradient features need the penultimate features h: pass features"
            )
        h = np.asarray(features, dtype=np.float64)
        if h.ndim != 2 or h.shape[0] != n:
            raise InvalidInputError(f"features must have shape ({n}, D), got {h.shape}")
        scale = np.abs(h).max(axis=1) if h.shape[1] else np.zeros(n)
        safe = np.where(scale > 0, scale, 1.0)
        norm = np.sqrt(np.einsum("nd,nd->n", h / safe[:, None], h / safe[:, None]))
        log_norm_h = np.where(scale > 0, np.log(np.maximum(norm, _TINY)) + np.log(safe), _LOG_TINY)
    log_pred, log_cf, log_ones = _log_norms(z, k)
    out: dict[str, Floats] = {}
    for name in names:
        if name.startswith("cf_ratio_"):
            out[name] = log_cf[:, int(name.rsplit("_", 1)[1]) - 1] - log_pred
        elif name == "ones_ratio":
            out[name] = log_ones - log_pred
        elif name == "pred_grad_norm":
            out[name] = -(0.5 * log_pred + log_norm_h)
        elif name.startswith("cf_grad_norm_"):
            out[name] = 0.5 * log_cf[:, int(name.rsplit("_", 1)[1]) - 1] + log_norm_h
        elif name == "ones_grad_norm":
            out[name] = 0.5 * log_ones + log_norm_h
        elif name == "feature_norm":
            out[name] = log_norm_h
    return out
