"""Only what a request asks for is computed and returned: outputs it names, network outputs
some request in the batch needs. Service level on the real demo model, plus the real server."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from gradtrust.core import scores
from gradtrust.core.calibration import TrustCalibration, load_model_calibration
from gradtrust.errors import InvalidInputError
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import (
    CLASS_ID,
    CONFIDENCE,
    DEFAULT_OUTPUTS,
    FEATURES,
    GRADTRUST,
    HEATMAP,
    HEATMAP_STATS,
    LABEL,
    LOGITS,
    SCORES,
    TRUST_PROB,
)
from gradtrust.serving.service import ScoringRequest, TrustService
from gradtrust.serving.settings import DEFAULT_SCORES, ModelSettings, RequestOptions
from tests.conftest import DEMO_MODEL, DEMO_ONNX, MODEL_REPOSITORY

ENTRY = MODEL_REPOSITORY / DEMO_MODEL
LABELS = (ENTRY / "labels.txt").read_text().split()
SETTINGS = ModelSettings.from_parameters({"pixel_range": "0,1"}, LABELS)
PLAIN = RequestOptions(scores=None, contrast_k=3, heatmap_method=None, contrast_class=None)
WITH_GRADNORM = RequestOptions(("msp", "gradnorm"), 3, None, None)
WITHOUT_GRADNORM = RequestOptions(("msp", "margin", "contrast_trust"), 3, None, None)
EVERY_CHEAP_OUTPUT = {LABEL, CLASS_ID, CONFIDENCE, GRADTRUST, TRUST_PROB}


class RecordingClassifier:
    """The demo classifier, noting which network outputs each forward pass asked for and
    how many images it got; optionally NaN in the features of the given batch rows."""

    def __init__(self, nan_feature_rows: Sequence[int] = ()) -> None:
        self.real = OnnxClassifier(DEMO_ONNX)
        self.num_classes = self.real.num_classes
        self.input_shape = self.real.input_shape
        self.input_dtype = self.real.input_dtype
        self.has_features = True
        self.has_activation = True
        self.nan_feature_rows = list(nan_feature_rows)
        self.calls: list[tuple[list[str], int]] = []

    def head_weight(self) -> np.ndarray:
        return self.real.head_weight()

    def run(self, images: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        self.calls.append((list(outputs), len(images)))
        got = self.real.run(images, outputs)
        if FEATURES in got and self.nan_feature_rows:
            got[FEATURES] = got[FEATURES].copy()
            got[FEATURES][self.nan_feature_rows] = np.nan
        return got


class RecordingCalibration:
    """The demo model's calibration, counting the samples it maps to TRUST_PROB."""

    def __init__(self) -> None:
        real = load_model_calibration(ENTRY)
        assert isinstance(real, TrustCalibration), "the demo entry ships a calibration"
        self.real = real
        self.mapped = 0

    @property
    def needs_features(self) -> bool:
        return self.real.needs_features

    def apply(
        self,
        logits: np.ndarray,
        features: np.ndarray | None = None,
        known: Any = None,
    ) -> np.ndarray:
        self.mapped += len(logits)
        return self.real.apply(logits, features, known)


def _service(classifier: Any = None, calibration: Any = None) -> TrustService:
    return TrustService(
        classifier if classifier is not None else OnnxClassifier(DEMO_ONNX),
        SETTINGS,
        calibration=calibration,
    )


@pytest.fixture(scope="module")
def calibrated() -> TrustService:
    return _service(calibration=load_model_calibration(ENTRY))


def test_default_outputs_are_the_cheap_outputs_and_trust_prob_when_listed():
    assert set(DEFAULT_OUTPUTS) == EVERY_CHEAP_OUTPUT


def test_service_returns_exactly_the_named_outputs_when_a_request_names_some(calibrated, digits):
    images = digits[0][:3]
    for named in ({GRADTRUST}, {LABEL, TRUST_PROB}, {CLASS_ID, CONFIDENCE}):
        (answer,) = calibrated.run([ScoringRequest(images, PLAIN, frozenset(named))]).answers
        assert isinstance(answer, dict) and set(answer) == named


