"""`gradtrust evaluate --server`: the evaluation scored through a real tritonserver gives the
same predictions and scores as the in-process scorer (up to float32 on the wire)."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrust.tools.evaluate.scoring import InProcessScorer, ServerScorer
from tests.conftest import DEMO_ONNX

pytestmark = pytest.mark.integration


def test_server_scorer_matches_in_process_scores_when_scoring_real_digits(triton_server, digits):
    images = digits[0][:96]
    served = ServerScorer(triton_server.http_url, triton_server.model_name)
    try:
        remote = served.score(images)
    finally:
        served.close()
    local = InProcessScorer(DEMO_ONNX).score(images)
    np.testing.assert_array_equal(remote.pred, local.pred)
    assert "gradtrust" in remote.scores and "msp" in remote.scores
    assert "odin" in served.unavailable and "odin" not in remote.scores
    for name, values in remote.scores.items():
        np.testing.assert_allclose(values, local.scores[name], rtol=2e-5, atol=1e-6, err_msg=name)
