"""The metrics' small-batch paths (Python floats instead of numpy calls, issue 16) record
exactly what the array paths record."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrust.serving.telemetry import (
    LowTrustRule,
    _Histogram,
    low_trust_mask,
    summarize_batch,
)

EDGE_VALUES = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, np.nextafter(1.0, 0.0), 2.5, 1e300]


@pytest.mark.parametrize("size", [1, 2, 16, 17, 40])
@pytest.mark.parametrize("score", ["gradtrust", "trust_prob"])
def test_summarize_batch_counts_low_trust_as_the_mask_does_when_batches_are_small_or_large(
    size, score
):
    rng = np.random.default_rng(size)
    values = rng.choice(EDGE_VALUES, size=size)
    rule = LowTrustRule(score, 1.0)  # type: ignore[arg-type]
    other = np.full(size, 0.5)
    summary = summarize_batch(
        values if score == "gradtrust" else other,
        other,
        rule,
        values if score == "trust_prob" else None,
    )
    assert summary.low_trust == int(np.count_nonzero(low_trust_mask(values, 1.0)))


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0, 1.0000001, 3.0, 200.0, 1e300])
def test_histogram_add_one_records_what_a_one_value_array_recorded_when_given_a_float(value):
    edges = [0.5, 1.0, 1.5, 100.0]
    alone, array = (_Histogram(None, "h", "doc", {}, edges) for _ in range(2))
    alone.add_one(value)
    # What add() did for a one-value array before: searchsorted bucket, numpy sum.
    bucket = int(np.searchsorted(np.asarray(edges), [value], side="left")[0])
    array.buckets[bucket].inc(1)
    array.sum.inc(float(np.array([value]).sum()))
    assert [b.value for b in alone.buckets] == [b.value for b in array.buckets]
    assert alone.sum.value == array.sum.value
    via_add = _Histogram(None, "h", "doc", {}, edges)
    via_add.add(np.array([value]))
    assert [b.value for b in via_add.buckets] == [b.value for b in array.buckets]
    assert via_add.sum.value == array.sum.value
