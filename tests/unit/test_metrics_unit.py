"""Specification of gradtrust.serving.telemetry: bucket edges, normalisation, low-trust counting and
what TrustMetrics sends to Triton's metric API (checked against a recording fake of it)."""

from __future__ import annotations

import math
import re
import threading
import time
import weakref
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.telemetry import (
    CONFIDENCE_BUCKETS,
    LABELS,
    METRIC_NAMES,
    NORMALIZED_TRUST_BUCKETS,
    SECONDS_BUCKETS,
    HistogramCounts,
    TrustMetrics,
    cumulative_bucket_counts,
    le_label,
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
        self.pb.log.append((self.name, op, value, self.labels))

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
        self.log: list[tuple[str, str, float, dict[str, str]]] = []
        self.live_metrics = 0
        self.order_errors = 0
        self.fail = False
        pb = self

        class MetricFamily(_FakeFamily):
            def __init__(self, name: str, description: str, kind: str):
                super().__init__(pb, name, description, kind)

        self.MetricFamily = MetricFamily

    def calls(self, name: str) -> list[tuple[str, float]]:
        return [(op, v) for n, op, v, _ in self.log if n == name]

    def total(self, name: str, **labels: str) -> float:
        """What a scrape would show: the sum of all increments of a series so far."""
        want = set(labels.items())
        return sum(v for n, _, v, got in self.log if n == name and want <= set(got.items()))

    def buckets(self, name: str) -> dict[float, float]:
        """``{le: cumulative count}`` of one exported histogram, as a scrape would show it."""
        edges = [m["labels"]["le"] for m in self.families[f"{name}_bucket"]["metrics"]]
        return {_le(le): self.total(f"{name}_bucket", le=le) for le in edges}


def _le(label: str) -> float:
    return math.inf if label == "+Inf" else float(label)


def _metrics(num_classes: int = 10, threshold: float = 5.0) -> tuple[_FakePbUtils, TrustMetrics]:
    """Metrics without the background thread: tests flush when they want to look."""
    pb = _FakePbUtils()
    return pb, TrustMetrics(pb, "mnist", "1", num_classes, threshold, flush_seconds=None)


HISTOGRAMS = (
    "gradtrust_trust",
    "gradtrust_trust_normalized",
    "gradtrust_confidence",
    "gradtrust_trust_compute_seconds",
    "gradtrust_heatmap_compute_seconds",
)
COUNTERS = (
    "gradtrust_predictions_total",
    "gradtrust_low_trust_predictions_total",
    "gradtrust_invalid_requests_total",
)


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


# --- HistogramCounts: a histogram accumulated in process -----------------------------------


@given(arrays(np.float64, st.integers(0, 200), elements=st.floats(-1.0, 12.0)))
def test_histogram_counts_match_prometheus_le_semantics_when_values_are_added(values):
    edges = (1.0, 2.0, 5.0, 10.0)
    h = HistogramCounts(edges)
    h.add(values[: len(values) // 2])
    h.add(values[len(values) // 2 :])
    expected = cumulative_bucket_counts(values, edges)
    assert dict(zip([*edges, math.inf], h.cumulative().tolist(), strict=True)) == expected
    assert h.count == values.size
    assert math.isclose(h.total, float(values.sum()), abs_tol=1e-9)


def test_histogram_counts_start_again_from_zero_when_taken():
    h = HistogramCounts((1.0, 2.0))
    h.add([0.5, 1.5, 3.0])
    taken = h.take()
    assert taken.cumulative().tolist() == [1, 2, 3] and taken.total == 5.0
    assert h.count == 0 and h.total == 0.0
    h.add([1.0])
    assert taken.cumulative().tolist() == [1, 2, 3]  # the taken counts are not shared


@pytest.mark.parametrize("edges", [(), (2.0, 1.0), (1.0, 1.0), (1.0, math.nan), (1.0, math.inf)])
def test_histogram_counts_reject_edges_when_not_finite_and_strictly_increasing(edges):
    with pytest.raises(ConfigError, match="strictly increasing"):
        HistogramCounts(edges)


@pytest.mark.parametrize(
    "edge,label", [(math.inf, "+Inf"), (1.0, "1"), (0.1, "0.1"), (8.24, "8.24"), (1000.0, "1000")]
)
def test_le_label_writes_edges_as_prometheus_histograms_do_when_formatted(edge, label):
    assert le_label(edge) == label


# --- TrustMetrics against the fake backend API --------------------------------------------


def test_trust_metrics_export_each_histogram_as_bucket_sum_and_count_counters_when_constructed():
    pb, _ = _metrics()
    expected = {f"{h}{part}" for h in HISTOGRAMS for part in ("_bucket", "_sum", "_count")}
    assert set(pb.families) == expected | set(COUNTERS)
    assert set(METRIC_NAMES) == set(HISTOGRAMS) | set(COUNTERS)
    for name, fam in pb.families.items():
        assert re.fullmatch(r"gradtrust_[a-z_]+", name)
        assert fam["kind"] == _FakeFamily.COUNTER, name
        assert fam["description"]
        for metric in fam["metrics"]:
            assert {k: v for k, v in metric["labels"].items() if k != "le"} == {
                "model": "mnist",
                "version": "1",
            }
            assert ("le" in metric["labels"]) == name.endswith("_bucket")
    assert set(LABELS) == {"model", "version"}


def test_trust_metrics_put_class_count_edges_and_the_threshold_on_raw_trust_when_constructed():
    pb, _ = _metrics(num_classes=10, threshold=4.5)
    les = [m["labels"]["le"] for m in pb.families["gradtrust_trust_bucket"]["metrics"]]
    assert les == [le_label(e) for e in trust_buckets(10, threshold=4.5)] + ["+Inf"]
    les = [m["labels"]["le"] for m in pb.families["gradtrust_trust_normalized_bucket"]["metrics"]]
    assert les == [le_label(e) for e in NORMALIZED_TRUST_BUCKETS] + ["+Inf"]


def test_observe_batch_sends_nothing_to_the_server_until_the_next_flush_when_a_batch_arrives():
    pb, tm = _metrics()
    tm.observe_batch([9.5, 2.0], [0.99, 0.4], trust_seconds=0.002)
    tm.count_invalid(1)
    tm.observe_heatmap(0.01)
    assert pb.log == []


def test_flush_publishes_what_a_histogram_per_prediction_would_show_when_batches_were_observed():
    pb, tm = _metrics(threshold=5.0)
    g = np.array([9.5, 2.0, 10.0, 4.0, 1.0])
    p = np.array([0.99, 0.4, 1.0, 0.6, 0.1])
    tm.observe_batch(g[:2], p[:2], trust_seconds=0.002)
    tm.observe_batch(g[2:], p[2:], trust_seconds=0.004)
    tm.flush()
    assert pb.total("gradtrust_predictions_total") == 5
    assert pb.total("gradtrust_low_trust_predictions_total") == 3
    edges = trust_buckets(10, threshold=5.0)
    assert pb.buckets("gradtrust_trust") == cumulative_bucket_counts(g, edges)
    normalized = normalize_trust(g, 10)
    assert pb.buckets("gradtrust_trust_normalized") == cumulative_bucket_counts(
        normalized, NORMALIZED_TRUST_BUCKETS
    )
    assert pb.buckets("gradtrust_confidence") == cumulative_bucket_counts(p, CONFIDENCE_BUCKETS)
    assert pb.total("gradtrust_trust_sum") == pytest.approx(g.sum())
    assert pb.total("gradtrust_trust_normalized_sum") == pytest.approx(normalized.sum())
    assert pb.total("gradtrust_confidence_sum") == pytest.approx(p.sum())
    for name in ("gradtrust_trust", "gradtrust_trust_normalized", "gradtrust_confidence"):
        assert pb.total(f"{name}_count") == 5
    # One timing per batch.
    assert pb.total("gradtrust_trust_compute_seconds_count") == 2
    assert pb.total("gradtrust_trust_compute_seconds_sum") == pytest.approx(0.006)


def test_flush_costs_at_most_one_call_per_series_when_many_predictions_are_pending():
    pb, tm = _metrics()
    rng = np.random.default_rng(0)
    for _ in range(100):
        tm.observe_batch(rng.uniform(1, 10, 64), rng.uniform(0.1, 1, 64), 0.001)
    calls = tm.flush()
    series = sum(len(f["metrics"]) for f in pb.families.values())
    assert calls == len(pb.log) <= series < 6400
    assert pb.total("gradtrust_predictions_total") == 6400


def test_flush_sends_only_what_is_new_when_called_again():
    pb, tm = _metrics()
    tm.observe_batch([9.0], [0.9], 0.001)
    tm.flush()
    assert tm.flush() == 0
    tm.observe_batch([2.0, 3.0], [0.3, 0.4], 0.001)
    tm.flush()
    assert pb.total("gradtrust_predictions_total") == 3
    assert pb.buckets("gradtrust_trust") == cumulative_bucket_counts(
        [9.0, 2.0, 3.0], trust_buckets(10, threshold=5.0)
    )


def test_flush_sends_plain_floats_when_given_float32_arrays():
    pb, tm = _metrics()
    tm.observe_batch(np.array([9.0], np.float32), np.array([0.9], np.float32), 0.001)
    tm.flush()
    assert pb.log and all(type(v) is float for _, _, v, _ in pb.log)


def test_flush_skips_the_low_trust_counter_when_no_prediction_is_low():
    pb, tm = _metrics(threshold=2.0)
    tm.observe_batch([9.0, 8.0], [0.9, 0.8], 0.001)
    tm.flush()
    assert pb.calls("gradtrust_low_trust_predictions_total") == []


def test_observe_batch_records_nothing_when_the_batch_is_empty():
    pb, tm = _metrics()
    summary = tm.observe_batch(np.array([]), np.array([]), 0.0)
    assert summary.predictions == 0
    assert tm.flush() == 0 and pb.log == []


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf])
def test_observe_batch_rejects_the_duration_when_not_finite_and_non_negative(seconds):
    _, tm = _metrics()
    with pytest.raises(InvalidInputError, match="duration"):
        tm.observe_batch([9.0], [0.9], seconds)


def test_observe_heatmap_records_one_duration_per_batch_when_called():
    pb, tm = _metrics()
    tm.observe_heatmap(0.25)
    tm.flush()
    assert pb.total("gradtrust_heatmap_compute_seconds_count") == 1
    assert pb.total("gradtrust_heatmap_compute_seconds_sum") == 0.25
    assert pb.buckets("gradtrust_heatmap_compute_seconds")[0.25] == 1


def test_count_invalid_adds_n_and_rejects_negative_counts_when_called():
    pb, tm = _metrics()
    tm.count_invalid(3)
    tm.count_invalid(0)
    tm.count_invalid(2)
    tm.flush()
    assert pb.calls("gradtrust_invalid_requests_total") == [("increment", 5.0)]
    with pytest.raises(InvalidInputError):
        tm.count_invalid(-1)


@pytest.mark.parametrize("threshold", [11.0, math.nan, math.inf])
def test_trust_metrics_reject_the_threshold_when_above_num_classes_or_not_finite(threshold):
    with pytest.raises(ConfigError, match="low_trust_threshold"):
        TrustMetrics(_FakePbUtils(), "m", "1", 10, threshold, flush_seconds=None)


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.nan, math.inf])
def test_trust_metrics_reject_the_flush_interval_when_not_a_positive_duration(seconds):
    with pytest.raises(ConfigError, match="flush_seconds"):
        TrustMetrics(_FakePbUtils(), "m", "1", 10, 5.0, flush_seconds=seconds)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_trust_metrics_count_no_low_trust_when_threshold_is_one_or_less(threshold):
    # GradTrust is never below 1, so such a threshold turns low-trust counting off.
    pb, tm = _metrics(threshold=threshold)
    tm.observe_batch([1.0, 1.5, 9.0], [0.3, 0.5, 0.9], 0.001)
    tm.flush()
    assert pb.calls("gradtrust_low_trust_predictions_total") == []
    les = [m["labels"]["le"] for m in pb.families["gradtrust_trust_bucket"]["metrics"]]
    assert les == [le_label(e) for e in trust_buckets(10)] + ["+Inf"]


def test_trust_metrics_keep_serving_and_count_failures_when_the_backend_call_fails(caplog):
    pb, tm = _metrics()
    pb.fail = True
    summary = tm.observe_batch([9.0, 2.0], [0.9, 0.5], 0.001)
    assert summary.predictions == 2
    calls = tm.flush()
    assert calls > 0 and tm.failures == calls
    assert "metric update failed" in caplog.text


def test_close_publishes_what_is_pending_then_releases_metrics_before_families_when_finalized():
    pb, tm = _metrics()
    tm.observe_batch([9.0], [0.9], 0.001)
    tm.close()
    assert pb.total("gradtrust_predictions_total") == 1
    assert pb.live_metrics == 0
    assert pb.order_errors == 0
    tm.close()  # idempotent
    tm.observe_batch([9.0], [0.9], 0.001)  # a late batch is ignored, not an error
    tm.observe_heatmap(0.1)
    tm.count_invalid(1)
    assert tm.flush() == 0
    assert pb.total("gradtrust_predictions_total") == 1


def _wait(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_the_background_thread_publishes_within_the_flush_interval_when_batches_arrive():
    pb = _FakePbUtils()
    tm = TrustMetrics(pb, "mnist", "1", 10, 5.0, flush_seconds=0.05)
    try:
        tm.observe_batch([9.0, 2.0], [0.9, 0.5], 0.001)
        assert _wait(lambda: pb.total("gradtrust_predictions_total") == 2)
        tm.observe_batch([3.0], [0.5], 0.001)
        assert _wait(lambda: pb.total("gradtrust_predictions_total") == 3)
    finally:
        tm.close()
    assert not any(t.name.startswith("gradtrust-metrics") for t in threading.enumerate())


def test_every_prediction_is_published_exactly_once_when_batches_race_the_flush_thread():
    pb = _FakePbUtils()
    tm = TrustMetrics(pb, "mnist", "1", 10, 5.0, flush_seconds=0.001)

    def serve() -> None:
        for _ in range(200):
            tm.observe_batch([9.0, 2.0, 4.0], [0.9, 0.5, 0.6], 0.001)

    workers = [threading.Thread(target=serve) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    tm.close()
    assert pb.total("gradtrust_predictions_total") == 2400
    assert pb.total("gradtrust_low_trust_predictions_total") == 1600
    assert pb.buckets("gradtrust_trust")[math.inf] == 2400
    assert pb.total("gradtrust_trust_compute_seconds_count") == 800
