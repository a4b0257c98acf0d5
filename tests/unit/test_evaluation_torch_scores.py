"""The autograd-only baselines (odin, purview, mc_dropout), checked against per-sample
float64 autograd runs of their definitions on the real demo model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtrust.errors import InvalidInputError
from gradtrust.tools.demo.cnn import load_demo_model
from gradtrust.tools.evaluate import torch_scores as T
from tests.conftest import MODEL_REPOSITORY

WEIGHTS = MODEL_REPOSITORY / "gradtrust_mnist" / "demo_cnn.pt"


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.set_num_threads(2)
    return load_demo_model(WEIGHTS)


@pytest.fixture(scope="module")
def images(digits) -> np.ndarray:
    return digits[0][:6]


def _reference_purview(model: nn.Module, image: np.ndarray) -> tuple[float, float]:
    """The released definition, one sample, float64: backward of the mean BCE against ones,
    squared norm per parameter tensor, minus the mean over each half (floor/ceil of j/2)."""
    m = copy.deepcopy(model).double()
    m.zero_grad()
    logits = m(torch.from_numpy(image[None]).double())
    nn.BCEWithLogitsLoss()(logits, torch.ones_like(logits)).backward()
    norms = [float((p.grad**2).sum()) for p in m.parameters()]
    j = len(norms) - 1
    return -float(np.mean(norms[: math.floor(j / 2)])), -float(np.mean(norms[math.ceil(j / 2) :]))


def test_purview_matches_the_autograd_definition_when_computed_per_sample(model, images):
    initial, final = T.purview(model, images, batch_size=4)
    expected = np.array([_reference_purview(model, img) for img in images])
    np.testing.assert_allclose(initial, expected[:, 0], rtol=1e-4)
    np.testing.assert_allclose(final, expected[:, 1], rtol=1e-4)
    assert (initial < 0).all() and (final < 0).all()


def test_purview_split_follows_the_released_indices_when_counting_tensors():
    assert T.purview_split(14) == (slice(0, 6), slice(7, 14))
    assert T.purview_split(5) == (slice(0, 2), slice(2, 5))
    with pytest.raises(InvalidInputError):
        T.purview_split(1)


def _reference_odin(model: nn.Module, image: np.ndarray) -> float:
    m = copy.deepcopy(model).double()
    x = torch.from_numpy(image[None]).double().requires_grad_(True)
    logits = m(x)
    loss = F.cross_entropy(logits / T.ODIN_TEMPERATURE, logits.argmax(dim=1))
    loss.backward()
    assert x.grad is not None
    with torch.no_grad():
        shifted = x - T.ODIN_EPSILON * torch.sign(x.grad)
        return float(torch.softmax(m(shifted) / T.ODIN_TEMPERATURE, dim=1).max())


def test_odin_matches_the_autograd_definition_when_computed_per_sample(model, images):
    got = T.odin(model, images, batch_size=4)
    expected = [_reference_odin(model, img) for img in images]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert (got >= 0.1).all() and (got <= 1.0).all()  # range [1/C, 1]


def test_torch_scores_do_not_depend_on_the_batch_when_samples_are_added(model, images):
    alone = T.odin(model, images[:1]), T.purview(model, images[:1])
    together = T.odin(model, images), T.purview(model, images)
    np.testing.assert_allclose(together[0][:1], alone[0], rtol=1e-5)
    np.testing.assert_allclose(together[1][0][:1], alone[1][0], rtol=1e-4)


def test_torch_scores_refuse_a_model_when_it_is_in_training_mode(images):
    m = load_demo_model(WEIGHTS).train()
    with pytest.raises(InvalidInputError, match="eval mode"):
        T.odin(m, images)


def test_mc_dropout_is_unavailable_when_the_model_has_no_dropout(model, images):
    assert not T.has_dropout(model)
    with pytest.raises(InvalidInputError, match="no dropout layers"):
        T.mc_dropout(model, images)
    scores, missing = T.torch_scores(model, images[:2])
    assert set(scores) == {"odin", "purview_initial", "purview_final"}
    assert missing == {"mc_dropout": "the model has no dropout layers"}


def test_mc_dropout_scores_negative_entropy_of_the_mean_when_the_model_has_dropout():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)
    )
    net.eval()
    x = np.random.default_rng(0).random((5, 1, 4, 4)).astype(np.float32)
    got = T.mc_dropout(net, x, passes=10, seed=3)
    assert got.shape == (5,) and (got <= 0).all() and (got >= -math.log(3) - 1e-12).all()
    np.testing.assert_array_equal(got, T.mc_dropout(net, x, passes=10, seed=3))
    assert not net.training and not net[3].training  # dropout switched back off
    # Reference: the same 10 masks, drawn in the same order from the same seed.
    torch.manual_seed(3)
    net[3].train()
    with torch.no_grad():
        mean = sum(torch.softmax(net(torch.from_numpy(x)).double(), 1) for _ in range(10)) / 10
    net.eval()
    np.testing.assert_allclose(got, (mean * mean.log()).sum(1).numpy(), rtol=1e-12)