def test_service_returns_every_cheap_output_when_a_request_names_none(calibrated, digits):
    (answer,) = calibrated.run([ScoringRequest(digits[0][:2], PLAIN)]).answers
    assert isinstance(answer, dict) and set(answer) == EVERY_CHEAP_OUTPUT


def test_service_leaves_out_trust_prob_when_the_model_has_no_calibration(digits):
    (answer,) = _service().run([ScoringRequest(digits[0][:2], PLAIN)]).answers
    assert isinstance(answer, dict) and set(answer) == EVERY_CHEAP_OUTPUT - {TRUST_PROB}


def test_service_gives_each_request_its_own_outputs_with_unchanged_values_when_they_share_a_batch(
    calibrated, digits
):
    images = digits[0][:6]
    requests = [
        ScoringRequest(images[:1], PLAIN, frozenset({GRADTRUST})),
        ScoringRequest(images[1:3], PLAIN),
        ScoringRequest(images[3:6], PLAIN, frozenset({LABEL, CONFIDENCE})),
    ]
    together = calibrated.run(requests).answers
    full = calibrated.run([ScoringRequest(images, PLAIN)]).answers[0]
    assert isinstance(full, dict)
    rows = [slice(0, 1), slice(1, 3), slice(3, 6)]
    for answer, request, part in zip(together, requests, rows, strict=True):
        assert isinstance(answer, dict)
        assert set(answer) == (request.outputs or EVERY_CHEAP_OUTPUT)
        for name, value in answer.items():
            np.testing.assert_array_equal(value, full[name][part])


def test_service_computes_trust_prob_for_every_prediction_but_returns_it_only_when_named(
    digits,
):
    # Every prediction's TRUST_PROB feeds the metrics (low trust is judged on it), so a
    # calibrated entry computes it for the whole batch; only requests naming it get it.
    calibration = RecordingCalibration()
    service = _service(calibration=calibration)
    images = digits[0][:4]
    result = service.run([ScoringRequest(images, PLAIN, frozenset({GRADTRUST, LABEL}))])
    assert calibration.mapped == 4
    assert isinstance(result.answers[0], dict) and TRUST_PROB not in result.answers[0]
    assert result.trust_prob is not None and result.trust_prob.shape == (4,)
    answers = service.run(
        [
            ScoringRequest(images[:2], PLAIN, frozenset({GRADTRUST})),
            ScoringRequest(images[2:], PLAIN, frozenset({TRUST_PROB})),
        ]
    ).answers
    assert isinstance(answers[1], dict) and set(answers[1]) == {TRUST_PROB}
    net = OnnxClassifier(DEMO_ONNX).run(images[2:], [LOGITS, FEATURES])
    expected = calibration.real.apply(net[LOGITS], net[FEATURES])
    np.testing.assert_allclose(answers[1][TRUST_PROB][:, 0], expected, rtol=1e-6)


def test_service_keeps_metric_inputs_for_every_answered_sample_when_gradtrust_is_not_named(
    calibrated, digits
):
    images = digits[0][:5]
    result = calibrated.run([ScoringRequest(images, PLAIN, frozenset({LABEL}))])
    reference = calibrated.run([ScoringRequest(images, PLAIN)]).answers[0]
    assert isinstance(reference, dict)
    np.testing.assert_allclose(result.gradtrust, reference[GRADTRUST][:, 0], rtol=1e-6)
    np.testing.assert_allclose(result.confidence, reference[CONFIDENCE][:, 0], rtol=1e-6)


def test_service_leaves_out_scores_when_its_options_ask_for_scores_but_it_does_not_name_them(
    calibrated, digits
):
    request = ScoringRequest(digits[0][:2], WITHOUT_GRADNORM, frozenset({GRADTRUST}))
    (answer,) = calibrated.run([request]).answers
    assert isinstance(answer, dict) and set(answer) == {GRADTRUST}


