"""Specification of the headline score ``gradtrust`` (the served GRADTRUST output).

It is the log of the counterfactual gradient-variance ratio. What it must do, beyond the
generic score checks in ``test_scores.py``: ignore a constant added to every logit (which
plain cross-entropy training leaves free, and which the released-code form does not
ignore), equal ``torch.autograd`` run on its definition through whole trained networks
(the demo model and a model trained with plain cross-entropy), and keep confident
predictions apart instead of tying them at a float maximum.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from gradtrust.core import scores as S
from tests.reference.autograd_gradtrust import gradtrust_by_autograd

LOG_ATOL = 1e-9  # absolute on the log = relative on the variance ratio; observed ~1e-13
REPO = Path(__file__).resolve().parents[2]
DEMO_STATE = REPO / "model_repository" / "gradtrust_mnist" / "demo_cnn.pt"
DEMO_DIGITS = REPO / "tests" / "data" / "mnist_test_digits.npz"

_BOUNDED_LOGITS = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=12),
    elements=st.floats(-60, 60, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=200, deadline=None)
@given(z=_BOUNDED_LOGITS, offset=st.floats(-1e3, 1e3, allow_nan=False))
def test_gradtrust_is_unchanged_when_a_constant_is_added_to_every_logit(
    z: np.ndarray, offset: float
) -> None:
    # Only rounding of z + offset may show (|offset| <= 1e3 moves each logit by < 1e-12).
    np.testing.assert_allclose(S.gradtrust(z + offset), S.gradtrust(z), rtol=0, atol=LOG_ATOL)


def test_gradtrust_released_changes_when_a_constant_is_added_to_every_logit() -> None:
    # Why the released form is no longer the headline: same softmax, different score, and
    # here a different order: at offset 0 it trusts the 51 %-confident sample (one very
    # negative logit) more than the 92 %-confident one; 3 added to every logit swaps them.
    z = np.array([[4.0, 1.0, 0.0, 0.0], [1.0, 0.5, 0.0, -6.0]])
    np.testing.assert_allclose(S.softmax(z + 3.0), S.softmax(z), rtol=1e-14)
    before, after = S.gradtrust_released(z), S.gradtrust_released(z + 3.0)
    assert not np.allclose(before, after, rtol=1e-3)
    assert before[0] < before[1] and after[0] > after[1]
    assert S.gradtrust(z)[0] > S.gradtrust(z)[1]  # the headline agrees with the softmax
    np.testing.assert_allclose(S.gradtrust(z + 3.0), S.gradtrust(z), rtol=1e-14)


@pytest.mark.parametrize("c", [4, 10, 1000])
def test_gradtrust_equals_autograd_of_its_definition_when_random_linear_head(c: int) -> None:
    gen = torch.Generator().manual_seed(c)
    d = 32
    head = nn.Linear(d, c, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(4.0 * torch.randn(c, d, generator=gen, dtype=torch.float64) / d**0.5)
        head.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64) - 5.0)  # an offset
    h = torch.randn(6, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        z = head(h).numpy()
    want = gradtrust_by_autograd(head, head, h, k=S.GRADTRUST_K)
    np.testing.assert_allclose(S.gradtrust(z), want, rtol=0, atol=LOG_ATOL)


class _DigitsMLP(nn.Module):
    """Flatten + MLP on scikit-learn's 8x8 digits, trained below with plain cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def plain_ce_model() -> tuple[_DigitsMLP, torch.Tensor, torch.Tensor]:
    """An ordinary classifier: plain cross-entropy, no logit penalty, real digits, 1 s."""
    digits = load_digits()
    x = torch.from_numpy(digits.images / 16.0)[:, None]
    y = torch.from_numpy(digits.target)
    torch.manual_seed(0)
    model = _DigitsMLP().double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        loss = F.cross_entropy(model(x[:1200]), y[:1200])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), x[1200:], y[1200:]


