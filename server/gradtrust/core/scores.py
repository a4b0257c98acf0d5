"""Per-sample trust scores computed from a classifier's logits (and, for one, its features).

The classifier is assumed to end in a linear head ``z = W h + b`` (``W`` is C x D).
Every function takes a batch of logits of shape (N, C), works in float64 and returns
one value per sample: no reduction ever mixes two samples, so a sample's score does
not depend on the rest of its batch. Every score is served so that **higher = more
trust**. With ``p = softmax(z)``, ``P = argmax z`` and ``Q_1, Q_2, ...`` the other
classes from most to least probable:

================== ======================================================= ===============
score              definition                                              range
================== ======================================================= ===============
gradtrust          ``log( mean_k ||p - e_Qk||^2 / ||p - e_P||^2 )``,       [0, 9e307]
                   k = 3 (:data:`GRADTRUST_K`, capped at C-1)
gradtrust_released ``max_c a_c^4 / mean_c a_c^4`` with ``a = z - 1/C``    [1, C]
contrast_trust     ``mean_k ||p - e_Qk||^2 / ||p - e_P||^2`` (k = 3 by      [1, float64 max]
                   default, the config/request parameter ``contrast_k``)
msp                ``max_c p_c``                                           [1/C, 1]
entropy            ``sum_c p_c log p_c`` (negative entropy)                [-log C, 0]
margin             ``p_(1) - p_(2)``                                       [0, 1]
max_logit          ``z_P``                                                 any real
energy             ``logsumexp(z)`` (temperature 1)                        any real
gradnorm           ``(1/T) ||C softmax(z/T) - 1||_1 ||h||_1`` (features)   [0, 2(C-1)/T ||h||_1]
================== ======================================================= ===============

**gradtrust**, the headline score (the ``GRADTRUST`` output), is the tutorial's
counterfactual GradTrust: the variance of the last-layer cross-entropy gradient
``(p - e_q) h^T`` towards the k most probable other classes, over its variance towards
the prediction itself (``||h||`` cancels), served as its natural logarithm. It depends on
the logits only through the softmax, so adding a constant to every logit (which
cross-entropy training leaves free) cannot change it; the log keeps confident predictions
apart (it grows like ``2 (z_P - z_Q1)``) where the ratio itself overflows float32 at a logit
gap of about 45. It is computed from the factored softmax below, never forming
``1 - p_P``. The value 0 means the contrast classes are as probable as P.

**gradtrust_released** is the closed form of the authors' released code (variance of
squared last-layer gradients of an MSE-to-1/C loss, max over mean of the class rows).
Until this definition changed it was the headline; it is kept by name because it is the
published one, but it **depends on the logit offset**: it reads the raw logits against
1/C, so adding a constant to all logits changes it, and on models trained with plain
cross-entropy it can rank right vs wrong predictions worse than chance (numbers in
``docs/EVALUATION.md``). ``contrast_trust`` is the ratio inside ``gradtrust`` with a
configurable k; it saturates at float64's (and, served, float32's) maximum.
The tests check every closed form against ``torch.autograd`` run on the definitions.

Degenerate inputs, by design:

- **Non-finite logits** (NaN, +-inf) are refused: :func:`as_logits` raises
  :class:`~gradtrust.errors.InvalidInputError` naming the offending sample rows. A
  score is never NaN.
- **C < 2**, a non-2-D array or a non-numeric dtype is refused the same way.
- **N = 0** is valid: every score is an empty float64 array.
- **All logits equal**: p is uniform, so gradtrust = 0, contrast_trust = 1, msp = 1/C,
  entropy = -log C, margin = 0 (all minimum trust); gradtrust_released = 1 (its
  minimum), and when every ``a_c`` is exactly 0 (all logits equal to 1/C), where its
  definition is 0/0, it is *defined* as 1.0.
- **C = 2**: gradtrust = ``2 (z_P - z_Q)`` and contrast_trust = ``exp(2 (z_P - z_Q))``.
- **Huge logit gaps** (1e3, 1e30): every score stays finite. gradtrust grows like
  ``2 gap`` with no tie among confident predictions; only beyond a gap of
  ``float64 max / 4`` (4.5e307) does it saturate, at about 9e307 (served as float32,
  GRADTRUST is clipped to 3.4e38, reached only past a gap of 1.7e38). contrast_trust
  saturates at ``np.finfo(np.float64).max`` where its true value exceeds float64.
- **Ties** for the largest logit: P is the lowest tied index (:func:`predicted_class`).
  No score depends on how ties are broken, only on the tied values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

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
    "gradtrust_released",
)
"""Every score :func:`compute_scores` knows, in a stable order (new names go last, so the
columns of existing score lists keep their positions)."""

GRADTRUST_K = 3
"""How many counterfactual classes the headline ``gradtrust`` averages over (capped at
C - 1). Fixed, unlike ``contrast_k``: a model's low-trust threshold and trust calibration
are fitted to one definition, so no request or config can change it."""

NEEDS_FEATURES: frozenset[str] = frozenset({"gradnorm"})
"""Scores that also need the penultimate features ``h``, not just the logits."""

_FLOAT64_MAX = float(np.finfo(np.float64).max)
_SMALLEST_NORMAL = float(np.finfo(np.float64).tiny)
_MAX_ROWS_NAMED = 10
# exp(-x) is exactly 0.0 in float64 for x beyond about 745, so capping a logit difference
# at this size changes no probability; it only keeps products such as 0 * span finite
# where a span overflowed float64 to inf.
_SPAN_CAP = 1e4
# compute_scores works through big batches this many values at a time, so that each
# (rows, C) float64 temporary stays under 128 KiB: mostly in cache, and below glibc's
# default threshold above which every allocation maps fresh pages (measured 2x slower).
_BLOCK_VALUES = 16384
# gradtrust adds 2 (z_P - z_Q1) to bounded terms; capping the gap here keeps that finite
# (about 9e307 at most) even for logits that span more than float64.
_LOG_GAP_CAP = _FLOAT64_MAX / 4.0


def _numeric_float64(values: ArrayLike, what: str, copy: bool) -> Floats:
    """Convert to float64 (copying only if asked or needed), refusing non-real dtypes."""
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
    return raw.astype(np.float64, copy=copy)


def _refuse_non_finite(values: Floats, what: str) -> None:
    """Raise naming the sample rows of a 2-D array that hold NaN or infinity."""
    if np.isfinite(values).all():  # the common case: one pass, no per-row work
        return
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    named = ", ".join(str(i) for i in bad[:_MAX_ROWS_NAMED])
    more = f" and {bad.size - _MAX_ROWS_NAMED} more" if bad.size > _MAX_ROWS_NAMED else ""
    raise InvalidInputError(
        f"{what} hold NaN or infinite values in sample row(s) {named}{more} "
        f"({bad.size} of {values.shape[0]}); fix or drop those samples before scoring"
    )


def _logits(logits: ArrayLike, copy: bool) -> Floats:
    """Validated (N, C) float64 logits; without copy, possibly the caller's own array."""
    z = _numeric_float64(logits, "logits", copy)
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


