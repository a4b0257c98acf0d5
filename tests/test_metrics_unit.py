"""Specification of gradtrust.metrics: bucket edges, normalisation, low-trust counting and
what TrustMetrics sends to Triton's metric API (checked against a recording fake of it)."""

from __future__ import annotations

import math
import re
import weakref
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.metrics import (
    CONFIDENCE_BUCKETS,
    LABELS,
    METRIC_NAMES,
    NORMALIZED_TRUST_BUCKETS,
    SECONDS_BUCKETS,
    TrustMetrics,
    cumulative_bucket_counts,
    low_trust_mask,
    normalize_trust,
    summarize_batch,
    trust_buckets,
)

# --- a recording stand-in for triton_python_backend_utils' metric API -------------------


class _FakeMetric:
    """Like the backend's Metric, it does not keep its family alive."""

    def __init__(self, family: _FakeFamily, labels: dict[str, str], buckets: list[float] | None):
        self.pb, self.name = family.pb, family.name
        self.family = weakref.ref(family)
        self.labels, self.buckets = labels, buckets
        self.pb.live_metrics += 1

    def increment(self, value: float) -> None:
        self._record("increment", value)

    def observe(self, value: float) -> None:
        self._record("observe", value)

    def _record(self, op: str, value: float) -> None:
        if self.family() is None:
            raise RuntimeError("MetricFamily deleted before its Metric")
        if self.pb.fail:
            raise RuntimeError("stub IPC failed")
        self.pb.log.append((self.name, op, value))

    def __del__(self) -> None:
        self.pb.live_metrics -= 1
        if self.family() is None:
            self.pb.order_errors += 1


class _FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

    def __init__(self, pb: _FakePbUtils, name: str, description: str, kind: str):
        self.pb, self.name, self.description, self.kind = pb, name, description, kind
        pb.families[name] = {"kind": kind, "description": description, "metrics": []}

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> _FakeMetric:  # noqa: N802
        if (self.kind == self.HISTOGRAM) != (buckets is not None):
            raise ValueError("buckets are required for histograms and only for them")
        self.pb.families[self.name]["metrics"].append({"labels": dict(labels), "buckets": buckets})
        return _FakeMetric(self, dict(labels), buckets)


class _FakePbUtils:
    """Module-like object: ``pb.MetricFamily(name=..., description=..., kind=...)``."""

    def __init__(self) -> None:
        self.families: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[str, str, float]] = []
        self.live_metrics = 0
        self.order_errors = 0
        self.fail = False
        pb = self

        class MetricFamily(_FakeFamily):
            def __init__(self, name: str, description: str, kind: str):
                super().__init__(pb, name, description, kind)

        self.MetricFamily = MetricFamily

    def calls(self, name: str) -> list[tuple[str, float]]:
        return [(op, v) for n, op, v in self.log if n == name]

    def observed(self, name: str) -> list[float]:
        return [v for op, v in self.calls(name) if op == "observe"]


def _metrics(num_classes: int = 10, threshold: float = 5.0) -> tuple[_FakePbUtils, TrustMetrics]:
    pb = _FakePbUtils()
    return pb, TrustMetrics(pb, "mnist", "1", num_classes, threshold)


# --- pure functions ----------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 3, 10, 100, 1000])
def test_trust_buckets_span_one_to_num_classes_when_built_for_any_class_count(num_classes):
    edges = trust_buckets(num_classes)
    assert edges[0] == 1.0
    assert edges[-1] == float(num_classes)
    assert list(edges) == sorted(set(edges))


def test_trust_buckets_are_log_spaced_when_many_classes():
    edges = np.array(trust_buckets(1000, count=7))
    ratios = edges[1:] / edges[:-1]
    np.testing.assert_allclose(ratios, 10**0.5, rtol=0.01)


def test_trust_buckets_include_the_threshold_exactly_when_one_is_given():
    edges = trust_buckets(10, threshold=4.25)
    assert 4.25 in edges
    assert edges == tuple(sorted(set(trust_buckets(10)) | {4.25}))


@pytest.mark.parametrize("num_classes", [2, 3, 7, 10, 100, 1000])
def test_trust_buckets_print_as_short_labels_when_triton_formats_them(num_classes):
    # Triton prints le with 16 significant digits: 8.11 would show as 8.109999999999999.
    for edge in trust_buckets(num_classes):
        assert len(f"{edge:.16g}") <= 5, edge


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True])
def test_trust_buckets_reject_the_class_count_when_not_an_integer_of_at_least_two(bad):
    with pytest.raises(ConfigError, match="num_classes|classes"):
        trust_buckets(bad)


def test_fixed_buckets_are_sorted_and_end_at_one_when_defined_for_unit_ranges():
    for buckets in (NORMALIZED_TRUST_BUCKETS, CONFIDENCE_BUCKETS):
        assert list(buckets) == sorted(set(buckets))
        assert buckets[-1] == 1.0 and buckets[0] > 0.0
    assert list(SECONDS_BUCKETS) == sorted(set(SECONDS_BUCKETS))


