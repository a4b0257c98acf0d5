"""The metrics keep only finite scores; small batches decide that on Python floats."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrust.serving.telemetry import LowTrustRule, summarize_batch

VALUES = [0.0, -0.0, 0.5, 1e300, -1e300, 5e-324, np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("size", [1, 2, 16, 17, 40])
def test_summarize_batch_keeps_exactly_the_finite_scores_when_batches_are_small_or_large(size):
    rng = np.random.default_rng(size)
    for _ in range(20):
        trust = rng.choice(VALUES, size=size)
        conf = rng.choice(VALUES, size=size)
        summary = summarize_batch(trust, conf, LowTrustRule("gradtrust", 1.0))
        np.testing.assert_array_equal(summary.trust_values, trust[np.isfinite(trust)])
        np.testing.assert_array_equal(summary.confidence_values, conf[np.isfinite(conf)])
        assert summary.predictions == size
