"""Introspective features: the tutorial's second stage, in closed form at the last layer.

Introspective learning (Prabhushankar and AlRegib, NeurIPS 2022) asks the trained network
"why P, rather than Q?" for every class Q at once and predicts a second time from the
answers. The answers are last-layer gradients: the loss between the network's prediction
and a vector of all ones (a *confounding* label: every class at once) is backpropagated to
the final linear layer ``z = W h + b`` (``W`` is C x D), and the normalised, vectorised
weight gradient is the feature of a small MLP, the introspective network.

**What is followed, and where it comes from.** The authors' repository
(github.com/olivesgatech/Introspective-Learning) releases the introspective
*explanations* only; its README lists the introspective features as "coming soon", so the
loss and the normalisation below are this project's reading of the method, stated here:

- loss: cross-entropy against the all-ones target, ``L = -sum_c log p_c`` with
  ``p = softmax(z)``. It is the sum over every class Q of the cross-entropy towards Q
  (the target enters linearly), so one backward pass answers all C contrast questions;
- gradient (bias not used): ``dL/dz = C p - 1 = g``, hence ``dL/dW = g h^T`` (C x D): an
  O(C) vector from the softmax and the penultimate features, nothing more. ``g`` depends
  on the logits only through ``p`` (a constant added to every logit changes nothing);
- normalisation: the vectorised gradient ``vec(g h^T)`` (row-major, C*D values) divided
  by its L2 norm ``||g|| ||h||``. The normalised feature is the outer product of the two
  unit vectors ``g / ||g||`` and ``h / ||h||``, so whether the loss is summed or averaged
  over classes or batch (a constant factor) does not matter. Degenerate cases, by
  design: a uniform softmax (``g = 0``) or all-zero features (``h = 0``) give the zero
  feature vector, never NaN.

``tests/reference/autograd_introspection.py`` computes the same features with
``torch.autograd`` from the definition, and the tests compare the two.

**The first MLP layer never materialises the C*D features.** At C = 1000 and D = 1280
``vec(g h^T)`` has 1.28 million entries per image, and a dense first layer of ``k`` units
``M vec(g h^T)`` would hold ``k`` x 1.28 million weights. Because the feature is an
outer product, ``M_k . vec(g h^T) = g^T M_k h`` with ``M_k`` the k-th row reshaped to
(C, D): :func:`contracted_first_layer` evaluates that (``einsum('kcd,nc,nd->nk')``) without
forming any per-image C*D vector, and :func:`separable_first_layer` restricts each ``M_k``
to rank R, ``M_k = sum_r a_kr b_kr^T``, so the layer is ``sum_r (a_kr . g)(b_kr . h)``:
two small matrix products and a product of their results, O(k R (C + D)) per image and
k R (C + D) weights. With ``R = min(C, D)`` every (C, D) matrix is reachable, so the
separable layer is exactly as expressive as the dense one; the served introspective
network uses it with R chosen per model (``gradtrust introspect --rank``).
:func:`dense_first_layer` is the literal definition; the tests check all three agree.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from gradtrust.errors import InvalidInputError

Array = NDArray[np.float64]


def _as_batch(values: NDArray[np.floating], name: str, columns: int | None = None) -> Array:
    x = np.asarray(values)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise InvalidInputError(
            f"{name} must be a numeric (N, {name[0].upper()}) array, got shape {x.shape}"
        )
    if columns is not None and x.shape[1] != columns:
        raise InvalidInputError(f"{name} has {x.shape[1]} columns, expected {columns}")
    x = x.astype(np.float64, copy=False)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise InvalidInputError(
            f"{name} hold non-finite values for sample(s) {bad[:10].tolist()}: "
            "check the input preprocessing"
        )
    return x


def confounding_gradient(logits: NDArray[np.floating]) -> Array:
    """``dL/dz = C softmax(z) - 1`` (N, C) of the cross-entropy against the all-ones label.

    Each row sums to 0; it is 0 only where the softmax is uniform.
    """
    z = _as_batch(logits, "logits")
    if z.shape[1] < 2:
        raise InvalidInputError(f"logits need at least 2 classes, got {z.shape[1]}")
    shifted = z - z.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    return z.shape[1] * p - 1.0


def _unit_rows(x: Array) -> Array:
    """Each row divided by its L2 norm; zero rows stay zero (the defined degenerate case)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def introspective_factors(
    logits: NDArray[np.floating], features: NDArray[np.floating]
) -> tuple[Array, Array]:
    """``(g / ||g||, h / ||h||)``, (N, C) and (N, D): the normalised introspective feature is
    their outer product, ``vec(g h^T) / (||g|| ||h||)``. This is what the served second
    stage takes as input, O(C + D) per image.

    A row of zeros in either factor (uniform softmax, zero features) makes the feature 0.
    """
    g = confounding_gradient(logits)
    h = _as_batch(features, "features")
    if len(h) != len(g):
        raise InvalidInputError(f"{len(g)} rows of logits but {len(h)} rows of features")
    g_unit, h_unit = _unit_rows(g), _unit_rows(h)
    zero = ~(g_unit.any(axis=1) & h_unit.any(axis=1))
    if zero.any():  # the outer product is 0 when either factor is: say so in both
        g_unit[zero] = 0.0
        h_unit[zero] = 0.0
    return g_unit, h_unit


