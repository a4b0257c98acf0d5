"""Per-sample trust scores computed from a classifier's logits (and, for one, its features).

The classifier is assumed to end in a linear head ``z = W h + b`` (``W`` is C x D).
Every function takes a batch of logits of shape (N, C), works in float64 and returns
one value per sample: no reduction ever mixes two samples, so a sample's score does
not depend on the rest of its batch. Every score is served so that **higher = more
trust**. The exact definitions live in the project's ``scores.md``; in short, with
``p = softmax(z)`` and ``P = argmax z``:

============== =========================================================== ============
score          definition                                                  range
============== =========================================================== ============
gradtrust      ``max_c a_c^4 / mean_c a_c^4`` with ``a = z - 1/C``         [1, C]
contrast_trust ``mean_k ||p - e_Qk||^2 / ||p - e_P||^2``, Q_k the k most    [1, float64 max]
               probable classes after P (k = 3 by default, capped at C-1)
msp            ``max_c p_c``                                               [1/C, 1]
entropy        ``sum_c p_c log p_c`` (negative entropy)                    [-log C, 0]
margin         ``p_(1) - p_(2)``                                           [0, 1]
max_logit      ``z_P``                                                     any real
energy         ``logsumexp(z)`` (temperature 1)                            any real
gradnorm       ``(1/T) ||C softmax(z/T) - 1||_1 ||h||_1`` (needs features) [0, 2(C-1)/T ||h||_1]
============== =========================================================== ============

``gradtrust`` is the closed form of the released GradTrust code (variance of squared
last-layer gradients of an MSE-to-1/C loss, max over mean of the class rows): the
feature factor cancels, so it needs only the logits. ``contrast_trust`` and ``gradnorm``
are closed forms of last-layer gradient statistics as well; the tests check all of them
against ``torch.autograd`` run on the definitions. Two of the served signs carry caveats
stated in their docstrings: gradtrust also rises for a strongly *negative* logit and is
not shift-invariant, and gradnorm scales with the feature magnitude ``||h||_1``.

Degenerate inputs, by design:

- **Non-finite logits** (NaN, +-inf) are refused: :func:`as_logits` raises
  :class:`~gradtrust.errors.InvalidInputError` naming the offending sample rows. A
  score is never NaN.
- **C < 2**, a non-2-D array or a non-numeric dtype is refused the same way.
- **N = 0** is valid: every score is an empty float64 array.
- **All logits equal**: p is uniform, so msp = 1/C, entropy = -log C, margin = 0 and
  contrast_trust = 1 (all minimum trust); gradtrust = 1 (its minimum), and when every
  ``a_c`` is exactly 0 (all logits equal to 1/C), where the definition is 0/0,
  gradtrust is *defined* as 1.0.
- **C = 2**: contrast_trust uses k = 1 and equals ``exp(2 (z_P - z_Q))``.
- **Huge logit gaps** (1e3, 1e30): every score stays finite. contrast_trust grows like
  ``exp(2 gap)``; where its true value exceeds the float64 range it saturates at
  ``np.finfo(np.float64).max``.
- **Ties** for the largest logit: P is the lowest tied index (:func:`predicted_class`).
  No score depends on how ties are broken, only on the tied values.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gradtrust.errors import InvalidInputError

Floats = NDArray[np.float64]

SCORE_NAMES: tuple[str, ...] = (
    "gradtrust",
    "contrast_trust",
    "msp",
    "entropy",
    "margin",
    "max_logit",
    "energy",
    "gradnorm",
)
"""Every score :func:`compute_scores` knows, in a stable order."""

NEEDS_FEATURES: frozenset[str] = frozenset({"gradnorm"})
"""Scores that also need the penultimate features ``h``, not just the logits."""

_FLOAT64_MAX = float(np.finfo(np.float64).max)
_MAX_ROWS_NAMED = 10


def _numeric_float64(values: ArrayLike, what: str) -> Floats:
    """Convert to a fresh float64 array, refusing dtypes that are not real numbers."""
    try:
        raw = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"{what} must be a numeric array; could not read it: {exc}"
        ) from exc
    if raw.dtype.kind not in "iuf":
        raise InvalidInputError(
            f"{what} must hold real numbers (integer or float), got dtype {raw.dtype}; "
            "send float32 or float64 values"
        )
    return np.array(raw, dtype=np.float64, copy=True)


def _refuse_non_finite(values: Floats, what: str) -> None:
    """Raise naming the sample rows of a 2-D array that hold NaN or infinity."""
    finite_rows = np.isfinite(values).all(axis=1)
    if finite_rows.all():
        return
    bad = np.flatnonzero(~finite_rows)
    named = ", ".join(str(i) for i in bad[:_MAX_ROWS_NAMED])
    more = f" and {bad.size - _MAX_ROWS_NAMED} more" if bad.size > _MAX_ROWS_NAMED else ""
    raise InvalidInputError(
        f"{what} hold NaN or infinite values in sample row(s) {named}{more} "
        f"({bad.size} of {values.shape[0]}); fix or drop those samples before scoring"
    )


def as_logits(logits: ArrayLike) -> Floats:
    """Validate a batch of logits and return a float64 copy (the caller's array is never touched).

    Accepts shape (N, C) with N >= 0 and C >= 2, every value finite. Raises
    :class:`InvalidInputError` saying what is wrong (and which rows are non-finite).
    """
    z = _numeric_float64(logits, "logits")
    if z.ndim != 2:
        hint = "; for one sample pass logits[None, :]" if z.ndim == 1 else ""
        raise InvalidInputError(
            f"logits must be 2-D with shape (batch, classes), got shape {z.shape}{hint}"
        )
    if z.shape[1] < 2:
        raise InvalidInputError(
            f"logits must have at least 2 classes to score a prediction, got shape {z.shape}"
        )
    _refuse_non_finite(z, "logits")
    return z


def _as_features(features: ArrayLike, n: int) -> Floats:
    """Validate penultimate features: shape (N, D), D >= 1, finite, N matching the logits."""
    h = _numeric_float64(features, "features")
    if h.ndim != 2 or h.shape[1] < 1:
        raise InvalidInputError(
            f"features must be 2-D with shape (batch, dims), D >= 1, got shape {h.shape}; "
            "flatten the penultimate activations per sample"
        )
    if h.shape[0] != n:
        raise InvalidInputError(
            f"features have {h.shape[0]} samples but logits have {n}; send one feature row "
            "per logit row"
        )
    _refuse_non_finite(h, "features")
    return h


@dataclass(frozen=True)
class _Batch:
    """Validated logits and the softmax pieces every score shares (computed once)."""

    z: Floats  # (N, C) logits
    pred: NDArray[np.intp]  # (N,) P = argmax z, lowest index on ties
    shifted_exp: Floats  # (N, C) s_c = exp(z_c - z_P), so s_P = 1
    total: Floats  # (N,) Z = sum_c s_c, in [1, C]
    p: Floats  # (N, C) softmax
    log_p: Floats  # (N, C) log-softmax
    lse: Floats  # (N,) logsumexp(z)

    @classmethod
    def of(cls, z: Floats) -> _Batch:
        pred = np.argmax(z, axis=1)
        z_max = np.take_along_axis(z, pred[:, None], axis=1)
        # A finite z can still span more than the float64 range: the difference then
        # overflows to -inf, whose exp is the correct 0.
        with np.errstate(over="ignore"):
            shifted = z - z_max
        s = np.exp(shifted)
        total = s.sum(axis=1)
        log_total = np.log(total)
        return cls(
            z=z,
            pred=pred,
            shifted_exp=s,
            total=total,
            p=s / total[:, None],
            log_p=shifted - log_total[:, None],
            lse=z_max[:, 0] + log_total,
        )


def softmax(logits: ArrayLike) -> Floats:
    """Numerically stable softmax over classes, float64, shape (N, C)."""
    return _Batch.of(as_logits(logits)).p


def predicted_class(logits: ArrayLike) -> NDArray[np.intp]:
    """The prediction P = argmax z per sample; ties go to the lowest class index."""
    return np.argmax(as_logits(logits), axis=1)


def _gradtrust(z: Floats) -> Floats:
    c = z.shape[1]
    a = z - 1.0 / c
    # Scale by max|a| so a^4 cannot overflow (or underflow to 0/0); the max then is
    # exactly 1 and the score is 1 / mean_c b^4.
    scale = np.abs(a).max(axis=1, keepdims=True)
    all_zero = scale[:, 0] == 0.0
    b = a / np.where(scale == 0.0, 1.0, scale)
    b2 = b * b  # b**4 would go through np.power's slow general path
    mean_b4 = np.mean(b2 * b2, axis=1)
    score = 1.0 / np.where(all_zero, 1.0, mean_b4)
    return np.clip(score, 1.0, float(c))


def gradtrust(logits: ArrayLike) -> Floats:
    """GradTrust: how concentrated the last-layer MSE-to-1/C gradient is in one class row.

    Definition (released GradTrust code): ``L = mean_c (z_c - 1/C)^2``,
    ``G = dL/dW``, ``e_c`` = unbiased variance over j of ``G_cj^2``, score
    ``max_c e_c / mean_c e_c``. Closed form ``max_c a_c^4 / mean_c a_c^4`` with
    ``a = z - 1/C`` (the feature factor cancels). Range [1, C]; higher = more trust,
    as its authors use it. Honest caveats: a large *negative* logit raises it just as a
    large positive one does, and, unlike softmax, it changes when a constant is added
    to all logits. All ``a_c`` equal gives 1; all ``a_c == 0`` (0/0) is defined as 1.0.
    """
    return _gradtrust(as_logits(logits))


def _check_k(k: int) -> int:
    try:
        k_int = operator.index(k)
    except TypeError as exc:
        raise InvalidInputError(f"contrast k must be an integer, got {k!r}") from exc
    if k_int < 1:
        raise InvalidInputError(f"contrast k must be at least 1, got {k_int}")
    return k_int


def _top_logits(z: Floats, m: int) -> Floats:
    """The m largest logit values per sample, descending (one partition, shared by scores)."""
    c = z.shape[1]
    return -np.sort(-np.partition(z, c - m, axis=1)[:, c - m :], axis=1)


def _contrast_trust(batch: _Batch, k: int, top: Floats | None = None) -> Floats:
    z, s = batch.z, batch.shifted_exp
    n, c = z.shape
    k = min(k, c - 1)
    if n == 0:
        return np.empty(0, dtype=np.float64)
    # The k+1 largest logit values, descending: P's value, then Q_1..Q_k. Only values
    # matter, so tie-breaking between equal logits cannot change the score.
    top = _top_logits(z, k + 1) if top is None else top[:, : k + 1]
    z_p, z_q = top[:, :1], top[:, 1:]
    with np.errstate(over="ignore"):  # spans beyond float64 give -inf, whose exp is 0
        s_q = np.exp(z_q - z_p)  # (N, k), in [0, 1]
        rest = z - z_q[:, :1]
        gap = z_p[:, 0] - z_q[:, 0]
    # Z^2 ||p - e_q||^2 = (Z - s_q)^2 + sum_{c != q} s_c^2, with no 1 - p_P cancellation.
    sum_sq = np.einsum("nc,nc->n", s, s)[:, None]
    numer = np.mean((batch.total[:, None] - s_q) ** 2 + (sum_sq - s_q**2), axis=1)
    # Z^2 ||p - e_P||^2 = (sum_{c != P} s_c)^2 + sum_{c != P} s_c^2. Those s_c may
    # underflow, so rescale them by s_Q1 = exp(-gap) and put exp(2 gap) back at the end.
    np.put_along_axis(rest, batch.pred[:, None], -np.inf, axis=1)
    t = np.exp(rest)  # t_c = s_c / s_Q1 for c != P, largest exactly 1
    denom = t.sum(axis=1) ** 2 + np.einsum("nc,nc->n", t, t)  # >= 2
    with np.errstate(over="ignore"):
        score = (numer / denom) * np.exp(2.0 * gap)
    return np.where(np.isfinite(score), np.maximum(score, 1.0), _FLOAT64_MAX)


def contrast_trust(logits: ArrayLike, k: int = 3) -> Floats:
    """Counterfactual GradTrust: contrast-class gradient spread over the predicted one's.

    ``mean_{k} ||p - e_Qk||^2 / ||p - e_P||^2``, the ratio of population variances of the
    last-layer cross-entropy gradients ``(p - e_q) h^T`` towards each of the k most
    probable classes after P and towards P itself (``||h||`` cancels). k defaults to 3,
    is capped at C - 1, and k < 1 raises :class:`InvalidInputError`. Range
    [1, float64 max]; higher = more trust (1 when the contrast classes are as probable
    as P). It grows like ``exp(2 (z_P - z_Q1))``; where that exceeds float64 the score
    saturates at ``np.finfo(np.float64).max`` instead of becoming inf.
    """
    k = _check_k(k)
    return _contrast_trust(_Batch.of(as_logits(logits)), k)


def _msp(batch: _Batch) -> Floats:
    return np.take_along_axis(batch.p, batch.pred[:, None], axis=1)[:, 0]


def msp(logits: ArrayLike) -> Floats:
    """Maximum softmax probability ``max_c p_c``. Range [1/C, 1]; higher = more trust."""
    return _msp(_Batch.of(as_logits(logits)))


def _entropy(batch: _Batch) -> Floats:
    # p_c = 0 only where log p_c may be -inf (extreme spans): 0 log 0 is taken as 0.
    with np.errstate(invalid="ignore"):
        terms = np.where(batch.p > 0.0, batch.p * batch.log_p, 0.0)
    return terms.sum(axis=1)


def entropy(logits: ArrayLike) -> Floats:
    """Negative Shannon entropy ``sum_c p_c log p_c`` (nats, 0 log 0 = 0).

    Range [-log C, 0]; higher = more trust (0 for a one-hot prediction).
    """
    return _entropy(_Batch.of(as_logits(logits)))


def _margin(batch: _Batch, top: Floats | None = None) -> Floats:
    # p is monotone in z, so the two largest logits name the two largest probabilities:
    # p_(1) = s_P / Z = 1 / Z and p_(2) = exp(z_(2) - z_(1)) / Z, the same floats as in p.
    top = _top_logits(batch.z, 2) if top is None else top
    with np.errstate(over="ignore"):  # spans beyond float64 give -inf, whose exp is 0
        second = np.exp(top[:, 1] - top[:, 0])
    return 1.0 / batch.total - second / batch.total


def margin(logits: ArrayLike) -> Floats:
    """Gap between the two largest probabilities ``p_(1) - p_(2)``.

    Range [0, 1]; higher = more trust (0 when the top two classes tie).
    """
    return _margin(_Batch.of(as_logits(logits)))


def max_logit(logits: ArrayLike) -> Floats:
    """The predicted class's logit ``z_P``.

    Any real value; higher = more trust. It lives on the model's logit scale, so it is
    comparable only within one model (shifting all logits shifts it).
    """
    z = as_logits(logits)
    return z.max(axis=1)


def energy(logits: ArrayLike) -> Floats:
    """Negative free energy ``logsumexp(z)`` at temperature 1.

    In [max_c z_c, max_c z_c + log C]; higher = more trust. Like max_logit it is on the
    model's logit scale and comparable only within one model.
    """
    return _Batch.of(as_logits(logits)).lse


def _gradnorm(p: Floats, h: Floats, temperature: float) -> Floats:
    c = p.shape[1]
    return np.abs(c * p - 1.0).sum(axis=1) * np.abs(h).sum(axis=1) / temperature


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (np.isfinite(t) and t > 0.0):
        raise InvalidInputError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def gradnorm(logits: ArrayLike, features: ArrayLike, temperature: float = 1.0) -> Floats:
    """GradNorm (Huang et al. 2021): L1 norm of the last-layer gradient of a KL-to-uniform loss.

    The loss ``sum_c -log softmax(z/T)_c`` has ``dL/dW = (1/T)(C p - 1) h^T``, whose L1
    norm is ``(1/T) ||C p - 1||_1 ||h||_1`` with ``p = softmax(z/T)``; ``features`` are
    the penultimate activations h, shape (N, D). Range [0, 2(C-1)/T * ||h||_1];
    higher = more trust in the sense of its paper (more in-distribution-like). Honest
    caveat: the ``||h||_1`` factor makes it grow with the feature magnitude, not only with
    confidence, so it ranks samples of one model but has no fixed scale, and a sample
    with unusually large features can outrank a more confident one.
    """
    z = as_logits(logits)
    h = _as_features(features, z.shape[0])
    t = _check_temperature(temperature)
    with np.errstate(over="ignore"):
        scaled = z / t
    if not np.isfinite(scaled).all():
        raise InvalidInputError(
            f"logits / temperature overflow float64 at temperature {t!r}; use a larger temperature"
        )
    return _gradnorm(_Batch.of(scaled).p, h, t)


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise InvalidInputError(
            f"names must be a sequence of score names, not one string; pass [{names!r}]"
        )
    wanted = list(names)
    unknown = [name for name in wanted if name not in SCORE_NAMES]
    if unknown:
        raise InvalidInputError(
            f"unknown score name(s) {', '.join(map(repr, unknown))}; "
            f"valid names are: {', '.join(SCORE_NAMES)}"
        )
    return wanted


def compute_scores(
    logits: ArrayLike,
    names: Sequence[str],
    features: ArrayLike | None = None,
    contrast_k: int = 3,
) -> dict[str, Floats]:
    """Compute the named scores for a batch, validating once and sharing the softmax.

    This is the serving hot path: logits are checked once, softmax/log-softmax are
    computed once, and each requested score costs only its own O(N C) step. Returns
    ``{name: (N,) float64}`` in the order requested (duplicates collapse). Unknown names,
    or ``"gradnorm"`` without ``features``, raise :class:`InvalidInputError`; features
    are validated only when a score needs them. gradnorm uses temperature 1.
    """
    wanted = _check_names(names)
    needs_h = NEEDS_FEATURES.intersection(wanted)
    if needs_h and features is None:
        raise InvalidInputError(
            f"score(s) {', '.join(sorted(needs_h))} need the penultimate features; "
            "pass features=(N, D) array or drop those names"
        )
    k = _check_k(contrast_k)
    z = as_logits(logits)
    h = _as_features(features, z.shape[0]) if needs_h and features is not None else None
    batch = _Batch.of(z)
    top = None
    if "contrast_trust" in wanted or "margin" in wanted:
        top = _top_logits(z, max(2, min(k, z.shape[1] - 1) + 1))

    out: dict[str, Floats] = {}
    for name in wanted:
        if name in out:
            continue
        if name == "gradtrust":
            out[name] = _gradtrust(z)
        elif name == "contrast_trust":
            out[name] = _contrast_trust(batch, k, top)
        elif name == "msp":
            out[name] = _msp(batch)
        elif name == "entropy":
            out[name] = _entropy(batch)
        elif name == "margin":
            out[name] = _margin(batch, top)
        elif name == "max_logit":
            out[name] = np.take_along_axis(z, batch.pred[:, None], axis=1)[:, 0]
        elif name == "energy":
            out[name] = batch.lse
        elif name == "gradnorm" and h is not None:
            out[name] = _gradnorm(batch.p, h, 1.0)
    return out
