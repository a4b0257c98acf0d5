"""Specification of gradtrust.serving.telemetry: low-trust counting, and the multiprocess
files TrustMetrics writes, read back with prometheus-client's own MultiProcessCollector and
checked against what prometheus-client's metric classes write for the same observations."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gradtrust.core.calibration import ProbabilityMap, Signal, ThresholdTarget, TrustCalibration
from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.telemetry import (
    CALIBRATED,
    CONFIDENCE_BUCKETS,
    HELDOUT_ECE,
    HISTOGRAMS,
    LOW_TRUST_THRESHOLD,
    METRIC_NAMES,
    SECONDS_BUCKETS,
    TRUST_BUCKETS,
    TRUST_PROBABILITY_BUCKETS,
    LowTrustRule,
    TrustMetrics,
    low_trust_mask,
    low_trust_rule,
    summarize_batch,
)

UNCALIBRATED = LowTrustRule("gradtrust", 3.0)
CALIBRATED_RULE = LowTrustRule("trust_prob", 0.8)


def _collect(directory: Path) -> dict[str, Any]:
    """The metric families of a multiprocess directory, as the exporter reads them."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return {m.name: m for m in registry.collect()}


def _samples(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in _collect(directory).values()
        for s in family.samples
    }


def _value(directory: Path, name: str, **labels: str) -> float:
    want = {"model": "m", "version": "1", **labels}
    found = [v for (n, lab), v in _samples(directory).items() if n == name and dict(lab) == want]
    assert len(found) == 1, (name, labels, found)
    return found[0]


# --- low-trust counting ------------------------------------------------------------------


def test_low_trust_mask_is_strictly_below_threshold_when_values_are_finite():
    assert low_trust_mask([0.0, 2.999, 3.0, 7.0], 3.0).tolist() == [True, True, False, False]


def test_low_trust_mask_flags_non_finite_scores_when_scores_are_broken():
    assert low_trust_mask([np.nan, np.inf, -np.inf, 5.0], 3.0).tolist() == [True] * 3 + [False]


@pytest.mark.parametrize(
    ("score", "threshold"),
    [("gradtrust", math.nan), ("gradtrust", math.inf), ("trust_prob", 1.5), ("msp", 0.5)],
)
def test_low_trust_rule_rejects_a_threshold_when_it_cannot_be_judged(score, threshold):
    with pytest.raises(ConfigError):
        LowTrustRule(score, threshold)


def test_low_trust_rule_judges_gradtrust_against_the_config_when_the_entry_is_uncalibrated():
    assert low_trust_rule(None, 4.5) == LowTrustRule("gradtrust", 4.5)


def test_low_trust_rule_judges_trust_prob_against_the_calibration_when_calibrated():
    calibration = TrustCalibration(
        signal=Signal("input", ("msp",)),
        map=ProbabilityMap((0.3, 0.9, 1.0), (0.2, 0.7, 0.99)),
        low_trust_threshold=0.6,
        target=ThresholdTarget("flag_rate", 0.05),
        achieved_on_calibration=0.05,
    )
    # The config parameter (GRADTRUST units) no longer decides.
    assert low_trust_rule(calibration, 123.0) == LowTrustRule("trust_prob", 0.6)


def test_summarize_batch_counts_every_prediction_but_observes_only_finite_scores_when_nan():
    s = summarize_batch([np.nan, 2.0, 9.0], [0.5, np.nan, 0.9], UNCALIBRATED)
    assert s.predictions == 3
    assert s.low_trust == 2  # NaN and 2.0
    assert s.trust_values.tolist() == [2.0, 9.0]
    assert s.confidence_values.tolist() == [0.5, 0.9]
    assert s.trust_prob_values is None


def test_summarize_batch_judges_trust_prob_when_the_rule_says_so():
    s = summarize_batch([0.1, 0.1, 30.0], [0.4, 0.4, 1.0], CALIBRATED_RULE, [0.9, 0.5, 0.1])
    assert s.low_trust == 2  # on TRUST_PROB, whatever GRADTRUST says
    with pytest.raises(InvalidInputError, match="TRUST_PROB"):
        summarize_batch([1.0], [0.5], CALIBRATED_RULE)


@pytest.mark.parametrize(("g", "p"), [([[1.0]], [0.5]), ([1.0, 2.0], [0.5]), (1.0, 0.5)])
def test_summarize_batch_rejects_scores_when_shapes_disagree_or_are_not_1d(g, p):
    with pytest.raises(InvalidInputError):
        summarize_batch(g, p, UNCALIBRATED)


