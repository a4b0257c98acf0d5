"""Explanation heatmaps in closed form for a conv layer that feeds global average pooling.

When the classifier ends ``A (N, K, h, w) -> mean over (h, w) -> z = W h + b``, the
gradient of any function of the logits with respect to ``A`` is known without a backward
pass: ``dz_c/dA_kij = W_ck / (h w)`` and ``dCE(z, Q)/dz = p - e_Q``. So every map below
needs only the activation, the head weight and the softmax; the server never runs autograd.
The tests' ``tests/reference/autograd_heatmaps.py`` computes the same maps with
``torch.autograd`` for any other
architecture and is the reference the tests compare against.

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

Post-processing, in this order and shared by both paths (:func:`finish_maps`): ReLU at the
activation resolution, bilinear upsampling to the input size (equal to
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``), then per-sample
min-max normalisation to [0, 1]. A map that is constant after upsampling (for example all
zero because every weighted sum was negative) becomes all zeros, never NaN.

Ranges: every map is float64 in [0, 1], higher = more relevant to its question (for
``voice``: more disagreement between the contrast explanations, i.e. less trust in the
explanation there). VOICE statistics: SNR in [0, inf), IoU in [0, 1] (see
:func:`voice_statistics`). These are explanations, not trust scores. Everything is per
sample: a sample's map never depends on the rest of its batch.
"""

from __future__ import annotations

import operator

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

#: Upper bound on the float64 elements of one upsampled chunk of VOICE contrast maps
#: (32 MiB), so that C = 1000 classes at 224 x 224 does not need gigabytes at once.
_MAX_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------
def _real_float64(values: ArrayLike, what: str, ndim: int, shape_hint: str) -> Floats:
    """A fresh float64 copy of a finite real array of the given rank, or a clear error."""
    raw = np.asarray(values)
    if raw.dtype.kind not in "iuf":
        raise InvalidInputError(f"{what} must hold real numbers, got dtype {raw.dtype}")
    if raw.ndim != ndim:
        raise InvalidInputError(f"{what} must have shape {shape_hint}, got shape {raw.shape}")
    out = np.array(raw, dtype=np.float64, copy=True)
    if not np.isfinite(out).all():
        raise InvalidInputError(f"{what} holds NaN or infinite values; send finite values")
    return out


def _as_activation(activation: ArrayLike) -> Floats:
    a = _real_float64(activation, "activation", 4, "(batch, channels, height, width)")
    if a.shape[2] < 1 or a.shape[3] < 1:
        raise InvalidInputError(f"activation must have a non-empty spatial grid, got {a.shape}")
    return a