def as_logits(logits: ArrayLike) -> Floats:
    """Validate a batch of logits and return a float64 copy (the caller's array is never touched).

    Accepts shape (N, C) with N >= 0 and C >= 2, every value finite. Raises
    :class:`InvalidInputError` saying what is wrong (and which rows are non-finite).
    """
    return _logits(logits, copy=True)


def _as_features(features: ArrayLike, n: int) -> Floats:
    """Validate penultimate features: shape (N, D), D >= 1, finite, N matching the logits."""
    h = _numeric_float64(features, "features", copy=False)
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


class _Softmax(NamedTuple):
    """softmax(z) factored around the two largest logits, computed once per batch.

    With P the prediction and Q1 the runner-up, ``p_P = 1 / Z`` and ``p_c = r t_c / Z``
    for c != P, where ``r = exp(-(z_P - z_Q1))``, ``t_c = exp(z_c - z_Q1)`` in [0, 1]
    and ``Z = 1 + r T1``, ``T1 = sum_{c != P} t_c >= 1``. Every score reads what it
    needs from these with no cancellation: the non-P classes keep their relative
    precision even where r underflows (huge gaps), and ``1 - p_P`` is never formed.
    P's own column of ``t`` is 0, so sums over ``t`` are sums over c != P.
    """

    top: Floats  # (N, m) the m largest logits, descending: z_P, z_Q1, ...
    gap: Floats  # (N,) z_P - z_Q1 >= 0, capped at _SPAN_CAP
    r: Floats  # (N,) exp(-gap) = p_Q1 / p_P, in [0, 1]
    t: Floats  # (N, C) t_c, and 0 at P
    log_t: Floats  # (N, C) z_c - z_Q1 <= 0 (-inf where it overflowed), -_SPAN_CAP at P
    t_sum: Floats  # (N,) T1
    total: Floats  # (N,) Z = sum_c exp(z_c - z_P), in [1, C]
    log_total: Floats  # (N,) log Z

    @classmethod
    def of(cls, z: Floats, m: int) -> _Softmax:
        """Factor softmax(z) and keep the m >= 2 largest logits (one partition).

        Run under ``np.errstate(over="ignore")``: a finite z can still span more than
        the float64 range, and those differences overflow to -inf, whose exp is the
        correct 0.
        """
        n, c = z.shape
        # Values only: with tied logits, which tied class is P cannot change a score.
        top = np.sort(np.partition(z, c - m, axis=1)[:, c - m :], axis=1)[:, ::-1]
        log_t = z - top[:, 1:2]
        # Exclude P: exp(-_SPAN_CAP) is 0, and 0 * log t stays 0 there (0 * -inf would not).
        log_t[np.arange(n), np.argmax(z, axis=1)] = -_SPAN_CAP
        t = np.exp(log_t)
        t_sum = t.sum(axis=1)
        gap = np.minimum(top[:, 0] - top[:, 1], _SPAN_CAP)
        r = np.exp(-gap)
        rest = r * t_sum  # (1 - p_P) Z, formed without cancellation
        return cls(
            top=top,
            gap=gap,
            r=r,
            t=t,
            log_t=log_t,
            t_sum=t_sum,
            total=1.0 + rest,
            log_total=np.log1p(rest),
        )