@given(arrays(np.float64, st.integers(1, 20), elements=st.floats(0, 50)), st.integers(0, 19))
def test_summarize_batch_counts_each_sample_alone_when_other_samples_join_the_batch(g, i):
    i %= g.size
    alone = summarize_batch(g[i : i + 1], [0.5], UNCALIBRATED).low_trust
    together = summarize_batch(g, np.full(g.size, 0.5), UNCALIBRATED)
    others = summarize_batch(np.delete(g, i), np.full(g.size - 1, 0.5), UNCALIBRATED)
    assert together.low_trust == alone + others.low_trust


# --- the metric families and their buckets ------------------------------------------------


@pytest.mark.parametrize(
    "edges", [TRUST_BUCKETS, TRUST_PROBABILITY_BUCKETS, CONFIDENCE_BUCKETS, SECONDS_BUCKETS]
)
def test_buckets_are_finite_and_strictly_increasing_when_defined(edges):
    e = np.asarray(edges)
    assert np.isfinite(e).all() and (np.diff(e) > 0).all()


def test_probability_buckets_end_at_one_and_are_dense_near_it_when_defined():
    for edges in (TRUST_PROBABILITY_BUCKETS, CONFIDENCE_BUCKETS):
        assert edges[-1] == 1.0
        assert sum(e >= 0.95 for e in edges) >= 5


def test_trust_buckets_resolve_the_range_where_errors_live_when_defined():
    # GRADTRUST ~ log 2 - 2 log(1 - p): at least 8 edges below p = 0.99 (about 10).
    assert sum(e <= 10.0 for e in TRUST_BUCKETS) >= 8
    assert TRUST_BUCKETS[0] > 0  # 0 is the minimum: its own bucket holds the coin tosses


def test_trust_metrics_write_every_family_with_its_type_when_constructed(tmp_path):
    TrustMetrics("m", "1", CALIBRATED_RULE, calibrated=True, directory=tmp_path)
    families = _collect(tmp_path)
    types = {name: f.type for name, f in families.items()}
    for name in HISTOGRAMS:
        assert types[name] == "histogram", name
    for name in METRIC_NAMES:
        if name.endswith("_total"):
            assert types[name.removesuffix("_total")] == "counter", name
    assert types[CALIBRATED] == types[LOW_TRUST_THRESHOLD] == "gauge"
    assert _value(tmp_path, CALIBRATED) == 1.0
    assert _value(tmp_path, LOW_TRUST_THRESHOLD, score="trust_prob") == 0.8


def test_trust_metrics_export_no_trust_prob_and_say_so_when_uncalibrated(tmp_path):
    TrustMetrics("m", "1", UNCALIBRATED, calibrated=False, directory=tmp_path)
    families = _collect(tmp_path)
    assert "gradtrust_trust_probability" not in families
    assert _value(tmp_path, CALIBRATED) == 0.0
    assert _value(tmp_path, LOW_TRUST_THRESHOLD, score="gradtrust") == 3.0


def test_trust_metrics_export_the_held_out_ece_and_warn_where_softmax_was_better(tmp_path, caplog):
    heldout = {
        "clean": {"trust_prob": 0.041, "confidence": 0.031},
        "shifted": {"trust_prob": 0.02, "confidence": 0.09},
    }
    TrustMetrics("m", "1", CALIBRATED_RULE, True, directory=tmp_path, heldout_ece=heldout)
    for part, ece in heldout.items():
        assert _value(tmp_path, HELDOUT_ECE, part=part, output="TRUST_PROB") == ece["trust_prob"]
        assert _value(tmp_path, HELDOUT_ECE, part=part, output="CONFIDENCE") == ece["confidence"]
    warned = [r.getMessage() for r in caplog.records if "less calibrated" in r.getMessage()]
    assert len(warned) == 1 and "clean held-out" in warned[0] and "0.0410" in warned[0]


def test_trust_metrics_export_no_held_out_ece_when_the_calibration_has_none(tmp_path):
    TrustMetrics("m", "1", CALIBRATED_RULE, calibrated=True, directory=tmp_path)
    assert HELDOUT_ECE not in _collect(tmp_path)


def test_trust_metrics_refuse_a_trust_prob_rule_when_uncalibrated(tmp_path):
    with pytest.raises(ConfigError):
        TrustMetrics("m", "1", CALIBRATED_RULE, calibrated=False, directory=tmp_path)


def test_trust_metrics_refuse_a_directory_when_it_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="gradtrust serve"):
        TrustMetrics("m", "1", UNCALIBRATED, calibrated=False, directory=tmp_path / "gone")


# --- what the files hold after traffic ----------------------------------------------------


