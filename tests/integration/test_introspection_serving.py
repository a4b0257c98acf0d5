"""The real server answers the introspective (second-stage) outputs on request, over HTTP
and gRPC, equal to the in-process two-stage prediction; an entry without an introspective
network refuses them by name and still answers the rest of the batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import (
    CLASS_ID,
    INTROSPECTION_ONNX,
    INTROSPECTIVE_AGREES,
    INTROSPECTIVE_CLASS_ID,
    INTROSPECTIVE_CONFIDENCE,
    INTROSPECTIVE_LABEL,
    INTROSPECTIVE_OUTPUTS,
    LABEL,
)
from gradtrust.serving.introspector import Introspector
from gradtrust_client import TrustClient
from tests.conftest import DEMO_MODEL, DEMO_ONNX, MODEL_REPOSITORY
from tests.integration.triton_io import infer, model_samples, settled

LABELS = (MODEL_REPOSITORY / DEMO_MODEL / "labels.txt").read_text().split()


def _in_process(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both stages run here, as `gradtrust introspect --report` runs them."""
    classifier = OnnxClassifier(DEMO_ONNX)
    out = classifier.run(images, ["logits", "features"])
    introspector = Introspector(DEMO_ONNX.parent / INTROSPECTION_ONNX, 10, 64)
    second = introspector.predict(out["logits"], out["features"])
    return out["logits"].argmax(axis=1), second.class_id, second.confidence


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_introspective_outputs_equal_the_in_process_two_stage_prediction(
    triton_server, digits, protocol
) -> None:
    images = digits[0][:40]
    got = infer(triton_server, protocol, images, [CLASS_ID, LABEL, *INTROSPECTIVE_OUTPUTS])
    first, second, confidence = _in_process(images)
    np.testing.assert_array_equal(got[CLASS_ID][:, 0], first)
    np.testing.assert_array_equal(got[INTROSPECTIVE_CLASS_ID][:, 0], second)
    np.testing.assert_allclose(got[INTROSPECTIVE_CONFIDENCE][:, 0], confidence, atol=1e-6)
    labels = [
        v.decode() if isinstance(v, bytes) else str(v) for v in got[INTROSPECTIVE_LABEL][:, 0]
    ]
    assert labels == [LABELS[c] for c in second]
    assert got[INTROSPECTIVE_AGREES].dtype == np.bool_
    np.testing.assert_array_equal(got[INTROSPECTIVE_AGREES][:, 0], first == second)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_shows_the_introspective_prediction_when_asked(triton_server, digits, protocol):
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    images = digits[0][:5]
    with TrustClient(url, protocol=protocol) as client:
        plain = client.predict(images)
        both = client.predict(images, introspect=True)
    _, second, confidence = _in_process(images)
    assert all(p.introspection is None for p in plain)
    for p, cls, conf in zip(both, second, confidence, strict=True):
        assert p.introspection is not None
        assert p.introspection.class_id == cls and p.introspection.label == LABELS[cls]
        assert p.introspection.confidence == pytest.approx(conf, abs=1e-6)
        assert p.introspection.agrees == (p.class_id == cls)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_refuses_introspection_naming_the_command_when_the_entry_has_none(
    bare_demo_server, digits, protocol
) -> None:
    with pytest.raises(InferenceServerException, match="gradtrust introspect"):
        infer(bare_demo_server, protocol, digits[0][:2], [LABEL, INTROSPECTIVE_LABEL])
    answered = infer(bare_demo_server, protocol, digits[0][:2], [LABEL])
    assert answered[LABEL].shape == (2, 1)


def test_client_cli_prints_the_introspective_prediction_when_asked(triton_server, capsys):
    from gradtrust_client.cli import main

    files = sorted(str(p) for p in (MODEL_REPOSITORY.parent / "examples" / "digits").glob("*.png"))
    argv = ["predict", *files, "--url", triton_server.http_url, "--introspect"]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(files)
    for row in rows:
        second = row["introspection"]
        assert set(second) == {"label", "class_id", "confidence", "agrees"}
        assert second["agrees"] == (second["class_id"] == row["class_id"])
    assert main(argv) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[4:7] == ["introspective", "intro_conf", "agrees"]


def _introspective_counts(server) -> tuple[float, float]:
    samples = {name: value for name, _, value in model_samples(server)}
    return (
        samples.get("gradtrust_introspective_predictions_total", 0.0),
        samples.get("gradtrust_introspective_disagreements_total", 0.0),
    )


def test_server_counts_every_introspective_prediction_and_disagreement_when_served(
    triton_server, digits
) -> None:
    # Digits overlaid in pairs: inputs on which the two stages sometimes disagree.
    images, _ = digits
    mixed = np.clip(images[:32] + images[32:64], 0.0, 1.0)
    before = settled(lambda: _introspective_counts(triton_server))
    got = infer(triton_server, "grpc", mixed, [INTROSPECTIVE_AGREES])
    infer(triton_server, "http", images[:8], [LABEL])  # not introspective: not counted
    after = settled(lambda: _introspective_counts(triton_server))
    disagreements = int((~got[INTROSPECTIVE_AGREES][:, 0]).sum())
    assert disagreements > 0  # 2 of 32 with the committed demo network
    assert after[0] - before[0] == 32
    assert after[1] - before[1] == disagreements
