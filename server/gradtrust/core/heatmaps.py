"""Explanation heatmaps in closed form for a conv layer that feeds global average pooling.

When the classifier ends ``A (N, K, h, w) -> mean over (h, w) -> z = W h + b``, the
gradient of any function of the logits with respect to ``A`` is known without a backward
pass: ``dz_c/dA_kij = W_ck / (h w)`` and ``dCE(z, Q)/dz = p - e_Q``. So every map below
needs only the activation, the head weight and the softmax; the server never runs autograd.
The tests' ``tests/reference/autograd_heatmaps.py`` computes the same maps with
``torch.autograd`` (and VOICE literally, one full-size map per class) and is the reference
the closed forms are checked against.

Each map is a weighted sum of activation channels, ``sum_k alpha_k A_k``, with
``alpha_k`` the spatial mean of the gradient of a *target*; only the target differs:

============== =============================== ===================================
method         question it answers             target (alpha_k = mean_ij dT/dA_kij)
============== =============================== ===================================
gradcam        why P?                          ``T = z_P``
counterfactual what if these regions were      ``T = -z_P`` (weights ``-alpha_k``)
               absent?
contrast       why P, rather than Q?           ``T = +CE(z, Q)``: its gradient
                                               ``p - e_Q`` raises every class against
                                               Q (mostly P) and lowers z_Q, so
                                               positive evidence is "for P, not Q"
voice          how uncertain is the            every contrast map, Q != P
               explanation?
============== =============================== ===================================

Post-processing, in this order (:func:`finish_maps`): ReLU at the activation resolution,
bilinear upsampling to the requested size (equal to
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``), then per-map
min-max normalisation to [0, 1]. A map that is constant after upsampling (all zero because
every weighted sum was negative, or constant at the activation's resolution) becomes all
zeros, never NaN or rounding noise. ``size=None`` asks for the map at the activation's own
resolution: upsampling is then the identity, and upsampling that map to the input size and
min-max normalising it again gives exactly the input-size map (bilinear weights are
non-negative and sum to 1, so upsampling commutes with the affine min-max step).

VOICE is computed exactly as defined (each contrast map upsampled and normalised, the
per-pixel variance over them at the requested size), not redefined at the activation's
resolution: the definition is kept, so VOICE maps mean what they meant before and what the
literal reference computes. By the linearity of upsampling (:func:`voice_maps`) it costs
O(C h w + H W) per sample after the C raw maps (one (C, K) x (K, h w) product), instead of
O(C H W). ``Head`` holds the head weight converted and checked once, when the model loads;
:func:`explain` also accepts a raw weight array (then converted on every call).

Precision: everything is float64 except the largest product, VOICE's C raw maps
``S_c = W_c A / (h w)``, a (C, K) x (K, h w) product per image. It is split as
``W_c f + W_c (A - f)`` with ``f`` the channel means: the per-class constant ``W f`` in
float64, and the spatial part in the activation's own precision, float32 for the float32
activation an ONNX forward pass returns (what the server passes), float64 otherwise. In
float32 that product reads half the memory and runs twice as fast (1.5 instead of 3.4 ms
per image at C = 1000, K = 1280 on one core). Splitting off the constant keeps float32's
rounding relative to how much the maps vary across pixels, not to the activation's size:
without it, an activation that varies little across pixels (a low-contrast image) moved
VOICE maps by up to 6e-5; with it, by 1e-7 (the tests hold it to 1e-5, the contract).
On the benchmark's C = 1000 heads VOICE moves by at most 1.3e-7 from the float64 path
(``bench/results/heatmaps_ab_f32.md``), and the float64 path is within 1e-10 of autograd.

Ranges: every map is float64 in [0, 1], higher = more relevant to its question (for
``voice``: more disagreement between the contrast explanations, i.e. less trust in the
explanation there). VOICE statistics: SNR in [0, inf), IoU in [0, 1] (see
:func:`voice_statistics`). These are explanations, not trust scores. Everything is per
sample: a sample's map never depends on the rest of its batch (beyond float32 rounding in
VOICE's product, where BLAS may block a larger product differently: the tests allow 1e-6
there and 1e-12 in float64).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gradtrust.core.scores import as_logits, predicted_class, softmax
from gradtrust.errors import InvalidInputError

Floats = NDArray[np.float64]
Ints = NDArray[np.intp]

METHODS: tuple[str, ...] = ("gradcam", "counterfactual", "contrast", "voice")
"""Every heatmap method :func:`explain` knows, in a stable order."""

VOICE_THRESHOLD = 0.1
"""A pixel of a [0, 1] map counts as "on" for the VOICE IoU when its value is >= this."""


# ---------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------
def _real(
    values: ArrayLike, what: str, ndim: int, shape_hint: str, keep_float32: bool = False
) -> NDArray[np.floating]:
    """A finite real array as float64 (a copy unless it already is one), or an error naming
    the problem; ``keep_float32`` leaves a float32 array as it is."""
    raw = np.asarray(values)
    if raw.dtype.kind not in "iuf":
        raise InvalidInputError(f"{what} must hold real numbers, got dtype {raw.dtype}")
    if raw.ndim != ndim:
        raise InvalidInputError(f"{what} must have shape {shape_hint}, got shape {raw.shape}")
    keep = keep_float32 and raw.dtype == np.float32
    out: NDArray[np.floating] = raw if keep else np.asarray(raw, dtype=np.float64)
    if not np.isfinite(out).all():
        raise InvalidInputError(f"{what} holds NaN or infinite values; send finite values")
    return out


def _real_float64(values: ArrayLike, what: str, ndim: int, shape_hint: str) -> Floats:
    """:func:`_real` as float64 whatever the input's precision."""
    out: Floats = _real(values, what, ndim, shape_hint).astype(np.float64, copy=False)
    return out