def softmax(logits: ArrayLike) -> Floats:
    """Numerically stable softmax over classes, float64, shape (N, C)."""
    z = _logits(logits, copy=False)
    with np.errstate(over="ignore"):  # spans beyond float64 give -inf, whose exp is 0
        p = z - z.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)
    return p


def predicted_class(logits: ArrayLike) -> NDArray[np.intp]:
    """The prediction P = argmax z per sample; ties go to the lowest class index."""
    return np.argmax(_logits(logits, copy=False), axis=1)


def _gradtrust_released(z: Floats) -> Floats:
    c = z.shape[1]
    b = z - 1.0 / c
    # Divide by max|a| so a^4 cannot overflow (or underflow to 0/0): every |b| <= 1 and
    # the largest is exactly 1, so sum_c b^4 lies in [1, C] and C / sum is in [1, C]
    # with no clipping. The floor on the scale lies far below any nonzero |a_c|, so it
    # only keeps a row with every a_c == 0 at b = 0; such a row is then defined as 1.
    scale = np.abs(b).max(axis=1, keepdims=True)
    b /= np.maximum(scale, _SMALLEST_NORMAL)
    np.square(b, out=b)
    sum_b4 = np.einsum("nc,nc->n", b, b)
    if not sum_b4.all():
        sum_b4[sum_b4 == 0.0] = c
    return c / sum_b4