def test_fixed_buckets_are_dense_near_one_when_scores_concentrate_there():
    # Trained classifiers put most predictions near full trust: resolve the top 1 %.
    assert sum(b >= 0.99 for b in NORMALIZED_TRUST_BUCKETS) >= 3
    assert sum(b >= 0.99 for b in CONFIDENCE_BUCKETS) >= 3


def test_normalize_trust_maps_the_range_onto_unit_interval_when_values_are_at_the_ends():
    np.testing.assert_array_equal(normalize_trust([1.0, 5.5, 10.0], 10), [0.0, 0.5, 1.0])


@given(
    st.integers(2, 1000),
    arrays(np.float64, st.integers(0, 20), elements=st.floats(0.0, 1.0)),
)
def test_normalize_trust_stays_in_unit_interval_and_keeps_order_when_inputs_are_valid(c, u):
    g = 1.0 + u * (c - 1)
    n = normalize_trust(g, c)
    assert np.all((n >= 0.0) & (n <= 1.0))
    order = np.argsort(g, kind="stable")
    assert np.all(np.diff(n[order]) >= 0.0)


def test_normalize_trust_clips_rounding_noise_and_keeps_nan_when_values_stray():
    n = normalize_trust([1.0 - 1e-12, 10.0 + 1e-9, np.nan], 10)
    assert n[0] == 0.0 and n[1] == 1.0 and math.isnan(n[2])


def test_normalize_trust_does_not_mutate_its_input_when_called():
    g = np.array([1.0, 3.0, 10.0])
    normalize_trust(g, 10)
    np.testing.assert_array_equal(g, [1.0, 3.0, 10.0])


def test_low_trust_mask_is_strictly_below_threshold_when_values_are_finite():
    np.testing.assert_array_equal(
        low_trust_mask([1.0, 4.999, 5.0, 9.0], 5.0), [True, True, False, False]
    )


def test_low_trust_mask_flags_non_finite_trust_when_scores_are_broken():
    np.testing.assert_array_equal(low_trust_mask([np.nan, np.inf, 9.0], 5.0), [True, True, False])


def test_cumulative_bucket_counts_follow_prometheus_le_semantics_when_values_hit_edges():
    counts = cumulative_bucket_counts([0.5, 1.0, 1.0, 2.0, 7.0], [1.0, 2.0, 5.0])
    assert counts == {1.0: 3, 2.0: 4, 5.0: 4, math.inf: 5}


def test_summarize_batch_counts_every_prediction_but_observes_only_finite_scores_when_nan():
    s = summarize_batch([9.0, np.nan, 2.0], [0.99, 0.5, np.nan], 10, 5.0)
    assert s.predictions == 3
    assert s.low_trust == 2  # 2.0 and the NaN
    np.testing.assert_array_equal(s.trust_values, [9.0, 2.0])
    np.testing.assert_allclose(s.normalized_values, [8 / 9, 1 / 9])
    np.testing.assert_array_equal(s.confidence_values, [0.99, 0.5])


@pytest.mark.parametrize(
    "g,p",
    [([1.0, 2.0], [0.5]), ([[1.0, 2.0]], [[0.5, 0.6]]), (3.0, 0.5)],
)
def test_summarize_batch_rejects_scores_when_shapes_disagree_or_are_not_1d(g, p):
    with pytest.raises(InvalidInputError, match="1-D"):
        summarize_batch(g, p, 10, 5.0)


def test_summarize_batch_counts_each_sample_alone_when_other_samples_join_the_batch():
    alone = summarize_batch([3.0], [0.7], 10, 5.0)
    together = summarize_batch([9.0, 3.0, 8.0], [0.9, 0.7, 0.8], 10, 5.0)
    assert alone.low_trust == 1 and together.low_trust == 1
    assert together.trust_values[1] == alone.trust_values[0]


# --- TrustMetrics against the fake backend API --------------------------------------------


def test_trust_metrics_create_every_family_with_model_and_version_labels_when_constructed():
    pb, _ = _metrics()
    assert set(pb.families) == set(METRIC_NAMES)
    for fam in pb.families.values():
        assert [m["labels"] for m in fam["metrics"]] == [{"model": "mnist", "version": "1"}]
        assert set(fam["metrics"][0]["labels"]) == set(LABELS)
        assert fam["description"]


def test_trust_metrics_follow_prometheus_naming_when_families_are_created():
    pb, _ = _metrics()
    for name, fam in pb.families.items():
        assert re.fullmatch(r"gradtrust_[a-z_]+", name)
        if fam["kind"] == _FakeFamily.COUNTER:
            assert name.endswith("_total")
        else:
            assert fam["kind"] == _FakeFamily.HISTOGRAM
            assert not name.endswith("_total")
    assert pb.families["gradtrust_trust_compute_seconds"]["kind"] == _FakeFamily.HISTOGRAM