def test_gradtrust_equals_autograd_of_its_definition_when_model_trained_with_plain_ce(
    plain_ce_model: tuple[_DigitsMLP, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = plain_ce_model
    with torch.no_grad():
        z = model(x).numpy()
    assert (z.argmax(axis=1) == y.numpy()).mean() > 0.85, "the model did not train"
    # Plain cross-entropy leaves the logit level free: it is far from 1/C here.
    assert abs(z.mean()) > 1.0
    want = gradtrust_by_autograd(model, model.head, x[:40], k=S.GRADTRUST_K)
    np.testing.assert_allclose(S.gradtrust(z[:40]), want, rtol=0, atol=LOG_ATOL)


def test_gradtrust_equals_autograd_of_its_definition_when_demo_model_scores_real_digits() -> None:
    from gradtrust.tools.demo.cnn import load_demo_model

    missing = [str(p.relative_to(REPO)) for p in (DEMO_STATE, DEMO_DIGITS) if not p.exists()]
    if missing:
        pytest.fail(f"demo files missing: {', '.join(missing)}; run `make train-demo`")
    model = load_demo_model(DEMO_STATE).double().eval()
    with np.load(DEMO_DIGITS) as data:
        x = torch.from_numpy(data["images"][:24].astype(np.float64) / 255.0)
    with torch.no_grad():
        z = model(x).numpy()
    want = gradtrust_by_autograd(model, model.head, x, k=S.GRADTRUST_K)
    np.testing.assert_allclose(S.gradtrust(z), want, rtol=0, atol=LOG_ATOL)


def test_gradtrust_keeps_confident_predictions_distinct_when_served_as_float32() -> None:
    gaps = np.array([5.0, 20.0, 44.0, 45.0, 50.0, 100.0, 400.0, 1e3, 1e5, 1e10])
    z = np.zeros((gaps.size, 10))
    z[:, 0] = gaps
    served = S.gradtrust(z).astype(np.float32)
    assert np.all(np.isfinite(served))
    assert np.all(np.diff(served) > 0), served
    # Hand value: p = (1, s, ..., s) / Z with s = e^-gap and nine runner-ups, k = 3:
    # mean_k ||p - e_Q||^2 Z^2 = (Z - s)^2 + 1 + 8 s^2 -> 2, ||p - e_P||^2 Z^2 = 90 s^2.
    np.testing.assert_allclose(S.gradtrust(z[-4:]), 2 * gaps[-4:] - math.log(45), rtol=1e-15)
    # The ratio itself (contrast_trust, e^2gap / 45) ties these at float32's maximum once
    # the gap passes about 46: the reason the headline is served as a logarithm.
    ratio = np.minimum(S.contrast_trust(z), np.finfo(np.float32).max).astype(np.float32)
    assert ratio[3] < np.finfo(np.float32).max and np.unique(ratio[4:]).size == 1


def test_gradtrust_ignores_contrast_k_when_computed_with_other_scores() -> None:
    rng = np.random.default_rng(3)
    z = 3.0 * rng.standard_normal((8, 10))
    alone = S.gradtrust(z)
    for k in (1, 2, 9):
        together = S.compute_scores(z, ["contrast_trust", "gradtrust"], contrast_k=k)
        np.testing.assert_array_equal(together["gradtrust"], alone)
    np.testing.assert_allclose(alone, np.log(S.contrast_trust(z, k=S.GRADTRUST_K)), atol=1e-12)


def test_gradtrust_of_a_sample_is_unchanged_when_other_samples_join_the_batch() -> None:
    rng = np.random.default_rng(4)
    z = 5.0 * rng.standard_normal((4, 1000))
    others = np.zeros((3, 1000))
    others[0, 0], others[1, 5], others[2, :] = 1e30, -400.0, 7.0
    batch = np.concatenate([others[:2], z, others[2:]])
    got = S.gradtrust(batch)[2:6]
    np.testing.assert_array_equal(got, np.concatenate([S.gradtrust(row[None]) for row in z]))