def _as_activation(activation: ArrayLike) -> NDArray[np.floating]:
    """The activation, checked, in its own precision: float32 as the forward pass made it
    (VOICE's product with every class's weight then runs in float32), anything else
    float64."""
    a = _real(activation, "activation", 4, "(batch, channels, height, width)", keep_float32=True)
    if a.shape[2] < 1 or a.shape[3] < 1:
        raise InvalidInputError(f"activation must have a non-empty spatial grid, got {a.shape}")
    return a


@dataclass(frozen=True, eq=False)
class Head:
    """The linear head's weight ``W`` (C, K) as every map uses it: finite, read-only, in
    float64 and in float32 (VOICE's product with a float32 activation).

    Made once when a model loads (:meth:`from_weight`), so that a request pays neither the
    copy nor the checks of a C x K matrix (1000 x 1280 for an ImageNet classifier).
    ``weight32`` is the operand of VOICE's (C, K) x (K, h w) product with the spatial part
    of a float32 activation: half the memory and twice the speed (see "Precision" in this
    module's docstring).
    """

    weight: Floats
    weight32: NDArray[np.float32]

    @classmethod
    def from_weight(cls, weight: ArrayLike) -> Head:
        """Check and convert a (classes, channels) weight; raises naming what is wrong."""
        w = np.array(
            _real_float64(weight, "weight", 2, "(classes, channels)"), dtype=np.float64, order="C"
        )
        if w.shape[0] < 2 or w.shape[1] < 1:
            raise InvalidInputError(
                f"weight must have at least 2 classes and 1 channel, got shape {w.shape}"
            )
        with np.errstate(over="ignore"):  # refused just below, naming the problem
            w32 = w.astype(np.float32)
        if not np.isfinite(w32).all():
            raise InvalidInputError(
                "weight holds values beyond float32's range; a head weight exported from an "
                "ONNX model is float32, so check that this is the head's weight"
            )
        w.flags.writeable = False
        w32.flags.writeable = False
        return cls(w, w32)

    def operand(self, dtype: np.dtype) -> NDArray[np.floating]:
        """The weight for a product with an activation of ``dtype`` (float32 or float64)."""
        return self.weight32 if dtype == np.float32 else self.weight

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])


def _as_head(head: Head | ArrayLike, channels: int) -> Head:
    h = head if isinstance(head, Head) else Head.from_weight(head)
    if h.channels != channels:
        raise InvalidInputError(
            f"weight has {h.channels} input channels but the activation has {channels}: "
            "pass the weight of the linear head that follows this activation"
        )
    return h


def _as_probs(probs: ArrayLike, n: int, c: int) -> Floats:
    p = _real_float64(probs, "probs", 2, "(batch, classes)")
    if p.shape != (n, c):
        raise InvalidInputError(f"probs must have shape {(n, c)}, got {p.shape}")
    return p


