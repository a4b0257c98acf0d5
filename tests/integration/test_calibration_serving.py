"""`gradtrust calibrate` round trip through the real server: the served TRUST_PROB is
better calibrated than softmax confidence on held-out digits, and the threshold meets its
target there."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from gradtrust.core.calibration import load_model_calibration
from gradtrust.tools.evaluate.calibration import check_heldout
from gradtrust.tools.evaluate.roundtrip import heldout_set
from tests.conftest import DEMO_MODEL, MODEL_REPOSITORY
from tests.integration.triton_io import PROTOCOLS, infer

pytestmark = pytest.mark.integration

OUTPUTS = ("CLASS_ID", "CONFIDENCE", "GRADTRUST", "TRUST_PROB")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_served_trust_prob_beats_softmax_ece_and_threshold_meets_target_when_calibrated(
    triton_server, protocol
):
    calibration = load_model_calibration(MODEL_REPOSITORY / DEMO_MODEL)
    assert calibration is not None, "run `make calibrate`: the demo entry has no calibration"
    images, labels = heldout_set(mix="clean", seed=0)
    parts = [infer(triton_server, protocol, images[i : i + 64], outputs=OUTPUTS)
             for i in range(0, len(images), 64)]  # fmt: skip
    out = {name: np.concatenate([p[name] for p in parts])[:, 0] for name in OUTPUTS}
    np.testing.assert_allclose(
        out["TRUST_PROB"], calibration.apply(out["GRADTRUST"]), rtol=1e-5, atol=1e-6
    )
    check = check_heldout(
        calibration,
        out["GRADTRUST"],
        out["CONFIDENCE"],
        out["CLASS_ID"] == labels,
        trust_prob=out["TRUST_PROB"],
    )
    assert check.ece_improved, check
    assert check.target_met, check


def test_server_uses_calibrated_threshold_when_calibrate_wrote_it():
    calibration = load_model_calibration(MODEL_REPOSITORY / DEMO_MODEL)
    assert calibration is not None
    config = (MODEL_REPOSITORY / DEMO_MODEL / "config.pbtxt").read_text()
    assert (
        f'"low_trust_threshold", value: {{ string_value: "{calibration.low_trust_threshold!r}"'
        in config
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_explains_missing_calibration_when_uncalibrated_model_is_asked_for_trust_prob(
    bare_demo_server, protocol, digits
):
    with pytest.raises(InferenceServerException) as info:
        infer(bare_demo_server, protocol, digits[0][:2], outputs=("TRUST_PROB",))
    assert "run `gradtrust calibrate`" in str(info.value)