def _reference_histogram(directory: Path, name: str, edges: tuple[float, ...], values: list[float]):
    """What prometheus-client's own Histogram writes for the same observations, one observe
    per value, in a process of its own (multiprocess mode is chosen at import)."""
    code = (
        "import sys, json\n"
        "from prometheus_client import Histogram\n"
        "name, edges, values = json.loads(sys.argv[1])\n"
        "h = Histogram(name, 'doc', ['model', 'version'], buckets=edges).labels('m', '1')\n"
        "for v in values: h.observe(v)\n"
    )
    import json

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run(
        [sys.executable, "-c", code, json.dumps([name, list(edges), values])], env=env, check=True
    )


def _histogram_samples(directory: Path, name: str) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for s in _collect(directory)[name].samples
        if s.labels.get("model") == "m"
    }


@settings(max_examples=5, deadline=None)
@given(
    st.lists(
        arrays(
            np.float64,
            st.integers(0, 70),
            elements=st.sampled_from([*TRUST_BUCKETS, 0.0]) | st.floats(0, 120, allow_nan=False),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_histogram_equals_prometheus_clients_own_when_batches_of_any_size_are_observed(
    tmp_path_factory, batches
):
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    metrics = TrustMetrics("m", "1", UNCALIBRATED, calibrated=False, directory=ours)
    for g in batches:
        metrics.observe_batch(g, np.full(g.size, 0.5), 0.001)
    values = [float(v) for g in batches for v in g]
    _reference_histogram(theirs, "gradtrust_trust", TRUST_BUCKETS, values)
    got, want = (
        _histogram_samples(ours, "gradtrust_trust"),
        _histogram_samples(theirs, "gradtrust_trust"),
    )
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-9), key


def test_counts_rise_by_exactly_the_predictions_when_batches_of_mixed_sizes_arrive(tmp_path):
    metrics = TrustMetrics("m", "1", CALIBRATED_RULE, calibrated=True, directory=tmp_path)
    rng = np.random.default_rng(0)
    sizes = [1, 64, 3, 17, 1, 40, 2]
    low = 0
    for n in sizes:
        q = rng.random(n)
        low += int(np.count_nonzero(q < 0.8))
        metrics.observe_batch(rng.exponential(8, n), rng.random(n), 0.002, q)
    n = sum(sizes)
    assert _value(tmp_path, "gradtrust_predictions_total") == n
    for name in ("gradtrust_trust", "gradtrust_confidence", "gradtrust_trust_probability"):
        assert _value(tmp_path, f"{name}_count") == n
        assert _value(tmp_path, f"{name}_bucket", le="+Inf") == n
    assert _value(tmp_path, "gradtrust_low_trust_predictions_total") == low
    assert _value(tmp_path, "gradtrust_trust_compute_seconds_count") == len(sizes)
    assert metrics.predictions == n


def test_bucket_edges_are_inclusive_when_values_fall_exactly_on_them(tmp_path):
    metrics = TrustMetrics("m", "1", UNCALIBRATED, calibrated=False, directory=tmp_path)
    metrics.observe_batch([1.0, 1.0000001, 0.0, 200.0], [1.0, 0.1, 0.95, 0.5], 0.0)
    assert _value(tmp_path, "gradtrust_trust_bucket", le="1.0") == 2  # 0 and 1
    assert _value(tmp_path, "gradtrust_trust_bucket", le="1.5") == 3
    assert _value(tmp_path, "gradtrust_trust_bucket", le="100.0") == 3
    assert _value(tmp_path, "gradtrust_trust_bucket", le="+Inf") == 4
    assert _value(tmp_path, "gradtrust_confidence_bucket", le="0.95") == 3  # 0.95 itself too
    assert _value(tmp_path, "gradtrust_trust_sum") == pytest.approx(202.0000001)


def test_non_finite_scores_are_counted_but_never_observed_when_a_batch_has_them(tmp_path):
    metrics = TrustMetrics("m", "1", UNCALIBRATED, calibrated=False, directory=tmp_path)
    metrics.observe_batch([np.nan, 5.0], [0.5, np.inf], 0.0)
    assert _value(tmp_path, "gradtrust_predictions_total") == 2
    assert _value(tmp_path, "gradtrust_low_trust_predictions_total") == 1
    assert _value(tmp_path, "gradtrust_trust_count") == 1
    assert math.isfinite(_value(tmp_path, "gradtrust_trust_sum"))
    assert _value(tmp_path, "gradtrust_confidence_count") == 1


def test_heatmap_timings_and_invalid_requests_are_counted_when_recorded(tmp_path):
    metrics = TrustMetrics("m", "1", UNCALIBRATED, calibrated=False, directory=tmp_path)
    metrics.observe_heatmap(0.02)
    metrics.observe_heatmap(0.5)
    metrics.count_invalid(3)
    metrics.count_invalid(0)
    assert _value(tmp_path, "gradtrust_heatmap_compute_seconds_count") == 2
    assert _value(tmp_path, "gradtrust_heatmap_compute_seconds_sum") == pytest.approx(0.52)
    assert _value(tmp_path, "gradtrust_invalid_requests_total") == 3
    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidInputError):
            metrics.count_invalid(bad)


@pytest.mark.parametrize("seconds", [-0.1, math.nan, math.inf])
def test_observe_batch_rejects_the_duration_when_not_finite_and_non_negative(tmp_path, seconds):
    metrics = TrustMetrics("m", "1", UNCALIBRATED, calibrated=False, directory=tmp_path)
    with pytest.raises(InvalidInputError):
        metrics.observe_batch([1.0], [0.5], seconds)


def test_observe_batch_needs_trust_prob_when_the_model_is_calibrated(tmp_path):
    metrics = TrustMetrics("m", "1", CALIBRATED_RULE, calibrated=True, directory=tmp_path)
    with pytest.raises(InvalidInputError, match="TRUST_PROB"):
        metrics.observe_batch([1.0], [0.5], 0.0)


def test_observe_batch_records_nothing_when_the_batch_is_empty(tmp_path):
    metrics = TrustMetrics("m", "1", UNCALIBRATED, calibrated=False, directory=tmp_path)
    metrics.observe_batch(np.empty(0), np.empty(0), 0.001)
    # A batch whose every request was invalid has no TRUST_PROB either: still no error.
    calibrated = TrustMetrics("c", "1", CALIBRATED_RULE, calibrated=True, directory=tmp_path)
    calibrated.observe_batch(np.empty(0), np.empty(0), 0.001, None)
    assert _value(tmp_path, "gradtrust_predictions_total") == 0
    assert _value(tmp_path, "gradtrust_trust_compute_seconds_count") == 0


def test_a_second_writer_for_the_same_model_continues_the_count_when_created_in_one_process(
    tmp_path,
):
    # One process's files hold one value per series: a model re-initialised in the same
    # process (or a new stub that reuses a dead one's pid) continues, never restarts, it.
    first = TrustMetrics("m", "1", UNCALIBRATED, calibrated=False, directory=tmp_path)
    first.observe_batch([1.0, 2.0], [0.5, 0.5], 0.0)
    second = TrustMetrics("m", "1", UNCALIBRATED, calibrated=False, directory=tmp_path)
    second.observe_batch([4.0], [0.5], 0.0)
    assert _value(tmp_path, "gradtrust_predictions_total") == 3
    assert _value(tmp_path, "gradtrust_trust_count") == 3


def _write_in_another_process(directory: Path, n: int) -> None:
    code = (
        "import sys, numpy as np\n"
        "from gradtrust.serving.telemetry import TrustMetrics, LowTrustRule\n"
        "m = TrustMetrics('m', '1', LowTrustRule('gradtrust', 3.0), False, sys.argv[1])\n"
        "n = int(sys.argv[2])\n"
        "m.observe_batch(np.arange(n, dtype=float), np.full(n, 0.5), 0.0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(directory), str(n)], check=True)


def test_instances_in_separate_processes_add_up_when_the_files_are_merged(tmp_path):
    _write_in_another_process(tmp_path, 5)
    _write_in_another_process(tmp_path, 7)
    assert len(list(tmp_path.glob("histogram_*.db"))) == 2
    assert _value(tmp_path, "gradtrust_predictions_total") == 12
    assert _value(tmp_path, "gradtrust_trust_count") == 12


def test_the_exposition_passes_promtool_when_two_models_and_instances_wrote_it(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed; run `make test-tools`")
    _write_in_another_process(tmp_path, 5)
    _write_in_another_process(tmp_path, 9)
    calibrated = TrustMetrics("c", "2", CALIBRATED_RULE, calibrated=True, directory=tmp_path)
    calibrated.observe_batch([1.0, 20.0], [0.3, 0.99], 0.001, [0.4, 0.97])
    calibrated.observe_heatmap(0.01)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    text = generate_latest(registry)
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, check=False
    )
    complaints = (check.stdout + check.stderr).decode()
    assert check.returncode == 0 and not complaints.strip(), complaints
    assert b"# TYPE gradtrust_trust histogram" in text
    assert b"# TYPE gradtrust_predictions_total counter" in text


def test_metrics_stay_in_process_and_warn_when_no_directory_is_set(monkeypatch, caplog):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = TrustMetrics("m", "1", UNCALIBRATED, calibrated=False)
    metrics.observe_batch([1.0, 5.0], [0.5, 0.5], 0.0)
    assert not metrics.exported
    assert metrics.predictions == 2
    assert "gradtrust serve" in caplog.text