def _as_size(size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) as two positive Python ints, refusing floats, bools and other shapes."""
    try:
        height, width = (operator.index(s) for s in size)
        valid = not any(isinstance(s, bool) for s in size) and height > 0 and width > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise InvalidInputError(f"size must be two positive integers (height, width), got {size!r}")
    return height, width


def _map_size(size: tuple[int, int] | None, activation: Floats) -> tuple[int, int]:
    """The requested size, or the activation's own (height, width) for ``None``."""
    if size is None:
        return int(activation.shape[2]), int(activation.shape[3])
    return _as_size(size)


def _as_classes(classes: ArrayLike, n: int, c: int, what: str) -> Ints:
    """Class indices as an (N,) intp array: one int is broadcast, anything out of range refused."""
    raw = np.asarray(classes)
    if raw.dtype.kind not in "iu":
        raise InvalidInputError(f"{what} must be integer class indices, got dtype {raw.dtype}")
    if raw.ndim == 0:
        raw = np.full(n, raw, dtype=np.intp)
    if raw.shape != (n,):
        raise InvalidInputError(
            f"{what} must be one class index or one per sample (shape ({n},)), got {raw.shape}"
        )
    bad = (raw < 0) | (raw >= c)
    if bad.any():
        raise InvalidInputError(
            f"{what} {raw[bad][0]} is out of range: valid classes are 0..{c - 1} (C = {c})"
        )
    return raw.astype(np.intp)


def check_method(method: str) -> str:
    """Return ``method`` if it is one of :data:`METHODS`, else raise listing the valid ones."""
    if method not in METHODS:
        raise InvalidInputError(
            f"unknown heatmap method {method!r}: valid methods are {', '.join(METHODS)}"
        )
    return method


def contrast_targets(logits: ArrayLike, contrast_class: ArrayLike | None = None) -> Ints:
    """The contrast class Q per sample: the one named, or by default the second most probable.

    Ranking uses the logits, not the probabilities, so classes whose softmax underflows to
    the same value are still ordered; ties go to the lowest class index.
    """
    z = as_logits(logits)
    n, c = z.shape
    if contrast_class is not None:
        return _as_classes(contrast_class, n, c, "contrast_class")
    ranked = z.copy()
    ranked[np.arange(n), predicted_class(z)] = -np.inf
    return np.argmax(ranked, axis=1)


# ---------------------------------------------------------------------------------------
# Upsampling and normalisation
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Axis:
    """1-D bilinear interpolation from ``n_in`` to ``n_out`` points, half-pixel centres.

    Output ``i`` reads source ``s = max((i + 0.5) n_in / n_out - 0.5, 0)``: the pixels
    ``low = floor(s)`` and ``low + 1`` with weights ``1 - frac`` and ``frac``; past the last
    pixel both neighbours are the last one and ``frac`` is 0 (same value, no rounding).
    """

    low: Ints  # (n_out,)
    frac: Floats  # (n_out,)
    matrix: Floats  # (n_out, n_in), rows sum to 1
    #: The output indices where a map's extremes can lie: the first and last of each run of
    #: outputs between the same two source pixels (the value is linear in ``frac`` there).
    extremes: Ints
    #: The distinct rows of ``matrix[extremes]`` (a clamped run's ends read the same pixel).
    at_extremes: Floats
    #: (2 n_in, n_out): weights of the products of a pixel with itself (first n_in rows)
    #: and with its successor (last n_in) in the square of an interpolated value.
    same_weights: Floats
    #: (3 n_in, n_out): weights of products across two neighbouring lines of the other
    #: axis: same pixel, pixel with the next line's successor, successor with the next
    #: line's pixel (:func:`_variance_of_upsampled`).
    cross_weights: Floats


