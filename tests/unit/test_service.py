"""The Triton-free serving core on the real demo model: one answer per request, errors isolated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from gradtrust.core import scores
from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.classifier import OnnxClassifier, head_weight_from_onnx
from gradtrust.serving.contract import CLASS_ID, CONFIDENCE, GRADTRUST, HEATMAP, LABEL, SCORES
from gradtrust.serving.service import ScoringRequest, TrustService
from gradtrust.serving.settings import ModelSettings, RequestOptions
from tests.conftest import DEMO_ONNX, MODEL_REPOSITORY

LABELS = (MODEL_REPOSITORY / "gradtrust_mnist" / "labels.txt").read_text().split()
PLAIN = RequestOptions(scores=None, contrast_k=3, heatmap_method=None, contrast_class=None)


@pytest.fixture(scope="module")
def service() -> TrustService:
    settings = ModelSettings.from_parameters({"pixel_range": "0,1"}, LABELS)
    return TrustService(OnnxClassifier(DEMO_ONNX), settings)


def test_service_answers_every_request_with_its_own_rows_when_requests_share_a_batch(
    service, digits
):
    images = digits[0][:10]
    requests = [ScoringRequest(images[:3], PLAIN), ScoringRequest(images[3:10], PLAIN)]
    together = service.run(requests).answers
    alone = [service.run([r]).answers[0] for r in requests]
    for joint, single in zip(together, alone, strict=True):
        assert isinstance(joint, dict) and isinstance(single, dict)
        for name in (LABEL, CLASS_ID, CONFIDENCE, GRADTRUST):
            np.testing.assert_array_equal(joint[name], single[name])
    assert together[0][GRADTRUST].shape == (3, 1) and together[1][GRADTRUST].shape == (7, 1)


def test_service_returns_error_only_for_the_bad_request_when_one_request_has_nan(service, digits):
    bad = digits[0][:2].copy()
    bad[1, 0, 3, 3] = np.nan
    good = digits[0][2:4]
    result = service.run([ScoringRequest(bad, PLAIN), ScoringRequest(good, PLAIN)])
    assert isinstance(result.answers[0], InvalidInputError)
    assert "sample(s) [1]" in str(result.answers[0])
    assert isinstance(result.answers[1], dict)
    assert result.gradtrust.shape == (2,)  # metrics see only answered samples


def test_service_rejects_only_bad_one_image_requests_when_many_share_a_batch(service, digits):
    images = digits[0][:8].copy()
    images[2, 0, 0, 0] = np.inf
    images[5, 0, 9, 9] = 1.5  # outside pixel_range 0,1
    requests = [ScoringRequest(images[i : i + 1], PLAIN) for i in range(8)]
    result = service.run(requests)
    assert "NaN or Inf pixels in sample(s) [0]" in str(result.answers[2])
    assert "outside [0, 1] in sample(s) [0]" in str(result.answers[5])
    good = [i for i in range(8) if i not in (2, 5)]
    for i in good:
        alone = service.run([requests[i]]).answers[0]
        assert isinstance(result.answers[i], dict) and isinstance(alone, dict)
        for name in (LABEL, CLASS_ID, CONFIDENCE, GRADTRUST):
            np.testing.assert_array_equal(result.answers[i][name], alone[name])
    assert result.gradtrust.shape == (len(good),)


def test_service_checks_each_request_in_its_own_dtype_when_a_batch_mixes_dtypes(service, digits):
    beyond_float32 = digits[0][:2].astype(np.float64)
    beyond_float32[1, 0, 4, 4] = 1e300
    as_float16 = digits[0][2:4].astype(np.float16)
    as_uint8 = (digits[0][4:5] > 0.5).astype(np.uint8)  # 0/1 pixels: inside pixel_range
    bad_uint8 = (digits[0][5:6] * 255).astype(np.uint8)
    answers = service.run(
        [
            ScoringRequest(beyond_float32, PLAIN),
            ScoringRequest(as_float16, PLAIN),
            ScoringRequest(as_uint8, PLAIN),
            ScoringRequest(bad_uint8, PLAIN),
        ]
    ).answers
    assert isinstance(answers[0], InvalidInputError)
    assert "sample(s) [1] exceed the float32 range" in str(answers[0])
    assert isinstance(answers[1], dict) and isinstance(answers[2], dict)
    assert isinstance(answers[3], InvalidInputError) and "divide 8-bit values by 255" in str(
        answers[3]
    )
    alone = service.run([ScoringRequest(as_float16, PLAIN)]).answers[0]
    assert isinstance(alone, dict)
    np.testing.assert_array_equal(answers[1][GRADTRUST], alone[GRADTRUST])


class _AnySizeClassifier:
    """Takes (N, 1, H, W) of any H, W; logits from each image's mean (a stand-in network)."""

    num_classes = 10
    input_shape = (1, None, None)
    has_features = False
    has_activation = False

    def run(self, images: np.ndarray, outputs) -> dict[str, np.ndarray]:
        means = images.reshape(len(images), -1).mean(axis=1, dtype=np.float64)
        return {"logits": means[:, None] * np.arange(10.0)[None, :]}