def weight_gradient(logits: NDArray[np.floating], features: NDArray[np.floating]) -> Array:
    """``dL/dW = g h^T`` (N, C, D), unnormalised. Materialises C*D values per image: for
    tests and small models only."""
    g = confounding_gradient(logits)
    h = _as_batch(features, "features")
    return g[:, :, None] * h[:, None, :]


def introspective_features(logits: NDArray[np.floating], features: NDArray[np.floating]) -> Array:
    """The normalised, vectorised gradient (N, C*D), row-major over (C, D): the literal
    introspective feature. Materialises C*D values per image: for tests and small models."""
    g_unit, h_unit = introspective_factors(logits, features)
    return (g_unit[:, :, None] * h_unit[:, None, :]).reshape(len(g_unit), -1)


def dense_first_layer(
    weight: NDArray[np.floating], bias: NDArray[np.floating], vectorised: NDArray[np.floating]
) -> Array:
    """``vectorised @ weight.T + bias``: a first layer (k, C*D) applied to the literal
    features (N, C*D). The reference for the factored forms below."""
    return np.asarray(vectorised, np.float64) @ np.asarray(weight, np.float64).T + bias


def contracted_first_layer(
    weight: NDArray[np.floating],
    bias: NDArray[np.floating],
    g_unit: NDArray[np.floating],
    h_unit: NDArray[np.floating],
) -> Array:
    """The dense layer (weight (k, C*D) or (k, C, D)) on ``vec(g h^T)`` as ``g^T M_k h``:
    no per-image C*D vector is formed (the weight itself still has k*C*D values)."""
    g = np.asarray(g_unit, np.float64)
    h = np.asarray(h_unit, np.float64)
    w = np.asarray(weight, np.float64).reshape(-1, g.shape[1], h.shape[1])
    return np.einsum("kcd,nc,nd->nk", w, g, h, optimize=True) + bias


def separable_first_layer(
    a: NDArray[np.floating],
    b: NDArray[np.floating],
    bias: NDArray[np.floating],
    g_unit: NDArray[np.floating],
    h_unit: NDArray[np.floating],
) -> Array:
    """The rank-R first layer ``sum_r (a_kr . g)(b_kr . h) + bias_k`` (N, k), with ``a``
    (k, R, C) and ``b`` (k, R, D): equal to :func:`dense_first_layer` with the weight
    :func:`separable_to_dense` ``(a, b)``, in O(k R (C + D)) per image."""
    g = np.asarray(g_unit, np.float64)
    h = np.asarray(h_unit, np.float64)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    left = np.einsum("krc,nc->nkr", a64, g)
    right = np.einsum("krd,nd->nkr", b64, h)
    return (left * right).sum(axis=2) + bias


def separable_to_dense(a: NDArray[np.floating], b: NDArray[np.floating]) -> Array:
    """The dense weight (k, C*D) a rank-R separable layer stands for: row k is
    ``vec(sum_r a_kr b_kr^T)``. Materialises k*C*D values: for tests."""
    dense = np.einsum("krc,krd->kcd", np.asarray(a, np.float64), np.asarray(b, np.float64))
    return dense.reshape(dense.shape[0], -1)


def introspective_prediction(
    introspective_logits: NDArray[np.floating],
) -> tuple[NDArray[np.int64], Array]:
    """The second stage's class (argmax, ties to the lowest index) and its softmax
    probability, in [1/C, 1], from the introspective network's logits (N, C)."""
    z = _as_batch(introspective_logits, "introspective logits")
    cls = np.argmax(z, axis=1).astype(np.int64)
    shifted = z - z.max(axis=1, keepdims=True)
    confidence = 1.0 / np.exp(shifted).sum(axis=1)  # exp(0) / sum: the winner's probability
    return cls, confidence