@lru_cache(maxsize=64)
def _axis(n_in: int, n_out: int) -> _Axis:
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    frac = np.where(low < n_in - 1, src - low, 0.0)
    high = np.minimum(low + 1, n_in - 1)
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    matrix[rows, low] = 1.0 - frac
    matrix[rows, high] += frac
    run_start = np.flatnonzero(np.r_[True, low[1:] != low[:-1]])
    run_end = np.r_[run_start[1:] - 1, n_out - 1]
    extremes = np.unique(np.r_[run_start, run_end])
    at_extremes = np.unique(matrix[extremes], axis=0)
    # (1 - f) a + f b squared: (1 - f)^2 a^2 + f^2 b^2 + 2 f (1 - f) a b.
    square = np.zeros((n_in, n_out))
    square[low, rows] = (1.0 - frac) ** 2
    square[high, rows] += frac**2
    pair = np.zeros((n_in, n_out))
    pair[low, rows] = frac * (1.0 - frac)  # a b, stored at a's index
    pair_high = np.zeros((n_in, n_out))
    pair_high[high, rows] = frac * (1.0 - frac)  # the same product, stored at b's index
    same_weights = np.vstack([square, 2.0 * pair])
    cross_weights = np.vstack([square, pair, pair_high])
    for array in (low, frac, matrix, extremes, at_extremes, same_weights, cross_weights):
        array.flags.writeable = False
    return _Axis(low, frac, matrix, extremes, at_extremes, same_weights, cross_weights)


def upsample_bilinear(maps: ArrayLike, size: tuple[int, int]) -> Floats:
    """Resize maps (..., h, w) to (..., H, W) like torch's bilinear, align_corners=False.

    Separable and linear: ``R m C^T`` with the (H, h) and (W, w) interpolation matrices of
    :func:`_axis` (two non-zeros per row, rows summing to 1), two small BLAS products for
    any leading shape. A tenth of the time of gathering neighbours per axis (0.03 against
    0.3 ms for 7 x 7 -> 224 x 224), and equal to torch to rounding (the tests: 1e-12). A
    constant map comes out constant only to rounding, so callers that must give a flat map
    zeros test flatness at (h, w) (:func:`_constant`).
    """
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim < 2:
        raise InvalidInputError(f"maps must have at least 2 dimensions (h, w), got {m.shape}")
    height, width = _as_size(size)
    h, w = m.shape[-2:]
    rows = _axis(h, height)
    cols = _axis(w, width)
    at_rows = rows.matrix @ m.reshape(-1, h, w)  # (n, H, w)
    out: Floats = (at_rows.reshape(-1, w) @ cols.matrix.T).reshape(*m.shape[:-2], height, width)
    return out


def _normalize(
    maps: Floats, low: Floats, span: Floats, flat: NDArray[np.bool_], in_place: bool = False
) -> Floats:
    """``(maps - low) / span``, and 0 for the ``flat`` maps; ``in_place`` overwrites ``maps``
    (a temporary of the caller's).

    A flat map is divided by +inf, which gives exactly 0 for every finite value: two passes
    over the maps whether or not some are flat (many of VOICE's contrast maps are all
    zero after the ReLU). Where ``low`` is the map's minimum the zeros are +0.0.
    """
    out: Floats = np.subtract(maps, low, out=maps if in_place else None)
    out /= np.where(flat, np.inf, span)
    return out


def minmax_normalize(maps: ArrayLike) -> Floats:
    """Rescale each map (..., H, W) to [0, 1] on its own; a constant map becomes all zeros.

    A constant map carries no spatial information, so zeros ("nothing highlighted") is
    the only value that does not invent a region; it also keeps the output free of NaN.
    """
    m = np.asarray(maps, dtype=np.float64)
    low = m.min(axis=(-2, -1), keepdims=True)
    span = m.max(axis=(-2, -1), keepdims=True) - low
    return _normalize(m, low, span, span <= 0)


def _constant(maps: Floats) -> NDArray[np.bool_]:
    """Per map (..., h, w): all values equal, so every upsampling of it is constant too."""
    flat_maps = maps.reshape(*maps.shape[:-2], -1)
    flat: NDArray[np.bool_] = (flat_maps == flat_maps[..., :1]).all(axis=-1)
    return flat[..., None, None]


def weighted_sum(activation: ArrayLike, weights: ArrayLike) -> Floats:
    """``sum_k alpha_k A_k`` per sample: (N, K) weights -> (N, h, w), (N, M, K) -> (N, M, h, w)."""
    a = np.asarray(activation, dtype=np.float64)
    alpha = np.asarray(weights, dtype=np.float64)
    if alpha.ndim not in (2, 3) or alpha.shape[0] != a.shape[0] or alpha.shape[-1] != a.shape[1]:
        raise InvalidInputError(
            f"weights must be (N, K) or (N, M, K) matching activation {a.shape}, got {alpha.shape}"
        )
    # einsum's own loop, not BLAS: one map is K h w multiply-adds, too few to be worth
    # waking BLAS threads that then compete with the network's for the cores.
    out: Floats = np.einsum("n...k,nkij->n...ij", alpha, a)
    return out