def test_trust_metrics_use_class_count_buckets_for_raw_trust_when_constructed():
    pb, _ = _metrics(num_classes=10, threshold=4.5)
    buckets = pb.families["gradtrust_trust"]["metrics"][0]["buckets"]
    assert buckets == list(trust_buckets(10, threshold=4.5))
    normalized = pb.families["gradtrust_trust_normalized"]["metrics"][0]["buckets"]
    assert normalized == list(NORMALIZED_TRUST_BUCKETS)


def test_observe_batch_updates_counters_once_and_histograms_per_sample_when_batch_arrives():
    pb, tm = _metrics(threshold=5.0)
    g = np.array([9.5, 2.0, 10.0, 4.0])
    p = np.array([0.99, 0.4, 1.0, 0.6])
    tm.observe_batch(g, p, trust_seconds=0.002)
    assert pb.calls("gradtrust_predictions_total") == [("increment", 4.0)]
    assert pb.calls("gradtrust_low_trust_predictions_total") == [("increment", 2.0)]
    assert pb.observed("gradtrust_trust") == g.tolist()
    np.testing.assert_allclose(pb.observed("gradtrust_trust_normalized"), (g - 1) / 9)
    assert pb.observed("gradtrust_confidence") == p.tolist()
    assert pb.observed("gradtrust_trust_compute_seconds") == [0.002]
    # 2 counter increments + 3 observations per sample + 1 timing observation.
    assert len(pb.log) == 2 + 3 * 4 + 1


def test_observe_batch_sends_plain_floats_when_given_float32_arrays():
    pb, tm = _metrics()
    tm.observe_batch(np.array([9.0], np.float32), np.array([0.9], np.float32), 0.001)
    assert all(type(v) is float for _, v in pb.calls("gradtrust_trust"))


def test_observe_batch_skips_the_low_trust_counter_when_no_prediction_is_low():
    pb, tm = _metrics(threshold=2.0)
    tm.observe_batch([9.0, 8.0], [0.9, 0.8], 0.001)
    assert pb.calls("gradtrust_low_trust_predictions_total") == []


def test_observe_batch_records_nothing_when_the_batch_is_empty():
    pb, tm = _metrics()
    summary = tm.observe_batch(np.array([]), np.array([]), 0.0)
    assert summary.predictions == 0
    assert pb.log == []


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf])
def test_observe_batch_rejects_the_duration_when_not_finite_and_non_negative(seconds):
    _, tm = _metrics()
    with pytest.raises(InvalidInputError, match="duration"):
        tm.observe_batch([9.0], [0.9], seconds)


def test_observe_heatmap_observes_one_duration_per_batch_when_called():
    pb, tm = _metrics()
    tm.observe_heatmap(0.25)
    assert pb.calls("gradtrust_heatmap_compute_seconds") == [("observe", 0.25)]


def test_count_invalid_increments_by_n_and_rejects_negative_counts_when_called():
    pb, tm = _metrics()
    tm.count_invalid(3)
    tm.count_invalid(0)
    assert pb.calls("gradtrust_invalid_requests_total") == [("increment", 3.0)]
    with pytest.raises(InvalidInputError):
        tm.count_invalid(-1)


@pytest.mark.parametrize("threshold", [11.0, math.nan, math.inf])
def test_trust_metrics_reject_the_threshold_when_above_num_classes_or_not_finite(threshold):
    with pytest.raises(ConfigError, match="low_trust_threshold"):
        TrustMetrics(_FakePbUtils(), "m", "1", 10, threshold)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_trust_metrics_count_no_low_trust_when_threshold_is_one_or_less(threshold):
    # GradTrust is never below 1, so such a threshold turns low-trust counting off.
    pb, tm = _metrics(threshold=threshold)
    tm.observe_batch([1.0, 1.5, 9.0], [0.3, 0.5, 0.9], 0.001)
    assert pb.calls("gradtrust_low_trust_predictions_total") == []
    assert pb.families["gradtrust_trust"]["metrics"][0]["buckets"] == list(trust_buckets(10))


def test_trust_metrics_keep_serving_and_count_failures_when_the_backend_call_fails(caplog):
    pb, tm = _metrics()
    pb.fail = True
    summary = tm.observe_batch([9.0, 2.0], [0.9, 0.5], 0.001)
    assert summary.predictions == 2
    assert tm.failures == 2 + 3 * 2 + 1
    assert "metric update failed" in caplog.text


def test_close_releases_metrics_before_their_families_when_the_model_is_finalized():
    pb, tm = _metrics()
    tm.observe_batch([9.0], [0.9], 0.001)
    tm.close()
    assert pb.live_metrics == 0
    assert pb.order_errors == 0
    tm.close()  # idempotent
    tm.observe_batch([9.0], [0.9], 0.001)  # a late batch is ignored, not an error
    tm.observe_heatmap(0.1)
    tm.count_invalid(1)