def test_service_checks_pixels_of_each_request_when_their_image_sizes_differ():
    settings = ModelSettings.from_parameters({"pixel_range": "0,1", "scores": "msp"}, LABELS)
    service = TrustService(_AnySizeClassifier(), settings)
    small = np.full((2, 1, 5, 5), 0.5, np.float32)
    small[0, 0, 1, 1] = np.nan
    large = np.full((1, 1, 7, 9), 0.25, np.float32)
    answers = service.run([ScoringRequest(small, PLAIN), ScoringRequest(large, PLAIN)]).answers
    assert isinstance(answers[0], InvalidInputError) and "sample(s) [0]" in str(answers[0])
    assert isinstance(answers[1], dict) and answers[1][GRADTRUST].shape == (1, 1)


def test_service_scores_match_score_functions_when_scores_are_requested(service, digits):
    images = digits[0][:8]
    options = RequestOptions(("msp", "gradnorm", "contrast_trust"), 2, None, None)
    answer = service.run([ScoringRequest(images, options)]).answers[0]
    assert isinstance(answer, dict)
    logits, features = service.classifier.run(images, ["logits", "features"]).values()
    np.testing.assert_allclose(answer[SCORES][:, 0], scores.msp(logits), rtol=1e-6)
    np.testing.assert_allclose(answer[SCORES][:, 1], scores.gradnorm(logits, features), rtol=1e-6)
    np.testing.assert_allclose(answer[SCORES][:, 2], scores.contrast_trust(logits, k=2), rtol=1e-6)


def test_service_skips_scores_and_heatmap_when_request_does_not_ask(service, digits):
    answer = service.run([ScoringRequest(digits[0][:2], PLAIN)]).answers[0]
    assert isinstance(answer, dict)
    assert SCORES not in answer and HEATMAP not in answer


def test_service_rejects_pixels_outside_configured_range_when_sent_8bit_values(service, digits):
    answer = service.run([ScoringRequest(digits[0][:1] * 255, PLAIN)]).answers[0]
    assert isinstance(answer, InvalidInputError) and "divide 8-bit values by 255" in str(answer)


def test_service_rejects_empty_batch_when_request_has_no_images(service):
    answer = service.run([ScoringRequest(np.zeros((0, 1, 28, 28), np.float32), PLAIN)]).answers[0]
    assert isinstance(answer, InvalidInputError) and "empty batch" in str(answer)


def _without_activation(tmp_path: Path) -> Path:
    model = onnx.load(str(DEMO_ONNX))
    keep = [o for o in model.graph.output if o.name != "activation"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    path = tmp_path / "no_activation.onnx"
    onnx.save(model, str(path))
    return path


def test_service_refuses_heatmap_clearly_when_model_has_no_activation_output(tmp_path, digits):
    settings = ModelSettings.from_parameters({}, LABELS)
    service = TrustService(OnnxClassifier(_without_activation(tmp_path)), settings)
    options = RequestOptions(None, 3, "gradcam", None)
    answers = service.run(
        [ScoringRequest(digits[0][:1], options), ScoringRequest(digits[0][:1], PLAIN)]
    ).answers
    assert isinstance(answers[0], InvalidInputError)
    assert "cannot produce a HEATMAP" in str(answers[0])
    assert isinstance(answers[1], dict)


def test_service_refuses_to_start_when_labels_do_not_match_class_count():
    settings = ModelSettings.from_parameters({}, LABELS[:9])
    with pytest.raises(ConfigError, match="lists 9 classes but the model has 10 logits"):
        TrustService(OnnxClassifier(DEMO_ONNX), settings)


def test_head_weight_from_onnx_equals_trained_head_when_read_from_demo_graph():
    import torch

    state = torch.load(MODEL_REPOSITORY / "gradtrust_mnist" / "demo_cnn.pt", weights_only=True)
    np.testing.assert_allclose(
        head_weight_from_onnx(DEMO_ONNX), state["head.weight"].double().numpy(), rtol=1e-6
    )


def test_classifier_raises_config_error_saying_what_to_do_when_model_file_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        OnnxClassifier(tmp_path / "missing.onnx")