def finish_maps(raw: ArrayLike, size: tuple[int, int] | None) -> Floats:
    """ReLU at the activation resolution, bilinear upsampling to ``size``, then min-max to [0, 1].

    ``raw`` holds the weighted sums ``sum_k alpha_k A_k`` with shape (..., h, w); ``size``
    None keeps (h, w). The ReLU comes first so that negative evidence never bleeds into the
    upsampled map. A map constant at (h, w) is constant after upsampling: all zeros.
    """
    relu = np.maximum(np.asarray(raw, np.float64), 0.0)
    target = relu.shape[-2:] if size is None else _as_size(size)
    up = upsample_bilinear(relu, (int(target[0]), int(target[1])))
    # Extremes over one flat axis (numpy reduces it far faster than over two); ``up`` is
    # this function's own temporary, so it is normalised in place.
    flat_up = up.reshape(*up.shape[:-2], -1)
    low = flat_up.min(axis=-1)[..., None, None]
    span = flat_up.max(axis=-1)[..., None, None] - low
    return _normalize(up, low, span, (span <= 0) | _constant(relu), in_place=True)


# ---------------------------------------------------------------------------------------
# VOICE
# ---------------------------------------------------------------------------------------
def _normalized_low_res(relu: Floats, rows: _Axis, cols: _Axis) -> Floats:
    """Each map of one sample, (h, w, M) with the M maps last, affinely rescaled so that its
    *upsampled* version spans [0, 1].

    Upsampling commutes with ``(m - lo) / span``, so the normalised upsampled map is the
    upsampling of this. ``lo`` and ``span`` are those of the upsampled map, found without
    computing it: within a run of output rows (or columns) between the same two source
    pixels the value is linear in the interpolation weight, so every extreme lies on the
    first or last row and the first or last column of a run (``_Axis.extremes``).
    """
    h, w, m = relu.shape
    # Maps last: both products are a few large ones, and the extremes reduce over the
    # first axis (element-wise minima of long rows, the fastest reduction numpy has).
    at_cols = np.matmul(cols.at_extremes, relu)  # (h, ec, M)
    values = (rows.at_extremes @ at_cols.reshape(h, -1)).reshape(-1, m)  # (er ec, M)
    low = values.min(axis=0)
    span = values.max(axis=0) - low
    pixels = relu.reshape(h * w, m)
    constant = (pixels == pixels[:1]).all(axis=0)  # flat at (h, w): flat when upsampled
    return _normalize(relu, low, span, (span <= 0) | constant, in_place=True)


def _shifted_products(d: Floats, dy: int, dx: int) -> Floats:
    """``sum_m d[y, x, m] d[y + dy, x + dx, m]`` on the (h, w) grid (zero where off-grid);
    ``d`` is (h, w, M). ``dx`` may be -1 (the anti-diagonal)."""
    h, w, _ = d.shape
    out = np.zeros((h, w))
    x0, x1 = (0, w - dx) if dx >= 0 else (-dx, w)
    a = d[: h - dy, x0:x1]
    b = d[dy:, x0 + dx : x1 + dx]
    out[: h - dy, x0:x1] = np.einsum("yxm,yxm->yx", a, b)
    return out


def _variance_of_upsampled(d: Floats, rows: _Axis, cols: _Axis) -> Floats:
    """``sum_m upsample(d_m)^2`` at every output pixel, (H, W), from products of
    neighbouring pixels of one sample's maps ``d`` (h, w, M) only.

    Output (i, j) is ``sum_ab w_a w_b d_m[a] d_m[b]`` over its four source neighbours, so it
    needs the products of each pixel with itself, its right, lower, lower-right and
    lower-left neighbours, summed over m: O(M h w), then O(h W + H W) to assemble, as two
    small matrix products with weights fixed per size (``_Axis.same_weights``,
    ``_Axis.cross_weights``).
    """
    k00 = _shifted_products(d, 0, 0)
    k01 = _shifted_products(d, 0, 1)
    k10 = _shifted_products(d, 1, 0)
    k11 = _shifted_products(d, 1, 1)
    k1m = _shifted_products(d, 1, -1)  # (y, x + 1) with (y + 1, x), stored at (y, x + 1)
    # Per source row y and output column j: row y with itself, and row y with row y + 1.
    same = np.concatenate([k00, k01], axis=1) @ cols.same_weights  # (h, W)
    cross = np.concatenate([k10, k11, k1m], axis=1) @ cols.cross_weights  # (h, W)
    # Then along the rows: the same squares of interpolation weights, across rows.
    out: Floats = rows.same_weights.T @ np.concatenate([same, cross], axis=0)
    return out


