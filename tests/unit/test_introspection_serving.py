"""The second stage in the service: INTROSPECTIVE_* outputs equal the in-process two-stage
prediction (the torch introspective network on the classifier's outputs), only for the
requests that name them, and a request that does not ask costs what it cost before."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from gradtrust.core import introspection as I
from gradtrust.errors import InvalidInputError
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import (
    CLASS_ID,
    FEATURES,
    INTROSPECTIVE_AGREES,
    INTROSPECTIVE_CLASS_ID,
    INTROSPECTIVE_CONFIDENCE,
    INTROSPECTIVE_LABEL,
    INTROSPECTIVE_OUTPUTS,
    LABEL,
    LOGITS,
)
from gradtrust.serving.introspector import Introspector
from gradtrust.serving.service import ScoringRequest, TrustService
from gradtrust.serving.settings import ModelSettings, RequestOptions
from gradtrust.tools.introspect.network import IntrospectiveMLP, export_onnx
from gradtrust.tools.introspect.train import (
    TrainingConfig,
    network_outputs,
    predict,
    train_introspective,
)
from tests.conftest import DEMO_MODEL, DEMO_ONNX, MODEL_REPOSITORY

LABELS = (MODEL_REPOSITORY / DEMO_MODEL / "labels.txt").read_text().split()
SETTINGS = ModelSettings.from_parameters({"pixel_range": "0,1"}, LABELS)
PLAIN = RequestOptions(scores=None, contrast_k=3, heatmap_method=None, contrast_class=None)


class Recording:
    """The real demo classifier, noting the outputs each forward pass asked for."""

    def __init__(self) -> None:
        self.real = OnnxClassifier(DEMO_ONNX)
        self.num_classes, self.input_shape = self.real.num_classes, self.real.input_shape
        self.input_dtype, self.providers = self.real.input_dtype, self.real.providers
        self.has_features, self.has_activation = True, True
        self.calls: list[list[str]] = []

    def head_weight(self) -> np.ndarray:
        return self.real.head_weight()

    def run(self, images: np.ndarray, outputs: Sequence[str] = (LOGITS,)) -> dict:
        self.calls.append(list(outputs))
        return self.real.run(images, outputs)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> tuple[IntrospectiveMLP, Path]:
    """A small introspective network trained for a few epochs on 96 real digits."""
    images, labels = digits
    logits, features = network_outputs(OnnxClassifier(DEMO_ONNX), images[:96])
    config = TrainingConfig(hidden=32, seed=0, max_epochs=5, patience=5)
    model, _ = train_introspective(logits, features, labels[:96], config, progress=False)
    path = export_onnx(model, tmp_path_factory.mktemp("intro") / "introspection.onnx")
    return model, path


def _service(path: Path | None) -> tuple[TrustService, Recording]:
    classifier = Recording()
    introspector = None if path is None else Introspector(path, 10, 64)
    return TrustService(classifier, SETTINGS, introspector=introspector), classifier


def test_separable_torch_layer_equals_the_numpy_first_layer_when_trained(trained, digits) -> None:
    model, _ = trained
    logits, features = network_outputs(OnnxClassifier(DEMO_ONNX), digits[0][:16])
    g, h = I.introspective_factors(logits, features)
    a, b, bias = model.separable_factors()
    with torch.no_grad():
        got = model.double().first_layer(torch.from_numpy(g), torch.from_numpy(h)).numpy()
    model.float()
    np.testing.assert_allclose(got, I.separable_first_layer(a, b, bias, g, h), atol=1e-10)
    dense = I.dense_first_layer(
        I.separable_to_dense(a, b), bias, I.introspective_features(logits, features)
    )
    np.testing.assert_allclose(got, dense, atol=1e-10)


def test_service_introspective_outputs_equal_the_in_process_two_stage_prediction(
    trained, digits
) -> None:
    model, path = trained
    images = digits[0][96:128]
    service, _ = _service(path)
    names = frozenset({CLASS_ID, *INTROSPECTIVE_OUTPUTS})
    result = service.run(
        [ScoringRequest(images[:20], PLAIN, names), ScoringRequest(images[20:], PLAIN, names)]
    )
    answers = result.answers
    assert all(isinstance(a, dict) for a in answers)
    got = {k: np.concatenate([a[k] for a in answers]) for k in names}  # type: ignore[index]
    logits, features = network_outputs(OnnxClassifier(DEMO_ONNX), images)
    expected_cls, expected_conf = I.introspective_prediction(predict(model, logits, features))
    np.testing.assert_array_equal(got[INTROSPECTIVE_CLASS_ID][:, 0], expected_cls)
    np.testing.assert_allclose(got[INTROSPECTIVE_CONFIDENCE][:, 0], expected_conf, atol=1e-5)
    assert [v[0].decode() for v in got[INTROSPECTIVE_LABEL]] == [LABELS[c] for c in expected_cls]
    agrees = expected_cls == logits.argmax(axis=1)
    np.testing.assert_array_equal(got[INTROSPECTIVE_AGREES][:, 0], agrees)
    assert got[INTROSPECTIVE_AGREES].dtype == np.bool_
    assert result.introspective == 32
    assert result.introspective_disagreements == int((~agrees).sum())


def test_service_skips_features_and_second_stage_when_no_request_names_introspection(
    trained, digits
) -> None:
    service, classifier = _service(trained[1])
    result = service.run([ScoringRequest(digits[0][:4], PLAIN, None)])
    assert classifier.calls == [[LOGITS]]
    assert not set(INTROSPECTIVE_OUTPUTS) & set(result.answers[0])  # type: ignore[arg-type]
    assert result.introspective == 0


def test_service_computes_introspection_only_for_the_requests_that_name_it(trained, digits) -> None:
    service, classifier = _service(trained[1])
    images = digits[0][:6]
    result = service.run(
        [
            ScoringRequest(images[:3], PLAIN, frozenset({LABEL})),
            ScoringRequest(images[3:], PLAIN, frozenset({INTROSPECTIVE_CLASS_ID})),
        ]
    )
    first, second = result.answers
    assert set(first) == {LABEL}  # type: ignore[arg-type]
    assert set(second) == {INTROSPECTIVE_CLASS_ID}  # type: ignore[arg-type]
    assert classifier.calls == [[LOGITS, FEATURES]]
    assert result.introspective == 3


def test_service_refuses_introspection_naming_the_command_when_the_entry_has_none(digits) -> None:
    service, _ = _service(None)
    result = service.run(
        [
            ScoringRequest(digits[0][:2], PLAIN, frozenset({INTROSPECTIVE_LABEL})),
            ScoringRequest(digits[0][2:4], PLAIN, frozenset({LABEL})),
        ]
    )
    refused, answered = result.answers
    assert isinstance(refused, InvalidInputError)
    assert "gradtrust introspect" in str(refused)
    assert isinstance(answered, dict) and LABEL in answered


def test_introspector_refuses_a_network_trained_for_another_head_when_loaded(trained) -> None:
    from gradtrust.errors import ConfigError

    with pytest.raises(ConfigError, match="gradtrust introspect"):
        Introspector(trained[1], 10, 128)


def test_introspector_checks_each_batch_when_the_feature_width_is_unknown_at_load(trained) -> None:
    from gradtrust.errors import ConfigError

    # A classifier called through BLS cannot say its width before it answers.
    introspector = Introspector(trained[1], 10, None)
    assert introspector.num_features == 64
    logits = np.random.default_rng(0).normal(size=(3, 10))
    with pytest.raises(ConfigError, match="features of size 64, but the classifier returned 32"):
        introspector.predict(logits, np.ones((3, 32)))
    assert introspector.predict(logits, np.ones((3, 64))).class_id.shape == (3,)


class NanFeatures(Recording):
    """The demo classifier whose features are NaN for the given batch rows."""

    def __init__(self, rows: Sequence[int]) -> None:
        super().__init__()
        self.rows = list(rows)

    def run(self, images: np.ndarray, outputs: Sequence[str] = (LOGITS,)) -> dict:
        out = super().run(images, outputs)
        if FEATURES in out:
            out[FEATURES] = out[FEATURES].copy()
            out[FEATURES][self.rows] = np.nan
        return out


def test_service_refuses_introspection_only_for_the_request_whose_features_are_not_finite(
    trained, digits
) -> None:
    service = TrustService(
        NanFeatures([1]), SETTINGS, introspector=Introspector(trained[1], 10, 64)
    )
    images = digits[0][:4]
    names = frozenset({INTROSPECTIVE_CLASS_ID})
    result = service.run(
        [
            ScoringRequest(images[:2], PLAIN, names),
            ScoringRequest(images[2:], PLAIN, names),
            ScoringRequest(images[:2], PLAIN, frozenset({LABEL})),
        ]
    )
    bad, good, plain = result.answers
    assert isinstance(bad, InvalidInputError) and "sample(s) [1]" in str(bad)
    assert isinstance(good, dict) and good[INTROSPECTIVE_CLASS_ID].shape == (2, 1)
    assert isinstance(plain, dict) and LABEL in plain
    assert result.introspective == 2


def test_metrics_count_introspective_predictions_and_disagreements_when_a_batch_has_them(
    tmp_path,
) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from gradtrust.serving.telemetry import (
        INTROSPECTIVE,
        INTROSPECTIVE_DISAGREEMENTS,
        LowTrustRule,
        TrustMetrics,
    )

    metrics = TrustMetrics("m", "1", LowTrustRule("gradtrust", 3.0), False, directory=tmp_path)
    metrics.count_introspection(10, 3)
    metrics.count_introspection(5, 0)
    with pytest.raises(InvalidInputError):
        metrics.count_introspection(2, 3)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    values = {s.name: s.value for f in registry.collect() for s in f.samples}
    assert values[INTROSPECTIVE] == 15
    assert values[INTROSPECTIVE_DISAGREEMENTS] == 3
