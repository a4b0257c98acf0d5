"""Specification of gradtrust.core.introspection: the introspective features against
torch.autograd (random heads and the trained demo model), and the factored first layer
against the dense one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradtrust import InvalidInputError
from gradtrust.core import introspection as I
from tests.reference.autograd_introspection import introspective_features_by_autograd

REPO = Path(__file__).resolve().parents[2]
DEMO_STATE = REPO / "model_repository" / "gradtrust_mnist" / "demo_cnn.pt"
DEMO_DIGITS = REPO / "tests" / "data" / "mnist_test_digits.npz"
ATOL = 1e-12  # unit-norm features in float64; observed ~1e-16


def _random_head(c: int, d: int, n: int, seed: int) -> tuple[nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(d, c, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(3.0 * torch.randn(c, d, generator=gen, dtype=torch.float64) / d**0.5)
        head.bias.copy_(0.5 * torch.randn(c, generator=gen, dtype=torch.float64))
    return head, torch.randn(n, d, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(("c", "d"), [(4, 7), (10, 16), (1000, 24)])
def test_introspective_features_equal_autograd_when_head_is_random(c: int, d: int) -> None:
    head, h = _random_head(c, d, n=5, seed=c)
    expected = introspective_features_by_autograd(head, head, h)
    logits = head(h).detach().numpy()
    got = I.introspective_features(logits, h.numpy())
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-12)


def test_weight_gradient_equals_autograd_unnormalised_when_head_is_random() -> None:
    head, h = _random_head(10, 6, n=3, seed=1)
    for h_i in h:
        z = head(h_i[None])
        loss = torch.nn.functional.cross_entropy(z, torch.ones_like(z))
        (grad,) = torch.autograd.grad(loss, head.weight)
        got = I.weight_gradient(z.detach().numpy(), h_i[None].numpy())[0]
        np.testing.assert_allclose(got, grad.numpy(), rtol=1e-12, atol=1e-14)


def test_introspective_features_equal_autograd_when_model_is_the_trained_demo() -> None:
    from gradtrust.tools.demo.cnn import load_demo_model

    model = load_demo_model(DEMO_STATE).double()
    data = np.load(DEMO_DIGITS)
    images = torch.from_numpy(data["images"][:24].astype(np.float64) / 255.0)
    expected = introspective_features_by_autograd(model, model.head, images)
    with torch.no_grad():
        logits, features, _ = model.forward_all(images)
    got = I.introspective_features(logits.numpy(), features.numpy())
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_introspective_features_are_unchanged_when_a_constant_is_added_to_every_logit() -> None:
    head, h = _random_head(10, 8, n=6, seed=3)
    logits = head(h).detach().numpy()
    np.testing.assert_allclose(
        I.introspective_features(logits + 7.5, h.numpy()),
        I.introspective_features(logits, h.numpy()),
        atol=1e-12,
    )


def test_introspective_features_do_not_depend_on_the_batch_when_samples_join() -> None:
    head, h = _random_head(10, 8, n=6, seed=4)
    logits = head(h).detach().numpy()
    whole = I.introspective_features(logits, h.numpy())
    alone = np.concatenate(
        [I.introspective_features(logits[i : i + 1], h[i : i + 1].numpy()) for i in range(6)]
    )
    np.testing.assert_array_equal(whole, alone)


def test_introspective_factors_are_zero_when_softmax_is_uniform_or_features_are_zero() -> None:
    logits = np.array([[2.0, 2.0, 2.0], [3.0, 0.0, -1.0]])
    features = np.array([[1.0, 2.0], [0.0, 0.0]])
    g, h = I.introspective_factors(logits, features)
    assert not g.any() and not h.any()
    assert not I.introspective_features(logits, features).any()


def test_introspective_factors_refuse_non_finite_logits_naming_the_sample() -> None:
    with pytest.raises(InvalidInputError, match=r"sample\(s\) \[1\]"):
        I.introspective_factors(np.array([[0.0, 1.0], [np.nan, 0.0]]), np.ones((2, 3)))


def test_introspective_factors_refuse_when_rows_disagree() -> None:
    with pytest.raises(InvalidInputError, match="rows"):
        I.introspective_factors(np.zeros((2, 3)), np.ones((3, 4)))


def test_confounding_gradient_rows_sum_to_zero_when_logits_are_huge() -> None:
    g = I.confounding_gradient(np.array([[1e30, 0.0, -1e30], [5.0, 4.0, 3.0]]))
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g.sum(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(g[0], [2.0, -1.0, -1.0])


@pytest.mark.parametrize(("c", "d", "k", "rank"), [(4, 5, 3, 2), (10, 16, 8, 4), (3, 2, 5, 2)])
def test_factored_first_layers_equal_the_dense_layer_when_features_are_small(
    c: int, d: int, k: int, rank: int
) -> None:
    rng = np.random.default_rng(c * 100 + d)
    logits, features = rng.normal(size=(6, c)) * 2, rng.normal(size=(6, d))
    g, h = I.introspective_factors(logits, features)
    vec = I.introspective_features(logits, features)
    a, b = rng.normal(size=(k, rank, c)), rng.normal(size=(k, rank, d))
    bias = rng.normal(size=k)
    dense_w = I.separable_to_dense(a, b)
    assert dense_w.shape == (k, c * d)
    expected = I.dense_first_layer(dense_w, bias, vec)
    np.testing.assert_allclose(I.separable_first_layer(a, b, bias, g, h), expected, atol=1e-12)
    np.testing.assert_allclose(I.contracted_first_layer(dense_w, bias, g, h), expected, atol=1e-12)


def test_separable_first_layer_reaches_any_dense_layer_when_rank_is_min_c_d() -> None:
    c, d, k = 4, 6, 3
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(k, c, d))
    # Each row's SVD is a rank-min(C, D) separable factorisation of it.
    u, s, vt = np.linalg.svd(dense, full_matrices=False)  # (k, c, r), (k, r), (k, r, d)
    a = np.transpose(u * s[:, None, :], (0, 2, 1))
    b = vt
    logits, features = rng.normal(size=(5, c)), rng.normal(size=(5, d))
    g, h = I.introspective_factors(logits, features)
    bias = np.zeros(k)
    np.testing.assert_allclose(
        I.separable_first_layer(a, b, bias, g, h),
        I.dense_first_layer(dense.reshape(k, -1), bias, I.introspective_features(logits, features)),
        atol=1e-12,
    )


def test_introspective_prediction_is_argmax_and_softmax_probability_when_logits_tie() -> None:
    cls, conf = I.introspective_prediction(np.array([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0]]))
    assert cls.tolist() == [1, 0]
    np.testing.assert_allclose(conf, [np.exp(3) / (np.exp(1) + 2 * np.exp(3)), 1 / 3])