def gradtrust_released(logits: ArrayLike) -> Floats:
    """GradTrust as the authors' released code computes it (offset-dependent; not the headline).

    Definition: ``L = mean_c (z_c - 1/C)^2``, ``G = dL/dW``, ``e_c`` = unbiased variance
    over j of ``G_cj^2``, score ``max_c e_c / mean_c e_c``. Closed form
    ``max_c a_c^4 / mean_c a_c^4`` with ``a = z - 1/C`` (the feature factor cancels).
    Range [1, C]; higher = more trust, as its authors use it. Caveats, measured: it
    changes when a constant is added to all logits (which softmax and cross-entropy
    ignore), so how well it ranks errors depends on where training left the logit level;
    and a large *negative* logit raises it just as a large positive one does. All ``a_c``
    equal gives 1; all ``a_c == 0`` (0/0) is defined as 1.0.
    """
    return compute_scores(logits, ["gradtrust_released"])["gradtrust_released"]


def _check_k(k: int) -> int:
    try:
        k_int = operator.index(k)
    except TypeError as exc:
        raise InvalidInputError(f"contrast k must be an integer, got {k!r}") from exc
    if k_int < 1:
        raise InvalidInputError(f"contrast k must be at least 1, got {k_int}")
    return k_int


def _contrast_trust(sm: _Softmax, k: int) -> Floats:
    # Write s_c = exp(z_c - z_P) (s_P = 1, else r t_c) and S2 = sum_c s_c^2 = 1 + r^2 T2,
    # T2 = sum_{c != P} t_c^2. Multiplied by Z^2:
    #   ||p - e_q||^2 -> (Z - s_q)^2 + S2 - s_q^2, whose mean over Q_1..Q_k is
    #                    Z (Z - 2 mean_k s_Qk) + S2   (Z - 2 mean_k s_Qk >= 1 - s_Q1 >= 0);
    #   ||p - e_P||^2 -> (Z - 1)^2 + S2 - 1 = r^2 (T1^2 + T2), never forming 1 - p_P.
    # The ratio's r^-2 = exp(2 gap) comes last, as exp(gap) twice, so it overflows only
    # where the score itself does, and then saturates.
    top, total, r = sm.top, sm.total, sm.r
    t_sq = np.einsum("nc,nc->n", sm.t, sm.t)  # T2 >= 1
    s_q_sum = np.exp(top[:, 1 : k + 1] - top[:, :1]).sum(axis=1)
    numer = total * (total - (2.0 / k) * s_q_sum) + (1.0 + r * r * t_sq)
    e_gap = np.exp(sm.gap)
    score = numer / (sm.t_sum * sm.t_sum + t_sq) * e_gap * e_gap
    return np.minimum(np.maximum(score, 1.0), _FLOAT64_MAX)


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
    return compute_scores(logits, ["contrast_trust"], contrast_k=k)["contrast_trust"]


def _log_gradtrust(sm: _Softmax, k: int) -> Floats:
    # log of the contrast_trust ratio (see _contrast_trust for the algebra), summed in the
    # log domain: log(mean_k ||p - e_Qk||^2 Z^2) - log(T1^2 + T2) + 2 (z_P - z_Q1). Both
    # logs take values >= 1, and the uncapped gap enters linearly, so the result neither
    # overflows nor ties for confident predictions.
    top, total, r = sm.top, sm.total, sm.r
    t_sq = np.einsum("nc,nc->n", sm.t, sm.t)  # T2 >= 1
    s_q_sum = np.exp(top[:, 1 : k + 1] - top[:, :1]).sum(axis=1)
    numer = total * (total - (2.0 / k) * s_q_sum) + (1.0 + r * r * t_sq)
    gap = np.minimum(top[:, 0] - top[:, 1], _LOG_GAP_CAP)  # inf (span overflow) -> cap
    score = np.log(numer) - np.log(sm.t_sum * sm.t_sum + t_sq) + 2.0 * gap
    return np.maximum(score, 0.0)  # the ratio is >= 1; rounding must not dip below 0


