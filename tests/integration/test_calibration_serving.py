"""`gradtrust calibrate` round trip through the real server: the served TRUST_PROB is what
the calibration file computes from the model's logits and features, never 0 or 1, better
calibrated than softmax confidence on held-out digits (clean and shifted), and ranks the
errors of shifted digits at least as well as softmax confidence."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from gradtrust.core.calibration import FILENAME, load_model_calibration
from gradtrust.ops.tritonserver import Ports, free_port, start_server
from gradtrust.tools.evaluate import metrics as M
from gradtrust.tools.evaluate.calibration import check_heldout
from gradtrust.tools.evaluate.roundtrip import heldout_set
from gradtrust.tools.evaluate.runner import stratified_subset
from gradtrust.tools.evaluate.scoring import InProcessScorer
from gradtrust.tools.evaluate.shifts import with_corruptions
from tests.conftest import DEMO_MODEL, DEMO_ONNX, MODEL_REPOSITORY
from tests.integration.triton_io import PROTOCOLS, infer

pytestmark = pytest.mark.integration

OUTPUTS = ("CLASS_ID", "CONFIDENCE", "GRADTRUST", "TRUST_PROB")


def _served(server, protocol: str, images: np.ndarray) -> dict[str, np.ndarray]:
    parts = [infer(server, protocol, images[i : i + 64], outputs=OUTPUTS)
             for i in range(0, len(images), 64)]  # fmt: skip
    return {name: np.concatenate([p[name] for p in parts])[:, 0] for name in OUTPUTS}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_served_trust_prob_is_the_calibrations_and_beats_softmax_ece_when_calibrated(
    triton_server, protocol
):
    calibration = load_model_calibration(MODEL_REPOSITORY / DEMO_MODEL)
    assert calibration is not None, "run `make calibrate`: the demo entry has no calibration"
    images, labels = heldout_set(mix="clean", seed=0)
    out = _served(triton_server, protocol, images)
    local = InProcessScorer(DEMO_ONNX, intra_op_threads=2).score(images, served_only=True)
    expected = calibration.apply(local.logits, local.features)
    np.testing.assert_allclose(out["TRUST_PROB"], expected, rtol=1e-5, atol=1e-6)
    assert ((out["TRUST_PROB"] > 0) & (out["TRUST_PROB"] < 1)).all()
    check = check_heldout(
        calibration, out["TRUST_PROB"], out["CONFIDENCE"], out["CLASS_ID"] == labels
    )
    assert check.ece_improved, check
    assert check.target_met, check


def test_served_trust_prob_ranks_shifted_errors_at_least_as_well_as_softmax_when_calibrated(
    triton_server,
):
    clean, labels = heldout_set(mix="clean", seed=0)
    subset = stratified_subset(labels, 10, 0)
    kinds = ("gaussian_noise", "contrast", "elastic_transform")
    images, truth = with_corruptions(clean[subset], labels[subset], 1, kinds, include_clean=False)
    out = _served(triton_server, "http", images)
    right = out["CLASS_ID"] == truth
    assert (~right).sum() > 50  # enough errors for the comparison to mean something
    assert M.auroc(out["TRUST_PROB"], right) >= M.auroc(out["CONFIDENCE"], right)
    assert M.ece(out["TRUST_PROB"], right) <= M.ece(out["CONFIDENCE"], right)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_explains_missing_calibration_when_uncalibrated_model_is_asked_for_trust_prob(
    bare_demo_server, protocol, digits
):
    with pytest.raises(InferenceServerException) as info:
        infer(bare_demo_server, protocol, digits[0][:2], outputs=("TRUST_PROB",))
    assert "run `gradtrust calibrate`" in str(info.value)


def test_server_warns_in_its_log_when_trust_prob_was_less_calibrated_than_softmax_on_a_part(
    tmp_path, digits
):
    # A calibration whose clean held-out part favoured softmax confidence (as calibrate
    # records it for such a model): the server loads it, serves, and says so in its log.
    repo = tmp_path / "repo"
    entry = repo / DEMO_MODEL
    shutil.copytree(MODEL_REPOSITORY / DEMO_MODEL, entry)
    data = json.loads((entry / FILENAME).read_text())
    data["heldout_ece"] = {
        "clean": {"trust_prob": 0.0471, "confidence": 0.0142},
        "shifted": {"trust_prob": 0.0441, "confidence": 0.0903},
    }
    (entry / FILENAME).write_text(json.dumps(data))
    server = start_server(
        repo, ports=Ports(free_port(), free_port(), free_port()), log_path=tmp_path / "triton.log"
    )
    try:
        out = infer(server, "http", digits[0][:2], outputs=("TRUST_PROB",))
        assert out["TRUST_PROB"].shape == (2, 1)
        log = server.log_tail(200_000)
        assert "less calibrated than CONFIDENCE on clean held-out data" in log
        assert "(ECE 0.0471 against 0.0142)" in log
        assert "on shifted held-out data" not in log
    finally:
        server.stop()