def _voice_map(raw: Floats, predicted: int, rows: _Axis, cols: _Axis) -> Floats:
    """One sample's VOICE map (H, W) from its raw contrast sums (h, w, C), classes last."""
    relu = np.maximum(np.delete(raw, predicted, axis=2), 0.0)  # (h, w, C - 1): Q != P
    normalized = _normalized_low_res(relu, rows, cols)
    normalized -= normalized.mean(axis=2, keepdims=True)
    spread = np.maximum(_variance_of_upsampled(normalized, rows, cols), 0.0)
    # The unbiased variance is this sum / (C - 2); min-max normalisation cancels the factor.
    return minmax_normalize(spread)


def voice_maps(
    raw_contrast: ArrayLike, predicted: ArrayLike, size: tuple[int, int] | None
) -> Floats:
    """VOICE uncertainty maps (N, H, W) from the raw contrast sums of every class (N, C, h, w).

    Definition: for each sample, the C - 1 contrast maps with Q != P are finished
    (:func:`finish_maps`: ReLU, upsampling to ``size``, min-max), their per-pixel *unbiased*
    variance is taken, and the result is min-max normalised. With C = 2 there is a single
    contrast map, whose unbiased variance is undefined: the map is then all zeros.

    Computed without upsampling any contrast map: each is normalised at (h, w) with the
    extremes of its upsampled version (:func:`_normalized_low_res`), and since upsampling is
    linear, the variance over maps at an output pixel is a quadratic form in the centred
    low-resolution values at its four interpolation neighbours
    (:func:`_variance_of_upsampled`). O(C h w + H W) per sample instead of O(C H W); the
    tests check it against the literal definition.
    """
    r = np.asarray(raw_contrast, dtype=np.float64)
    if r.ndim != 4:
        raise InvalidInputError(
            f"raw_contrast must have shape (batch, classes, height, width), got {r.shape}"
        )
    n, c, h, w = r.shape
    return _voice_maps_last(
        r.transpose(0, 2, 3, 1), _as_classes(predicted, n, c, "predicted"), size
    )


def _voice_maps_last(raw: Floats, predicted: Ints, size: tuple[int, int] | None) -> Floats:
    """:func:`voice_maps` from raw contrast sums laid out (N, h, w, C), classes last."""
    n, h, w, c = raw.shape
    height, width = (h, w) if size is None else _as_size(size)
    if c < 3:
        return np.zeros((n, height, width))
    rows, cols = _axis(h, height), _axis(w, width)
    # One sample at a time: its (H, W) temporaries stay in cache (a batch's do not).
    return np.stack([_voice_map(raw[i], int(predicted[i]), rows, cols) for i in range(n)])


def voice_statistics(voice: ArrayLike, explanation: ArrayLike) -> Floats:
    """Per-sample (SNR, IoU) of VOICE maps (N, H, W) against explanation maps (N, H, W).

    - SNR = mean / std (ddof 0) of the VOICE map; 0.0 when std = 0 (for a min-max
      normalised map that means an all-zero map: no signal).
    - IoU of ``explanation >= 0.1`` and ``voice >= 0.1``; 0.0 when both sets are empty.

    Both maps are expected in [0, 1] (outputs of this module).
    """
    v = np.asarray(voice, dtype=np.float64)
    e = np.asarray(explanation, dtype=np.float64)
    if v.shape != e.shape or v.ndim != 3:
        raise InvalidInputError(
            f"voice and explanation maps must both be (N, H, W), got {v.shape} and {e.shape}"
        )
    out = np.zeros((v.shape[0], 2))
    # One map at a time: whole-array reductions (a dot product, counts without an axis)
    # are several times faster than numpy's per-row reductions over a few maps.
    for i, (vi, ei) in enumerate(zip(v.reshape(len(v), -1), e.reshape(len(e), -1), strict=True)):
        mean = float(vi.sum()) / vi.size
        centred = vi - mean  # exactly 0 everywhere for a constant map: std exactly 0
        std = math.sqrt(float(np.dot(centred, centred)) / vi.size)
        on_v = vi >= VOICE_THRESHOLD
        on_e = ei >= VOICE_THRESHOLD
        inter = np.count_nonzero(on_v & on_e)
        union = np.count_nonzero(on_v) + np.count_nonzero(on_e) - inter
        out[i] = (mean / std if std > 0 else 0.0, inter / union if union > 0 else 0.0)
    return out