def gradtrust(logits: ArrayLike) -> Floats:
    """GradTrust, the headline score: log of the counterfactual gradient-variance ratio.

    ``log( mean_k ||p - e_Qk||^2 / ||p - e_P||^2 )`` over the k = :data:`GRADTRUST_K`
    most probable classes Q_k after P (capped at C - 1): the variance of the last-layer
    cross-entropy gradient ``(p - e_q) h^T`` towards each counterfactual class over the
    variance towards the prediction (``||h||`` cancels). Range [0, ~9e307]; higher = more
    trust; 0 when the contrast classes are as probable as P. Unchanged by adding a
    constant to every logit. It grows like ``2 (z_P - z_Q1)``, so confident predictions
    keep distinct finite values (the ratio itself would overflow float32 past a gap of
    about 45).
    """
    return compute_scores(logits, ["gradtrust"])["gradtrust"]


def msp(logits: ArrayLike) -> Floats:
    """Maximum softmax probability ``max_c p_c``. Range [1/C, 1]; higher = more trust."""
    return compute_scores(logits, ["msp"])["msp"]


def _entropy(sm: _Softmax) -> Floats:
    # sum_c p_c log p_c = -(log Z + (r / Z) sum_{c != P} t_c (gap - log t_c)): both terms
    # are >= 0, so nothing cancels. A p_c that underflows to 0 contributes 0 (0 log 0 = 0).
    t_log_t = np.einsum("nc,nc->n", sm.t, sm.log_t)
    if not np.isfinite(t_log_t).all():  # 0 * -inf where a span overflowed float64
        t_log_t = np.einsum("nc,nc->n", sm.t, np.maximum(sm.log_t, -_SPAN_CAP))
    spread = (sm.gap * sm.t_sum - t_log_t) * (sm.r / sm.total)
    return 0.0 - (sm.log_total + spread)  # 0.0 - x, not -x: a one-hot row gives 0.0, not -0.0


def entropy(logits: ArrayLike) -> Floats:
    """Negative Shannon entropy ``sum_c p_c log p_c`` (nats, 0 log 0 = 0).

    Range [-log C, 0]; higher = more trust (0 for a one-hot prediction).
    """
    return compute_scores(logits, ["entropy"])["entropy"]


def _margin(sm: _Softmax) -> Floats:
    # p_(1) - p_(2) = (1 - r) / Z; expm1 keeps 1 - r exact for nearly tied classes.
    return -np.expm1(-sm.gap) / sm.total


def margin(logits: ArrayLike) -> Floats:
    """Gap between the two largest probabilities ``p_(1) - p_(2)``.

    Range [0, 1]; higher = more trust (0 when the top two classes tie).
    """
    return compute_scores(logits, ["margin"])["margin"]


def max_logit(logits: ArrayLike) -> Floats:
    """The predicted class's logit ``z_P``.

    Any real value; higher = more trust. It lives on the model's logit scale, so it is
    comparable only within one model (shifting all logits shifts it).
    """
    return compute_scores(logits, ["max_logit"])["max_logit"]


def energy(logits: ArrayLike) -> Floats:
    """Negative free energy ``logsumexp(z)`` at temperature 1.

    In [max_c z_c, max_c z_c + log C]; higher = more trust. Like max_logit it is on the
    model's logit scale and comparable only within one model.
    """
    return compute_scores(logits, ["energy"])["energy"]


def _softmax_l1(sm: _Softmax) -> Floats:
    """``||C p - 1||_1`` from the factored softmax, never negative.

    In units of Z the terms are ``x_c = C r t_c - Z`` for c != P and ``C - Z >= 0`` for
    P. The array below holds ``-Z`` at P (t_P = 0), so ``sum |x| - Z`` (>= 0 in floating
    point too) is the sum over c != P.
    """
    c = sm.t.shape[1]
    x = sm.t * (c * sm.r)[:, None]
    x -= sm.total[:, None]
    np.abs(x, out=x)
    return ((x.sum(axis=1) - sm.total) + (c - sm.total)) / sm.total


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
    z = _logits(logits, copy=False)
    h = _as_features(features, z.shape[0])
    t = _check_temperature(temperature)
    with np.errstate(over="ignore"):  # see _Softmax.of
        scaled = z / t
        if not np.isfinite(scaled).all():
            raise InvalidInputError(
                f"logits / temperature overflow float64 at temperature {t!r}; "
                "use a larger temperature"
            )
        return _softmax_l1(_Softmax.of(scaled, 2)) * np.abs(h).sum(axis=1) / t