def test_service_returns_only_the_named_heatmap_output_when_the_method_has_statistics(
    calibrated, digits
):
    voice = RequestOptions(None, 3, "voice", None)
    images = digits[0][:2]
    (maps_only,) = calibrated.run([ScoringRequest(images, voice, frozenset({HEATMAP}))]).answers
    (both,) = calibrated.run(
        [ScoringRequest(images, voice, frozenset({HEATMAP, HEATMAP_STATS}))]
    ).answers
    assert isinstance(maps_only, dict) and set(maps_only) == {HEATMAP}
    assert isinstance(both, dict) and set(both) == {HEATMAP, HEATMAP_STATS}
    np.testing.assert_array_equal(maps_only[HEATMAP], both[HEATMAP])


# --- the network's FEATURES output ---------------------------------------------------------


@pytest.mark.parametrize("options", [PLAIN, WITHOUT_GRADNORM], ids=["plain", "no_gradnorm"])
def test_service_does_not_fetch_features_when_no_request_scores_gradnorm(options, digits):
    classifier = RecordingClassifier()
    requests = [ScoringRequest(digits[0][i : i + 1], options) for i in range(4)]
    answers = _service(classifier).run(requests).answers
    assert all(isinstance(a, dict) for a in answers)
    assert classifier.calls == [([LOGITS], 4)]


def test_service_fetches_features_once_for_the_batch_when_one_request_scores_gradnorm(digits):
    classifier = RecordingClassifier()
    images = digits[0][:3]
    requests = [
        ScoringRequest(images[:1], PLAIN),
        ScoringRequest(images[1:], WITH_GRADNORM),
    ]
    answers = _service(classifier).run(requests).answers
    assert [sorted(outputs) for outputs, _ in classifier.calls] == [sorted([LOGITS, FEATURES])]
    logits, features = OnnxClassifier(DEMO_ONNX).run(images[1:], [LOGITS, FEATURES]).values()
    assert isinstance(answers[1], dict)
    np.testing.assert_allclose(
        answers[1][SCORES][:, 1], scores.gradnorm(logits, features), rtol=1e-6
    )


def test_service_refuses_a_gradnorm_request_clearly_when_its_features_are_not_finite(digits):
    # Batch rows: 0 plain request, 1-2 the gradnorm request (NaN features in its sample 1),
    # 3 a request for scores without gradnorm, whose own features are not needed.
    classifier = RecordingClassifier(nan_feature_rows=[2])
    images = digits[0][:4]
    requests = [
        ScoringRequest(images[:1], PLAIN),
        ScoringRequest(images[1:3], WITH_GRADNORM),
        ScoringRequest(images[3:], WITHOUT_GRADNORM),
    ]
    result = _service(classifier).run(requests)
    plain, gradnorm, other = result.answers
    assert isinstance(gradnorm, InvalidInputError)
    assert "non-finite logits or features for sample(s) [1]" in str(gradnorm)
    assert isinstance(plain, dict) and isinstance(other, dict)
    assert result.gradtrust.shape == (2,)  # metrics see only the answered samples
    np.testing.assert_allclose(
        result.gradtrust, [plain[GRADTRUST][0, 0], other[GRADTRUST][0, 0]], rtol=1e-6
    )


def test_service_answers_plain_requests_when_the_model_has_no_features_output(digits):
    classifier = RecordingClassifier()
    classifier.has_features = False
    settings = ModelSettings.from_parameters(
        {"pixel_range": "0,1", "scores": ",".join(s for s in DEFAULT_SCORES if s != "gradnorm")},
        LABELS,
    )
    service = TrustService(classifier, settings)
    answers = service.run(
        [ScoringRequest(digits[0][:2], PLAIN), ScoringRequest(digits[0][2:3], WITH_GRADNORM)]
    ).answers
    assert isinstance(answers[0], dict)
    assert isinstance(answers[1], InvalidInputError) and "features" in str(answers[1])
    assert classifier.calls == [([LOGITS], 2)]