# ---------------------------------------------------------------------------------------
# Closed forms for GAP heads
# ---------------------------------------------------------------------------------------
def _gradcam_raw(a: NDArray[np.floating], head: Head, classes: Ints) -> Floats:
    return weighted_sum(a, head.weight[classes] / (a.shape[2] * a.shape[3]))


def _checked(
    activation: ArrayLike, head: Head | ArrayLike, classes: ArrayLike, what: str
) -> tuple[NDArray[np.floating], Head, Ints]:
    a = _as_activation(activation)
    h = _as_head(head, a.shape[1])
    return a, h, _as_classes(classes, a.shape[0], h.num_classes, what)


def gradcam(
    activation: ArrayLike,
    head: Head | ArrayLike,
    classes: ArrayLike,
    size: tuple[int, int] | None,
) -> Floats:
    """GradCAM "why class c?" maps (N, H, W) in [0, 1]; ``alpha_k = W_ck / (h w)``.

    ``classes`` is one class index or one per sample (normally the prediction P).
    """
    a, h, c = _checked(activation, head, classes, "classes")
    return finish_maps(_gradcam_raw(a, h, c), size)


def counterfactual(
    activation: ArrayLike,
    head: Head | ArrayLike,
    classes: ArrayLike,
    size: tuple[int, int] | None,
) -> Floats:
    """Counterfactual maps (N, H, W) in [0, 1]: GradCAM with weights ``-alpha_k``.

    They highlight regions whose removal would make the model *more* confident in the class.
    """
    a, h, c = _checked(activation, head, classes, "classes")
    return finish_maps(-_gradcam_raw(a, h, c), size)


def contrast(
    activation: ArrayLike,
    head: Head | ArrayLike,
    probs: ArrayLike,
    targets: ArrayLike,
    size: tuple[int, int] | None,
) -> Floats:
    """Contrast "why P, rather than Q?" maps (N, H, W) in [0, 1]; Q = ``targets``.

    ``alpha_k = mean_ij dCE(z, Q)/dA_kij = sum_c (p_c - [c = Q]) W_ck / (h w)``: the gradient
    of the loss *towards* Q (sign +), as ContrastCAM backpropagates it, so the map shows
    the evidence that makes Q a worse answer than the prediction.
    """
    a, h, q = _checked(activation, head, targets, "targets")
    return _contrast(a, h, _as_probs(probs, a.shape[0], h.num_classes), q, size)


def _contrast(
    a: NDArray[np.floating], h: Head, p: Floats, q: Ints, size: tuple[int, int] | None
) -> Floats:
    """:func:`contrast` of checked arguments."""
    alpha = (p @ h.weight - h.weight[q]) / (a.shape[2] * a.shape[3])
    return finish_maps(weighted_sum(a, alpha), size)


def voice(
    activation: ArrayLike,
    head: Head | ArrayLike,
    probs: ArrayLike,
    predicted: ArrayLike,
    size: tuple[int, int] | None,
) -> tuple[Floats, Floats]:
    """VOICE uncertainty maps (N, H, W) in [0, 1] and their statistics (N, 2) = (SNR, IoU).

    The raw contrast sum for every Q is ``sum_c p_c S_c - S_Q`` with ``S_c = W_c A / (h w)``
    the raw GradCAM sum of class c, so all C contrasts cost one (C, K) x (K, h w) product
    per sample. See :func:`voice_maps` and :func:`voice_statistics`; the explanation in the
    IoU is the GradCAM map of ``predicted``.
    """
    a, h, pred = _checked(activation, head, predicted, "predicted")
    return _voice(a, h, _as_probs(probs, a.shape[0], h.num_classes), pred, size)