def _check_names(names: Sequence[str]) -> list[str]:
    """The requested names, validated, in order, duplicates dropped."""
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
    return list(dict.fromkeys(wanted))


def _score_block(z: Floats, h: Floats | None, wanted: list[str], k: int) -> dict[str, Floats]:
    """The wanted scores of validated rows; k is already capped at C - 1.

    Run under ``np.errstate(over="ignore")``, as :meth:`_Softmax.of` explains.
    """
    out: dict[str, Floats] = {}
    if "gradtrust_released" in wanted:
        out["gradtrust_released"] = _gradtrust_released(z)
    if len(out) < len(wanted):
        k_headline = min(GRADTRUST_K, z.shape[1] - 1)
        m = 2
        if "contrast_trust" in wanted:
            m = max(m, k + 1)
        if "gradtrust" in wanted:
            m = max(m, k_headline + 1)
        sm = _Softmax.of(z, m)
        for name in wanted:
            if name == "gradtrust":
                out[name] = _log_gradtrust(sm, k_headline)
            elif name == "contrast_trust":
                out[name] = _contrast_trust(sm, k)
            elif name == "msp":
                out[name] = 1.0 / sm.total
            elif name == "entropy":
                out[name] = _entropy(sm)
            elif name == "margin":
                out[name] = _margin(sm)
            elif name == "max_logit":
                out[name] = sm.top[:, 0]
            elif name == "energy":
                out[name] = sm.top[:, 0] + sm.log_total
            elif name == "gradnorm" and h is not None:
                out[name] = _softmax_l1(sm) * np.abs(h).sum(axis=1)
    return {name: out[name] for name in wanted}


def compute_scores(
    logits: ArrayLike,
    names: Sequence[str],
    features: ArrayLike | None = None,
    contrast_k: int = 3,
) -> dict[str, Floats]:
    """Compute the named scores for a batch, validating once and sharing the softmax.

    This is the serving hot path: logits are checked once (and not copied when already
    float64), the softmax is factored once, and each requested score costs only its own
    O(N C) step; big batches go through in cache-sized row blocks. Returns
    ``{name: (N,) float64}`` in the order requested (duplicates collapse). Unknown names,
    or ``"gradnorm"`` without ``features``, raise :class:`InvalidInputError`; features
    are validated only when a score needs them. gradnorm uses temperature 1;
    ``contrast_k`` applies to ``contrast_trust`` only (``gradtrust`` always uses
    :data:`GRADTRUST_K`).
    """
    wanted = _check_names(names)
    needs_h = NEEDS_FEATURES.intersection(wanted)
    if needs_h and features is None:
        raise InvalidInputError(
            f"score(s) {', '.join(sorted(needs_h))} need the penultimate features; "
            "pass features=(N, D) array or drop those names"
        )
    k = _check_k(contrast_k)
    z = _logits(logits, copy=False)
    h = _as_features(features, z.shape[0]) if needs_h and features is not None else None
    return _compute_validated(z, h, wanted, k)


def gradtrust_and_msp(logits: Floats, spans_fit: bool = False) -> tuple[Floats, Floats]:
    """``gradtrust`` and ``msp`` of logits the caller has already validated: float64,
    shape (N, C) with C >= 2, every value finite (the server checks that for each sample
    before scoring). The same computation as ``compute_scores(logits, ("gradtrust",
    "msp"))``, bit for bit, without its checks: right after a forward pass every numpy
    call costs several times its usual time, and the server needs this pair per batch.

    ``spans_fit``: the caller knows that no difference of two logits overflows float64
    (true of float32 logits converted to float64), so the ``np.errstate`` that hides
    such overflows is skipped for a batch scored in one block; the values are the same.
    """
    out = _compute_validated(logits, None, ["gradtrust", "msp"], 3, guard=not spans_fit)
    return out["gradtrust"], out["msp"]