def _as_weight(weight: ArrayLike, channels: int) -> Floats:
    w = _real_float64(weight, "weight", 2, "(classes, channels)")
    if w.shape[1] != channels:
        raise InvalidInputError(
            f"weight has {w.shape[1]} input channels but the activation has {channels}: "
            "pass the weight of the linear head that follows this activation"
        )
    if w.shape[0] < 2:
        raise InvalidInputError(f"weight must have at least 2 classes, got shape {w.shape}")
    return w


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
# Post-processing shared with the autograd path
# ---------------------------------------------------------------------------------------
def _interpolation_matrix(in_size: int, out_size: int) -> Floats:
    """(out, in) matrix of 1-D linear interpolation with half-pixel centres, as torch does.

    Source coordinate ``(i + 0.5) * in/out - 0.5``, clamped below at 0; the upper neighbour
    is clamped at the last pixel. No antialiasing when shrinking (torch's default).
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.intp), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = src - low
    matrix = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def upsample_bilinear(maps: ArrayLike, size: tuple[int, int]) -> Floats:
    """Resize maps (..., h, w) to (..., H, W) exactly like torch's bilinear, align_corners=False.

    Separable, so it is two small matrix products; works for any leading shape.
    """
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim < 2:
        raise InvalidInputError(f"maps must have at least 2 dimensions (h, w), got {m.shape}")
    height, width = _as_size(size)
    rows = _interpolation_matrix(m.shape[-2], height)
    cols = _interpolation_matrix(m.shape[-1], width)
    out: Floats = rows @ m @ cols.T
    return out


def minmax_normalize(maps: ArrayLike) -> Floats:
    """Rescale each map (..., H, W) to [0, 1] on its own; a constant map becomes all zeros.

    A constant map carries no spatial information, so zeros ("nothing highlighted") is
    the only value that does not invent a region; it also keeps the output free of NaN.
    """
    m = np.asarray(maps, dtype=np.float64)
    low = m.min(axis=(-2, -1), keepdims=True)
    span = m.max(axis=(-2, -1), keepdims=True) - low
    flat = span <= 0
    out: Floats = np.where(flat, 0.0, (m - low) / np.where(flat, 1.0, span))
    return out


def weighted_sum(activation: ArrayLike, weights: ArrayLike) -> Floats:
    """``sum_k alpha_k A_k`` per sample: (N, K) weights -> (N, h, w), (N, M, K) -> (N, M, h, w)."""
    a = np.asarray(activation, dtype=np.float64)
    alpha = np.asarray(weights, dtype=np.float64)
    if alpha.ndim not in (2, 3) or alpha.shape[0] != a.shape[0] or alpha.shape[-1] != a.shape[1]:
        raise InvalidInputError(
            f"weights must be (N, K) or (N, M, K) matching activation {a.shape}, got {alpha.shape}"
        )
    out: Floats = np.einsum("n...k,nkij->n...ij", alpha, a)
    return out


def finish_maps(raw: ArrayLike, size: tuple[int, int]) -> Floats:
    """ReLU at the activation resolution, bilinear upsampling to ``size``, then min-max to [0, 1].

    ``raw`` holds the weighted sums ``sum_k alpha_k A_k`` with shape (..., h, w). The ReLU
    comes first so that negative evidence never bleeds into the upsampled map.
    """
    return minmax_normalize(upsample_bilinear(np.maximum(np.asarray(raw, np.float64), 0.0), size))


def voice_maps(raw_contrast: ArrayLike, predicted: ArrayLike, size: tuple[int, int]) -> Floats:
    """VOICE uncertainty maps (N, H, W) from the raw contrast sums of every class (N, C, h, w).

    For each sample, the C - 1 contrast maps with Q != P are finished (:func:`finish_maps`),
    their per-pixel *unbiased* variance is taken, and the result is min-max normalised.
    With C = 2 there is a single contrast map, whose unbiased variance is undefined: the
    map is then all zeros (no disagreement can be measured). (Unbiased or not, the final
    min-max removes the constant factor; ddof = 1 is kept to match the definition.)
    Classes are processed in chunks merged with Chan's pairwise variance update, so memory
    stays bounded for C = 1000.
    """
    r = np.asarray(raw_contrast, dtype=np.float64)
    if r.ndim != 4:
        raise InvalidInputError(
            f"raw_contrast must have shape (batch, classes, height, width), got {r.shape}"
        )
    n, c = r.shape[:2]
    height, width = _as_size(size)
    p = _as_classes(predicted, n, c, "predicted")
    if c < 3:
        return np.zeros((n, height, width))
    # Column j of `others` is the j-th class that is not P, per sample.
    base = np.arange(c - 1)[None, :]
    others = base + (base >= p[:, None])
    contrasts = np.take_along_axis(r, others[:, :, None, None], axis=1)
    step = max(1, _MAX_CHUNK_ELEMENTS // max(1, n * height * width))
    count = 0
    mean = np.zeros((n, height, width))
    m2 = np.zeros((n, height, width))
    for start in range(0, c - 1, step):
        chunk = finish_maps(contrasts[:, start : start + step], (height, width))
        k = chunk.shape[1]
        chunk_mean = chunk.mean(axis=1)
        chunk_m2 = ((chunk - chunk_mean[:, None]) ** 2).sum(axis=1)
        delta = chunk_mean - mean
        total = count + k
        mean = mean + delta * (k / total)
        m2 = m2 + chunk_m2 + delta**2 * (count * k / total)
        count = total
    return minmax_normalize(m2 / (count - 1))


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
    mean = v.mean(axis=(1, 2))
    std = v.std(axis=(1, 2))
    snr = np.where(std > 0, mean / np.where(std > 0, std, 1.0), 0.0)
    on_v = v >= VOICE_THRESHOLD
    on_e = e >= VOICE_THRESHOLD
    inter = (on_v & on_e).sum(axis=(1, 2))
    union = (on_v | on_e).sum(axis=(1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return np.stack([snr, iou], axis=1)


# ---------------------------------------------------------------------------------------
# Closed forms for GAP heads
# ---------------------------------------------------------------------------------------
def _class_cams(a: Floats, w: Floats) -> Floats:
    """Raw GradCAM sums of every class, ``S_c = sum_k W_ck A_k / (h w)``, shape (N, C, h, w)."""
    return np.einsum("ck,nkij->ncij", w, a) / (a.shape[2] * a.shape[3])


def _gradcam_raw(a: Floats, w: Floats, classes: Ints) -> Floats:
    return weighted_sum(a, w[classes] / (a.shape[2] * a.shape[3]))


def gradcam(
    activation: ArrayLike, weight: ArrayLike, classes: ArrayLike, size: tuple[int, int]
) -> Floats:
    """GradCAM "why class c?" maps (N, H, W) in [0, 1]; ``alpha_k = W_ck / (h w)``.

    ``classes`` is one class index or one per sample (normally the prediction P).
    """
    a = _as_activation(activation)
    w = _as_weight(weight, a.shape[1])
    c = _as_classes(classes, a.shape[0], w.shape[0], "classes")
    return finish_maps(_gradcam_raw(a, w, c), size)


def counterfactual(
    activation: ArrayLike, weight: ArrayLike, classes: ArrayLike, size: tuple[int, int]
) -> Floats:
    """Counterfactual maps (N, H, W) in [0, 1]: GradCAM with weights ``-alpha_k``.

    They highlight regions whose removal would make the model *more* confident in the class.
    """
    a = _as_activation(activation)
    w = _as_weight(weight, a.shape[1])
    c = _as_classes(classes, a.shape[0], w.shape[0], "classes")
    return finish_maps(-_gradcam_raw(a, w, c), size)


def contrast(
    activation: ArrayLike,
    weight: ArrayLike,
    probs: ArrayLike,
    targets: ArrayLike,
    size: tuple[int, int],
) -> Floats:
    """Contrast "why P, rather than Q?" maps (N, H, W) in [0, 1]; Q = ``targets``.

    ``alpha_k = mean_ij dCE(z, Q)/dA_kij = sum_c (p_c - [c = Q]) W_ck / (h w)``: the gradient
    of the loss *towards* Q (sign +), as ContrastCAM backpropagates it, so the map shows
    the evidence that makes Q a worse answer than the prediction.
    """
    a = _as_activation(activation)
    w = _as_weight(weight, a.shape[1])
    n, c = a.shape[0], w.shape[0]
    p = _as_probs(probs, n, c)
    q = _as_classes(targets, n, c, "targets")
    delta = p.copy()
    delta[np.arange(n), q] -= 1.0
    alpha = delta @ w / (a.shape[2] * a.shape[3])
    return finish_maps(weighted_sum(a, alpha), size)


def voice(
    activation: ArrayLike,
    weight: ArrayLike,
    probs: ArrayLike,
    predicted: ArrayLike,
    size: tuple[int, int],
) -> tuple[Floats, Floats]:
    """VOICE uncertainty maps (N, H, W) in [0, 1] and their statistics (N, 2) = (SNR, IoU).

    The raw contrast sum for every Q is ``sum_c p_c S_c - S_Q`` with ``S_c`` the raw GradCAM
    sum of class c, so all C contrasts cost one einsum. See :func:`voice_maps` and
    :func:`voice_statistics`; the explanation in the IoU is the GradCAM map of ``predicted``.
    """
    a = _as_activation(activation)
    w = _as_weight(weight, a.shape[1])
    n, c = a.shape[0], w.shape[0]
    p = _as_probs(probs, n, c)
    pred = _as_classes(predicted, n, c, "predicted")
    cams = _class_cams(a, w)
    raw_contrast = np.einsum("nc,ncij->nij", p, cams)[:, None] - cams
    maps = voice_maps(raw_contrast, pred, size)
    explanation = finish_maps(_gradcam_raw(a, w, pred), size)
    return maps, voice_statistics(maps, explanation)


def explain(
    method: str,
    activation: ArrayLike,
    weight: ArrayLike,
    logits: ArrayLike,
    size: tuple[int, int],
    contrast_class: ArrayLike | None = None,
) -> tuple[Floats, Floats | None]:
    """The server's entry point: maps (N, H, W) in [0, 1] and, for ``voice`` only, stats (N, 2).

    Computes ``p = softmax(logits)`` and ``P = argmax logits`` (ties: lowest index). For
    ``contrast``, ``contrast_class`` (one int or one per sample) names Q, by default the
    second most probable class; it is refused for the other methods, which do not use it.
    """
    check_method(method)
    z = as_logits(logits)
    a = _as_activation(activation)
    if a.shape[0] != z.shape[0]:
        raise InvalidInputError(
            f"activation has {a.shape[0]} samples but logits have {z.shape[0]}; "
            "pass both outputs of the same forward pass"
        )
    w = _as_weight(weight, a.shape[1])
    if w.shape[0] != z.shape[1]:
        raise InvalidInputError(
            f"weight has {w.shape[0]} classes but logits have {z.shape[1]}; "
            "pass the weight of the head that produced these logits"
        )
    if contrast_class is not None and method != "contrast":
        raise InvalidInputError(
            f"contrast_class is only used by method 'contrast', not {method!r}: drop it "
            "or ask for method 'contrast'"
        )
    pred = predicted_class(z)
    if method == "gradcam":
        return gradcam(a, w, pred, size), None
    if method == "counterfactual":
        return counterfactual(a, w, pred, size), None
    if method == "contrast":
        return contrast(a, w, softmax(z), contrast_targets(z, contrast_class), size), None
    return voice(a, w, softmax(z), pred, size)
