"""gradtrust_client against the real tritonserver serving the demo model, on both protocols."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradtrust.ops.tritonserver import free_port
from gradtrust_client import (
    InvalidRequestError,
    ModelNotReadyError,
    ServerUnavailableError,
    TrustClient,
)
from gradtrust_client.cli import main
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

PROTOCOLS = ("http", "grpc")
DEMO_SCORES = (
    "contrast_trust", "msp", "entropy", "margin", "max_logit", "energy", "gradnorm",
    "gradtrust_released",
)  # fmt: skip
EXAMPLE_DIGITS = sorted((ROOT / "examples" / "digits").glob("*.png"))


def _url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


@pytest.fixture(params=PROTOCOLS)
def client(request, triton_server) -> Iterator[TrustClient]:
    protocol = request.param
    with TrustClient(
        _url(triton_server, protocol), protocol, triton_server.model_name, timeout_s=120
    ) as trust_client:
        yield trust_client


def test_trust_client_reads_demo_model_info_when_server_ready(client):
    assert client.is_ready()
    info = client.model_info()
    assert (info.input_name, info.input_shape, info.max_batch_size) == ("IMAGE", (1, 28, 28), 64)
    assert info.default_scores == DEMO_SCORES


def test_trust_client_labels_real_digits_mostly_right_when_batch_exceeds_max(client, digits):
    images, labels = digits[0][:80], digits[1][:80]  # 80 > 64: the client sends two batches
    predictions = client.predict(images)
    assert len(predictions) == 80
    ids = np.array([p.class_id for p in predictions])
    assert (ids == labels).mean() >= 0.9
    assert all(p.label == str(p.class_id) for p in predictions)
    assert all(0.0 <= p.confidence <= 1.0 for p in predictions)
    assert all(0.0 <= p.gradtrust < float("inf") for p in predictions)
    assert all(p.scores is None for p in predictions)


def test_trust_client_answers_each_image_alike_when_batched_or_alone(client, digits):
    images = digits[0][:5]
    together = client.predict(images)
    alone = [client.predict(images[i])[0] for i in range(5)]
    for a, b in zip(together, alone, strict=True):
        assert a.class_id == b.class_id
        assert a.gradtrust == pytest.approx(b.gradtrust, rel=1e-5)


def test_trust_client_returns_default_scores_in_config_order_when_scores_true(client, digits):
    predictions = client.predict(digits[0][:8], scores=True)
    for p in predictions:
        assert p.scores is not None and tuple(p.scores) == DEMO_SCORES
        # msp is the softmax confidence: the same number through two outputs.
        assert p.scores["msp"] == pytest.approx(p.confidence, rel=1e-5)
        assert all(np.isfinite(v) for v in p.scores.values())


def test_trust_client_returns_named_scores_in_given_order_when_names_given(client, digits):
    (p,) = client.predict(digits[0][:1], scores=["margin", "contrast_trust"], contrast_k=1)
    assert list(p.scores or {}) == ["margin", "contrast_trust"]


def test_trust_client_raises_invalid_request_with_server_message_when_score_unknown(client, digits):
    with pytest.raises(InvalidRequestError, match=r"unknown score name\(s\) \['trustiness'\]"):
        client.predict(digits[0][:2], scores=["msp", "trustiness"])


def test_trust_client_raises_invalid_request_when_contrast_class_out_of_range(client, digits):
    with pytest.raises(InvalidRequestError, match="contrast_class 42"):
        client.explain(digits[0][:1], method="contrast", contrast=42)


@pytest.mark.parametrize("method", ["gradcam", "counterfactual", "contrast", "voice"])
def test_trust_client_returns_unit_heatmap_per_image_when_explaining(client, digits, method):
    explanations = client.explain(digits[0][:3], method=method)
    predictions = client.predict(digits[0][:3])
    assert len(explanations) == 3
    for e, p in zip(explanations, predictions, strict=True):
        assert (e.label, e.class_id) == (p.label, p.class_id)
        assert e.method == method and e.heatmap.shape == (28, 28)
        assert np.all(np.isfinite(e.heatmap))
        assert e.heatmap.min() >= 0.0 and e.heatmap.max() <= 1.0
        if method == "voice":
            assert e.stats is not None and set(e.stats) == {"snr", "iou"}
            assert 0.0 <= e.stats["iou"] <= 1.0
        else:
            assert e.stats is None


def test_trust_client_contrast_map_depends_on_contrast_class_when_class_named(client, digits):
    image = digits[0][:1]
    predicted = client.predict(image)[0].class_id
    first, second = [c for c in range(10) if c != predicted][:2]
    (a,) = client.explain(image, method="contrast", contrast=first)
    (b,) = client.explain(image, method="contrast", contrast=str(second))
    assert a.contrast_class == first and b.contrast_class == str(second)
    assert not np.allclose(a.heatmap, b.heatmap)


def test_trust_client_raises_model_not_ready_when_model_unknown(triton_server):
    for protocol in PROTOCOLS:
        with TrustClient(_url(triton_server, protocol), protocol, "no_such_model") as client:
            assert client.is_ready() is False
            with pytest.raises(ModelNotReadyError, match="no_such_model"):
                client.predict(np.zeros((1, 1, 28, 28), np.float32))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_trust_client_raises_server_unavailable_when_port_closed(protocol):
    port = free_port()
    client = TrustClient(f"127.0.0.1:{port}", protocol, timeout_s=10)
    with client, pytest.raises(ServerUnavailableError, match=f"127.0.0.1:{port}"):
        client.model_info()


def test_cli_prints_table_row_per_file_when_predicting_example_digits(triton_server, capsys):
    assert EXAMPLE_DIGITS, "examples/digits/*.png must ship with the project"
    argv = ["predict", *map(str, EXAMPLE_DIGITS), "--url", triton_server.http_url, "--scores"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["file", "label", "confidence", "gradtrust"]
    assert lines[0].split()[4:] == list(DEMO_SCORES)
    assert len(lines) == 1 + len(EXAMPLE_DIGITS)
    for line, path in zip(lines[1:], EXAMPLE_DIGITS, strict=True):
        assert line.startswith(str(path))


def test_cli_prints_valid_json_when_predicting_over_grpc(triton_server, capsys):
    argv = ["predict", *map(str, EXAMPLE_DIGITS), "--json", "--protocol", "grpc"]
    assert main([*argv, "--url", triton_server.grpc_url, "--scores", "msp,margin"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["file"] for row in rows] == [str(p) for p in EXAMPLE_DIGITS]
    for row in rows:
        fields = {"file", "label", "class_id", "confidence", "gradtrust", "scores", "trust_prob"}
        assert set(row) == fields | {"introspection"}
        assert row["trust_prob"] is None  # not asked for
        assert row["introspection"] is None  # not asked for
        assert list(row["scores"]) == ["msp", "margin"]
        assert 0.0 <= row["gradtrust"] < float("inf")  # log of a variance ratio >= 1


def test_cli_exits_2_with_server_message_when_score_unknown(triton_server, capsys):
    argv = ["predict", str(EXAMPLE_DIGITS[0]), "--url", triton_server.http_url]
    assert main([*argv, "--scores", "trustiness"]) == 2
    assert "unknown score name" in capsys.readouterr().err


def test_cli_writes_titled_overlay_when_explaining_with_contrast(triton_server, tmp_path, capsys):
    out = tmp_path / "overlay.png"
    argv = ["explain", str(EXAMPLE_DIGITS[0]), "--url", triton_server.http_url]
    assert main([*argv, "--method", "contrast", "--contrast", "7", "--out", str(out)]) == 0
    assert "rather than 7?" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width == 28 * 8 and png.height > 28 * 8


def test_cli_entry_point_runs_as_installed_script_when_called_from_shell(triton_server):
    script = Path(sys.executable).with_name("gradtrust-client")
    result = subprocess.run(
        [str(script), "predict", str(EXAMPLE_DIGITS[0]), "--url", triton_server.http_url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    assert str(EXAMPLE_DIGITS[0]) in result.stdout


def test_trust_client_returns_calibrated_trust_prob_when_asked(client, digits):
    from gradtrust.core.calibration import load_model_calibration
    from gradtrust.tools.evaluate.scoring import InProcessScorer
    from tests.conftest import DEMO_MODEL, DEMO_ONNX, MODEL_REPOSITORY

    calibration = load_model_calibration(MODEL_REPOSITORY / DEMO_MODEL)
    assert calibration is not None
    predictions = client.predict(digits[0][:8], trust_prob=True)
    got = np.array([p.trust_prob for p in predictions])
    local = InProcessScorer(DEMO_ONNX).score(digits[0][:8], served_only=True)
    want = calibration.apply(local.logits, local.features)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert client.predict(digits[0][:1])[0].trust_prob is None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_trust_client_says_to_calibrate_when_uncalibrated_model_is_asked_for_trust_prob(
    bare_demo_server, digits, protocol
):
    url = bare_demo_server.http_url if protocol == "http" else bare_demo_server.grpc_url
    with TrustClient(url, protocol=protocol) as bare, pytest.raises(InvalidRequestError) as info:
        bare.predict(digits[0][:1], trust_prob=True)
    assert "gradtrust calibrate" in str(info.value)