def gradtrust_msp_of_sample(logits: NDArray[np.float32]) -> tuple[float, float, int] | None:
    """``gradtrust``, ``msp`` and the predicted class of one sample's float32 logits, shape
    (1, C) with C >= 2, as Python numbers; None when a logit is NaN or infinite.

    Bit for bit what ``compute_scores(logits, ("gradtrust", "msp"))`` and
    :func:`predicted_class` return for the same row, in about a third of the numpy calls:
    right after a forward pass each numpy call costs several times its usual time, and a
    server's usual batch is one image. What is O(C) stays in numpy, in the same shapes as
    :meth:`_Softmax.of` (so every reduction adds in the same order); the O(1) rest is
    the same float64 arithmetic on Python floats, with the few exp and log values
    computed by numpy (whose exp and log may round differently from :mod:`math`'s).
    float32 logits are at most 3.4e38 in size, so no difference of two of them overflows
    float64: no ``np.errstate`` is needed.
    """
    c = logits.shape[1]
    k = min(GRADTRUST_K, c - 1)
    m = k + 1
    # One partition gives the m largest values (NaN and +inf sort among them) and, at
    # position 0, the smallest (-inf): the finiteness check costs no extra pass.
    row = logits[0].copy()  # np.partition's own steps, without its Python-level wrapper
    row.partition((0, c - m))
    top = row[c - m :].tolist()
    if not (math.isfinite(row[0]) and math.isfinite(sum(top))):
        return None
    top.sort(reverse=True)
    z_p, z_q = top[0], top[1]
    p = int(logits.argmax())
    t = logits.astype(np.float64)  # exact
    t -= z_q  # log t
    t[0, p] = -_SPAN_CAP  # exp gives 0: P is left out of the sums, as in _Softmax.of
    np.exp(t, out=t)
    t_sum = float(np.add.reduce(t, axis=1)[0])
    t_sq = float(np.einsum("nc,nc->n", t, t)[0])
    gap = min(z_p - z_q, _SPAN_CAP)
    # r = exp(-gap) and s_Qk = exp(z_Qk - z_P), k = 1..K, in one call.
    e = np.exp(np.array([-gap] + [v - z_p for v in top[1:]])).tolist()
    r = e[0]
    s_q_sum = e[1]
    for s in e[2:]:  # left to right, as numpy adds so few values
        s_q_sum += s
    total = 1.0 + r * t_sum
    numer = total * (total - (2.0 / k) * s_q_sum) + (1.0 + r * r * t_sq)
    logs = np.log(np.array([numer, t_sum * t_sum + t_sq])).tolist()
    score = logs[0] - logs[1] + 2.0 * min(z_p - z_q, _LOG_GAP_CAP)
    return (score if score > 0.0 else 0.0), 1.0 / total, p


def _compute_validated(
    z: Floats, h: Floats | None, wanted: list[str], k: int, guard: bool = True
) -> dict[str, Floats]:
    """:func:`compute_scores` after its checks: ``z`` finite float64 (N, C), ``h`` the
    features when a wanted score needs them, ``k`` >= 1. ``guard=False``: the caller
    knows nothing can overflow (see :func:`gradtrust_and_msp`)."""
    n, c = z.shape
    k = min(k, c - 1)
    rows = max(1, _BLOCK_VALUES // c)
    if not guard and n <= rows:
        return _score_block(z, h, wanted, k)
    # Logit spans beyond float64 overflow to -inf, whose exp is the correct 0, and
    # contrast_trust saturates where exp(2 gap) overflows: see _Softmax.of.
    with np.errstate(over="ignore"):
        if n <= rows:
            return _score_block(z, h, wanted, k)
        blocks = [
            _score_block(z[i : i + rows], None if h is None else h[i : i + rows], wanted, k)
            for i in range(0, n, rows)
        ]
    return {name: np.concatenate([block[name] for block in blocks]) for name in wanted}
