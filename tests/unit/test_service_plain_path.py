"""The service's per-sample path for small batches of plain requests (the cheap outputs
of an uncalibrated model): the same answers, bit for bit, as the vectorised path."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from gradtrust.errors import InvalidInputError
from gradtrust.serving import service as service_module
from gradtrust.serving.contract import CLASS_ID, CONFIDENCE, GRADTRUST, LABEL, LOGITS, SCORES
from gradtrust.serving.service import BatchResult, ScoringRequest, TrustService
from gradtrust.serving.settings import ModelSettings, RequestOptions

C = 1000
PLAIN = RequestOptions(scores=None, contrast_k=3, heatmap_method=None, contrast_class=None)
SETTINGS = ModelSettings(labels=tuple(f"class_{i}" for i in range(C)), pixel_min=0.0, pixel_max=1.0)


class _GivenLogits:
    """A classifier whose forward pass returns the next rows of fixed logits."""

    num_classes = C
    input_shape = (1, 2, 2)
    input_dtype = "float32"
    has_features = True  # (never asked for: the requests name no scores)
    has_activation = False
    providers = ["given"]

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits

    def head_weight(self) -> np.ndarray:
        raise AssertionError("not needed")

    def run(self, images: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        assert list(outputs) == [LOGITS]
        return {LOGITS: self.logits[: len(images)].copy()}


def _logits(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, C)) * rng.choice([0.1, 3.0, 30.0, 1e30], size=(n, 1))).astype(
        np.float32
    )
    z[0, 5] = z[0].max()  # a tie for the prediction
    return z


def _requests(sizes: Sequence[int], kinds: Sequence[frozenset[str] | None]) -> list[ScoringRequest]:
    images = np.full((sum(sizes), 1, 2, 2), 0.5, dtype=np.float32)
    bounds = np.cumsum([0, *sizes])
    return [
        ScoringRequest(images[bounds[i] : bounds[i + 1]], PLAIN, kinds[i % len(kinds)])
        for i in range(len(sizes))
    ]


def _both_paths(logits: np.ndarray, requests: list[ScoringRequest]) -> tuple[BatchResult, ...]:
    service = TrustService(_GivenLogits(logits), SETTINGS)
    small = service.run(requests)
    limit = service_module._PER_SAMPLE_MAX
    service_module._PER_SAMPLE_MAX = 0  # every batch takes the vectorised path
    try:
        general = service.run(requests)
    finally:
        service_module._PER_SAMPLE_MAX = limit
    return small, general


def _assert_same(small: BatchResult, general: BatchResult) -> None:
    assert len(small.answers) == len(general.answers)
    for got, expected in zip(small.answers, general.answers, strict=True):
        if isinstance(expected, InvalidInputError):
            assert isinstance(got, InvalidInputError) and str(got) == str(expected)
            continue
        assert isinstance(got, dict) and list(got) == list(expected)
        for name, value in expected.items():
            assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
            np.testing.assert_array_equal(got[name], value, strict=True)
    np.testing.assert_array_equal(small.gradtrust, general.gradtrust, strict=True)
    np.testing.assert_array_equal(small.confidence, general.confidence, strict=True)
    assert small.trust_prob is None and general.trust_prob is None
    assert small.heatmap_seconds is None and general.heatmap_seconds is None


KINDS = [
    None,
    frozenset({LABEL, CLASS_ID, CONFIDENCE, GRADTRUST}),
    frozenset({GRADTRUST}),
    frozenset({LABEL, CONFIDENCE, SCORES}),  # SCORES named, none computed: no scores option
]


@pytest.mark.parametrize(
    "sizes", [(1,), (2,), (1, 1, 1, 1), (3, 1, 2), (1,) * 8, (4, 4), (1,) * 9, (5, 4)]
)
def test_service_answers_small_plain_batches_as_the_vectorised_path_when_logits_are_finite(
    sizes,
):
    logits = _logits(sum(sizes), seed=len(sizes))
    _assert_same(*_both_paths(logits, _requests(sizes, KINDS)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_service_refuses_only_requests_with_non_finite_logits_when_batch_is_small(bad):
    sizes = (1, 3, 1, 2)
    logits = _logits(sum(sizes), seed=3)
    logits[2, 10] = bad  # the second request's second image
    logits[4, :] = bad  # the third request's only image
    small, general = _both_paths(logits, _requests(sizes, KINDS))
    _assert_same(small, general)
    assert isinstance(small.answers[1], InvalidInputError)
    assert "sample(s) [1]" in str(small.answers[1])
    assert isinstance(small.answers[2], InvalidInputError)
    assert isinstance(small.answers[0], dict) and isinstance(small.answers[3], dict)
    assert len(small.gradtrust) == 3  # the metrics count the answered images only


def test_service_answers_cannot_change_the_next_answer_when_a_caller_writes_into_them():
    logits = _logits(1, seed=0)
    service = TrustService(_GivenLogits(logits), SETTINGS)
    first = service.run(_requests((1,), [None])).answers[0]
    assert isinstance(first, dict)
    for name in (LABEL, CLASS_ID):  # views of per-model tables: read-only
        with pytest.raises(ValueError, match="read-only"):
            first[name][0, 0] = first[name][0, 0]
    first[CONFIDENCE][0, 0] = -1.0
    second = service.run(_requests((1,), [None])).answers[0]
    assert isinstance(second, dict) and second[CONFIDENCE][0, 0] > 0