def _voice(
    a: NDArray[np.floating], h: Head, p: Floats, pred: Ints, size: tuple[int, int] | None
) -> tuple[Floats, Floats]:
    """:func:`voice` of checked arguments."""
    n, k, height, width = a.shape
    # S_c = W_c A / (h w) = (W_c f + W_c (A - f)) / (h w), f the channel means: the
    # per-class constant W f in float64, the spatial part in the activation's precision
    # (module docstring, "Precision") as one (N h w, K) x (K, C) product, so the head is
    # read once for the whole batch, with the classes last as VOICE reduces over them.
    # The means are in the activation's precision and the constant uses exactly those
    # values (any centre would do: only the deviations' size matters for the rounding).
    means = a.reshape(n, k, -1).mean(axis=2)  # (N, K)
    # A copy in (N, h, w, K) order, never a view of the caller's activation: subtracted in.
    pixels = np.array(a.transpose(0, 2, 3, 1), order="C").reshape(n, height * width, k)
    with np.errstate(over="ignore", invalid="ignore"):  # refused just below, naming it
        pixels -= means[:, None, :]
        product = pixels.reshape(-1, k) @ h.operand(a.dtype).T
    if not np.isfinite(product).all():
        raise InvalidInputError(
            f"activation times head weight overflows {a.dtype}; send the activation the "
            "model's forward pass produced"
        )
    cams = product.astype(np.float64).reshape(n, height * width, h.num_classes)
    cams += (means.astype(np.float64) @ h.weight.T)[:, None, :]
    cams /= height * width  # (N, hw, C): S_c for every class
    mixed = cams @ p[:, :, None]  # (N, hw, 1): sum_c p_c S_c
    raw_contrast = np.subtract(mixed, cams, out=cams).reshape(n, height, width, -1)
    explanation = finish_maps(_gradcam_raw(a, h, pred), size)
    maps = _voice_maps_last(raw_contrast, pred, size)
    return maps, voice_statistics(maps, explanation)


def explain(
    method: str,
    activation: ArrayLike,
    head: Head | ArrayLike,
    logits: ArrayLike,
    size: tuple[int, int] | None,
    contrast_class: ArrayLike | None = None,
) -> tuple[Floats, Floats | None]:
    """The server's entry point: maps (N, H, W) in [0, 1] and, for ``voice`` only, stats (N, 2).

    ``head`` is a :class:`Head` (prepared once per model) or the raw (C, K) weight.
    ``size`` is the (height, width) of the maps, normally the input's; None gives them at
    the activation's resolution (h, w). Computes ``p = softmax(logits)`` and
    ``P = argmax logits`` (ties: lowest index). For ``contrast``, ``contrast_class`` (one
    int or one per sample) names Q, by default the second most probable class; it is
    refused for the other methods, which do not use it.
    """
    check_method(method)
    z = as_logits(logits)
    a = _as_activation(activation)
    if a.shape[0] != z.shape[0]:
        raise InvalidInputError(
            f"activation has {a.shape[0]} samples but logits have {z.shape[0]}; "
            "pass both outputs of the same forward pass"
        )
    h = _as_head(head, a.shape[1])
    if h.num_classes != z.shape[1]:
        raise InvalidInputError(
            f"weight has {h.num_classes} classes but logits have {z.shape[1]}; "
            "pass the weight of the head that produced these logits"
        )
    if contrast_class is not None and method != "contrast":
        raise InvalidInputError(
            f"contrast_class is only used by method 'contrast', not {method!r}: drop it "
            "or ask for method 'contrast'"
        )
    target = _map_size(size, a)
    pred = predicted_class(z)
    # Everything is checked above (and P, p = softmax(z) and the contrast targets are
    # valid by construction): the maps are computed without checking the activation again.
    if method == "gradcam":
        return finish_maps(_gradcam_raw(a, h, pred), target), None
    if method == "counterfactual":
        return finish_maps(-_gradcam_raw(a, h, pred), target), None
    if method == "contrast":
        return _contrast(a, h, softmax(z), contrast_targets(z, contrast_class), target), None
    return _voice(a, h, softmax(z), pred, target)
