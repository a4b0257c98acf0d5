"""The demo model served by a real tritonserver, over HTTP and gRPC.

Every served value is compared with the same computation done in-process: onnxruntime
for the network, :mod:`gradtrust.core.scores` for the scores.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.utils import InferenceServerException

from gradtrust.core import scores
from gradtrust.serving.settings import DEFAULT_SCORES
from tests.conftest import DEMO_ONNX
from tests.integration.triton_io import PROTOCOLS, infer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reference(digits: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """In-process outputs for the first 32 real test digits."""
    images = digits[0][:32]
    session = ort.InferenceSession(str(DEMO_ONNX), providers=["CPUExecutionProvider"])
    logits, features = session.run(["logits", "features"], {"image": images})
    table = scores.compute_scores(logits, DEFAULT_SCORES, features=features)
    return {
        "images": images,
        "labels": digits[1][:32],
        "CLASS_ID": logits.argmax(axis=1),
        "CONFIDENCE": scores.msp(logits),
        "GRADTRUST": scores.gradtrust(logits),
        "SCORES": np.stack([table[n] for n in DEFAULT_SCORES], axis=1),
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_outputs_equal_in_process_computation_when_sent_real_digits(
    triton_server, reference, protocol
):
    out = infer(
        triton_server,
        protocol,
        reference["images"],
        outputs=("LABEL", "CLASS_ID", "CONFIDENCE", "GRADTRUST", "SCORES"),
        parameters={"scores": ",".join(DEFAULT_SCORES)},
    )
    np.testing.assert_array_equal(out["CLASS_ID"][:, 0], reference["CLASS_ID"])
    labels = [v.decode() for v in out["LABEL"][:, 0]]
    assert labels == [str(c) for c in reference["CLASS_ID"]]
    np.testing.assert_allclose(out["CONFIDENCE"][:, 0], reference["CONFIDENCE"], rtol=1e-5)
    np.testing.assert_allclose(out["GRADTRUST"][:, 0], reference["GRADTRUST"], rtol=1e-5)
    assert out["SCORES"].shape == (32, len(DEFAULT_SCORES))
    np.testing.assert_allclose(out["SCORES"], reference["SCORES"], rtol=1e-5, atol=1e-6)
    # The demo classifier is good: most real test digits come back with their true label.
    assert (out["CLASS_ID"][:, 0] == reference["labels"]).mean() >= 0.9


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_returns_requested_scores_in_requested_order_when_request_names_them(
    triton_server, reference, protocol
):
    names = ["margin", "contrast_trust", "energy"]
    out = infer(
        triton_server,
        protocol,
        reference["images"][:4],
        outputs=("SCORES",),
        parameters={"scores": ",".join(names), "contrast_k": 1},
    )
    session = ort.InferenceSession(str(DEMO_ONNX), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": reference["images"][:4]})
    expected = np.stack(
        [scores.margin(logits), scores.contrast_trust(logits, k=1), scores.energy(logits)], axis=1
    )
    np.testing.assert_allclose(out["SCORES"], expected, rtol=1e-5)


def _statistics(server) -> dict:
    url = f"http://{server.http_url}/v2/models/{server.model_name}/stats"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())["model_stats"][0]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_batches_concurrent_requests_and_answers_each_for_its_own_input(
    triton_server, reference, protocol
):
    before = {
        b["batch_size"]: b["compute_infer"]["count"]
        for b in _statistics(triton_server)["batch_stats"]
    }
    images = reference["images"]

    def one(i: int) -> tuple[int, dict[str, np.ndarray]]:
        return i, infer(triton_server, protocol, images[i : i + 1])

    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, [i % 32 for i in range(96)]))
    for i, out in results:
        assert out["CLASS_ID"][0, 0] == reference["CLASS_ID"][i]
        np.testing.assert_allclose(out["GRADTRUST"][0, 0], reference["GRADTRUST"][i], rtol=1e-5)
    after = {
        b["batch_size"]: b["compute_infer"]["count"]
        for b in _statistics(triton_server)["batch_stats"]
    }
    batched = sum(after[s] - before.get(s, 0) for s in after if s > 1)
    assert batched > 0, f"no execution with batch size > 1: {after}"


def _good_request_succeeds(server, protocol, images) -> None:
    out = infer(server, protocol, images[:2])
    assert out["GRADTRUST"].shape == (2, 1)


BAD_REQUESTS = {
    "wrong shape": (
        np.zeros((2, 28, 28), np.float32),
        "FP32",
        {},
        "unexpected shape for input 'IMAGE'",
    ),
    "wrong dtype": (np.zeros((2, 1, 28, 28), np.float64), "FP64", {}, "expects 'FP32'"),
    "empty batch": (
        np.zeros((0, 1, 28, 28), np.float32),
        "FP32",
        {},
        "input byte size mismatch for input 'IMAGE'",
    ),
    "batch over maximum": (
        np.zeros((65, 1, 28, 28), np.float32),
        "FP32",
        {},
        "batch-size must be <= 64",
    ),
    "unknown score name": (
        np.zeros((2, 1, 28, 28), np.float32),
        "FP32",
        {"scores": "msp,trustiness"},
        "unknown score name(s) ['trustiness']",
    ),
    "bad contrast_k": (
        np.zeros((1, 1, 28, 28), np.float32),
        "FP32",
        {"contrast_k": 0},
        "contrast_k",
    ),
    "pixels out of range": (
        np.full((1, 1, 28, 28), 255.0, np.float32),
        "FP32",
        {},
        "outside [0, 1]",
    ),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_server_rejects_bad_request_with_clear_error_and_keeps_serving_when_input_is_bad(
    triton_server, reference, protocol, case
):
    images, datatype, params, message = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as info:
        infer(triton_server, protocol, images, parameters=params, datatype=datatype)
    assert message in str(info.value)
    _good_request_succeeds(triton_server, protocol, reference["images"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_server_names_non_finite_samples_when_pixels_are_nan_or_inf(
    triton_server, reference, protocol, value
):
    images = reference["images"][:3].copy()
    images[1, 0, 5, 5] = value
    with pytest.raises(InferenceServerException) as info:
        infer(triton_server, protocol, images)
    assert "NaN or Inf pixels in sample(s) [1]" in str(info.value)
    _good_request_succeeds(triton_server, protocol, reference["images"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_answers_good_requests_when_a_bad_one_shares_their_batch(
    triton_server, reference, protocol
):
    images = reference["images"]
    poisoned = images[:2].copy()
    poisoned[0, 0, 0, 0] = np.nan

    def send(i: int):
        if i % 4 == 0:
            try:
                infer(triton_server, protocol, poisoned)
            except InferenceServerException as err:
                return i, err
            return i, None
        return i, infer(triton_server, protocol, images[i % 32 : i % 32 + 1])

    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(send, range(64)))
    for i, out in results:
        if i % 4 == 0:
            assert isinstance(out, InferenceServerException), "the NaN request was not rejected"
        else:
            assert out["CLASS_ID"][0, 0] == reference["CLASS_ID"][i % 32]
