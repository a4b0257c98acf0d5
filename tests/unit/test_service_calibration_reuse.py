"""A calibrated entry computes GRADTRUST and msp once per batch: the service hands the
values it already has to the calibration (``known``), and TRUST_PROB stays bit-identical
to applying the calibration from scratch."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrust.core import scores
from gradtrust.core.calibration import TrustCalibration, compute_inputs, load_model_calibration
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import FEATURES, LOGITS, TRUST_PROB
from gradtrust.serving.service import ScoringRequest, TrustService, _base_scores
from gradtrust.serving.settings import ModelSettings, RequestOptions
from tests.conftest import DEMO_MODEL, DEMO_ONNX, MODEL_REPOSITORY

ENTRY = MODEL_REPOSITORY / DEMO_MODEL
LABELS = (ENTRY / "labels.txt").read_text().split()
SETTINGS = ModelSettings.from_parameters({"pixel_range": "0,1"}, LABELS)
PLAIN = RequestOptions(scores=None, contrast_k=3, heatmap_method=None, contrast_class=None)


@pytest.fixture(scope="module")
def calibration() -> TrustCalibration:
    loaded = load_model_calibration(ENTRY)
    assert loaded is not None, "the demo entry ships a calibration"
    # The reuse matters only if the signal reads some of what the service computes.
    assert {"gradtrust", "msp"} & set(loaded.signal.inputs)
    return loaded


def _random_batch(seed: int, n: int, c: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits from float32 (as the network returns them) at several scales, with ties and
    large gaps; non-negative features (post-ReLU), some rows all zero."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.1, 1.0, 5.0, 40.0], size=(n, 1))
    logits = (rng.normal(size=(n, c)) * scale).astype(np.float32).astype(np.float64)
    logits[0] = 1.5  # all tied
    logits[1, 3] += 200.0  # a huge gap
    features = np.maximum(rng.normal(size=(n, d)), 0.0).astype(np.float32).astype(np.float64)
    features[2] = 0.0
    return logits, features


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_apply_is_bit_identical_when_given_the_service_gradtrust_and_msp(
    calibration, seed
):
    d = OnnxClassifier(DEMO_ONNX).head_weight().shape[1]
    logits, features = _random_batch(seed, 257, len(LABELS), d)
    trust, conf, _ = _base_scores(logits, np.ones(len(logits), dtype=bool))
    reused = calibration.apply(logits, features, {"gradtrust": trust, "msp": conf})
    np.testing.assert_array_equal(reused, calibration.apply(logits, features))


def test_compute_inputs_uses_known_values_and_computes_only_the_others_when_some_are_given():
    logits = np.random.default_rng(3).normal(size=(6, 5))
    marker = np.arange(6.0)  # not any score's value: shows the given values were used
    got = compute_inputs(logits, ("msp", "margin", "entropy"), known={"margin": marker})
    np.testing.assert_array_equal(got["margin"], marker)
    fresh = scores.compute_scores(logits, ("msp", "entropy"))
    np.testing.assert_array_equal(got["msp"], fresh["msp"])
    np.testing.assert_array_equal(got["entropy"], fresh["entropy"])
    assert list(got) == ["msp", "margin", "entropy"]


def test_compute_inputs_reads_no_logits_when_every_input_is_known():
    known = {"msp": np.array([0.5, 0.9]), "gradtrust": np.array([1.0, 2.0])}
    got = compute_inputs(None, ("gradtrust", "msp"), known=known)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got["gradtrust"], known["gradtrust"])


class _NanFeatureRows:
    """The demo classifier with NaN features in the given batch rows (the service then
    calibrates a subset of the rows)."""

    def __init__(self, rows: list[int]) -> None:
        self.real = OnnxClassifier(DEMO_ONNX)
        self.num_classes = self.real.num_classes
        self.input_shape = self.real.input_shape
        self.has_features = True
        self.has_activation = True
        self.rows = rows

    def head_weight(self) -> np.ndarray:
        return self.real.head_weight()

    def run(self, images: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        got = self.real.run(images, outputs)
        if FEATURES in got and self.rows:
            got[FEATURES] = got[FEATURES].copy()
            got[FEATURES][self.rows] = np.nan
        return got


@pytest.mark.parametrize("nan_rows", [[], [1, 4]])
def test_service_trust_prob_equals_the_calibration_applied_from_scratch_when_scores_are_reused(
    calibration, digits, nan_rows
):
    images = digits[0][:7]
    service = TrustService(_NanFeatureRows(nan_rows), SETTINGS, calibration=calibration)
    result = service.run([ScoringRequest(images[i : i + 1], PLAIN) for i in range(7)])
    net = OnnxClassifier(DEMO_ONNX).run(images, [LOGITS, FEATURES])
    logits, features = net[LOGITS].astype(np.float64), net[FEATURES].astype(np.float64)
    ok = np.setdiff1d(np.arange(7), nan_rows)
    expected = calibration.apply(logits[ok], features[ok])
    assert result.trust_prob is not None
    np.testing.assert_array_equal(result.trust_prob[ok], expected)
    for i in ok:
        answer = result.answers[i]
        assert isinstance(answer, dict)
        np.testing.assert_array_equal(
            answer[TRUST_PROB][:, 0], expected[np.flatnonzero(ok == i)].astype(np.float32)
        )


@pytest.mark.parametrize("c", [2, 3, 10, 1000])
def test_gradtrust_and_msp_equal_compute_scores_bit_for_bit_when_logits_are_validated(c):
    # The server's unchecked pair must be the checked computation exactly, across the
    # row blocks compute_scores splits big batches into (16 rows at C = 1000).
    rng = np.random.default_rng(c)
    logits = rng.normal(size=(70, c)) * rng.choice([0.01, 1.0, 30.0, 1e6], size=(70, 1))
    logits[0] = 2.0  # ties
    logits[1, 0] = 1e300  # a span beyond float64 (overflows inside, handled)
    logits[1, 1:] = -1e300
    trust, conf = scores.gradtrust_and_msp(logits)
    reference = scores.compute_scores(logits, ("gradtrust", "msp"))
    np.testing.assert_array_equal(trust, reference["gradtrust"])
    np.testing.assert_array_equal(conf, reference["msp"])
