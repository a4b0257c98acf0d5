"""Trust metrics for Prometheus, exported on Triton's own metrics port.

The people who rely on these numbers never send a request: they watch dashboards
and get paged when trust drops. So the metrics follow Prometheus conventions
(``gradtrust_`` prefix, base units, ``_total`` counters) and carry only the
``model`` and ``version`` labels, which keeps cardinality bounded.

Served scores, as the histograms see them:

- GradTrust ``g`` lies in ``[1, C]`` (C classes); higher = more trust.
- Normalised GradTrust ``(g - 1) / (C - 1)`` lies in ``[0, 1]``; higher = more trust.
  It makes models with different class counts comparable on one dashboard.
- Softmax confidence lies in ``[1/C, 1]``; higher = more trust.

Everything above :class:`TrustMetrics` is pure numpy, so it is unit-tested without
Triton. :class:`TrustMetrics` takes the ``triton_python_backend_utils`` module as an
argument instead of importing it, for the same reason.

Cost: every metric call is a message from the Python backend stub to the server, and
the Python backend has no bulk ``observe``: histograms of the backend's own kind cost
one message per prediction per histogram, which measurably cut serving throughput
(docs/BENCHMARKS.md). So :class:`TrustMetrics` counts in process (:class:`HistogramCounts`)
and publishes the counts once a second as the counters a Prometheus histogram consists
of (``_bucket{le}``, ``_sum``, ``_count``): the cost is per flush, not per prediction.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from gradtrust.errors import ConfigError, InvalidInputError

__all__ = [
    "CONFIDENCE_BUCKETS",
    "LABELS",
    "METRIC_NAMES",
    "NORMALIZED_TRUST_BUCKETS",
    "SECONDS_BUCKETS",
    "BatchSummary",
    "HistogramCounts",
    "TrustMetrics",
    "cumulative_bucket_counts",
    "le_label",
    "low_trust_mask",
    "normalize_trust",
    "summarize_batch",
    "trust_buckets",
]

_log = logging.getLogger(__name__)

TRUST = "gradtrust_trust"
TRUST_NORMALIZED = "gradtrust_trust_normalized"
CONFIDENCE = "gradtrust_confidence"
PREDICTIONS = "gradtrust_predictions_total"
LOW_TRUST = "gradtrust_low_trust_predictions_total"
TRUST_SECONDS = "gradtrust_trust_compute_seconds"
HEATMAP_SECONDS = "gradtrust_heatmap_compute_seconds"
INVALID = "gradtrust_invalid_requests_total"

#: Every metric family this module exports (histograms expose ``_bucket``, ``_sum``, ``_count``).
METRIC_NAMES: tuple[str, ...] = (
    TRUST,
    TRUST_NORMALIZED,
    CONFIDENCE,
    PREDICTIONS,
    LOW_TRUST,
    TRUST_SECONDS,
    HEATMAP_SECONDS,
    INVALID,
)

#: The only labels, so a scrape holds one series set per served model version.
LABELS: tuple[str, ...] = ("model", "version")

# Trained classifiers put most predictions near full trust, so the normalised and the
# confidence buckets are dense near 1; a shift of mass out of the top buckets is what the
# distribution-shift alert sees. Fixed edges keep these histograms comparable across models.
NORMALIZED_TRUST_BUCKETS: tuple[float, ...] = (
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0,
)  # fmt: skip
CONFIDENCE_BUCKETS: tuple[float, ...] = (
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0,
)  # fmt: skip
# Per-batch compute time, from a tenth of a millisecond (closed forms on a small batch)
# to seconds (autograd heatmaps on a large one).
SECONDS_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


def _nice_edge(value: float) -> float:
    """Round to at most 3 significant digits whose label Triton prints cleanly.

    Triton writes ``le`` with 16 significant digits, so 8.11 would read
    ``le="8.109999999999999"``; fewer digits avoid that.
    """
    for digits in (3, 2, 1):
        edge = float(f"{value:.{digits}g}")
        if f"{edge:.16g}" == f"{edge:.{digits}g}":
            return edge
    return float(f"{value:.1g}")


def trust_buckets(
    num_classes: int, count: int = 12, threshold: float | None = None
) -> tuple[float, ...]:
    """Upper bucket edges for raw GradTrust in ``[1, C]``: ``count`` log-spaced edges.

    Log spacing gives resolution near 1, where low-trust predictions live (the
    normalised histogram resolves the crowded top end). The low-trust ``threshold``,
    if given and inside ``(1, C)``, becomes an exact edge, so ``le="<threshold>"``
    counts the predictions at or below it. The last edge is ``C`` itself: every valid
    GradTrust lands in a finite bucket.
    """
    _check_num_classes(num_classes)
    if count < 2:
        raise ConfigError(f"need at least 2 trust buckets, got {count}; pass count >= 2")
    top = float(num_classes)
    edges = {_nice_edge(float(v)) for v in np.geomspace(1.0, top, count)[:-1]}
    edges.add(top)
    if threshold is not None and 1.0 < threshold < top:
        edges.add(float(threshold))
    return tuple(sorted(e for e in edges if e <= top))


def normalize_trust(gradtrust: npt.ArrayLike, num_classes: int) -> npt.NDArray[np.float64]:
    """Map GradTrust from ``[1, C]`` to ``(g - 1) / (C - 1)`` in ``[0, 1]``; higher = more trust.

    Values a hair outside the range from rounding are clipped; non-finite values stay
    non-finite, so callers can tell them apart.
    """
    _check_num_classes(num_classes)
    g = np.asarray(gradtrust, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        normalized = (g - 1.0) / float(num_classes - 1)
    return np.where(np.isfinite(normalized), np.clip(normalized, 0.0, 1.0), normalized)


def low_trust_mask(gradtrust: npt.ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """True where a prediction counts as low trust: GradTrust below ``threshold``.

    A non-finite GradTrust carries no evidence of trust, so it counts as low trust too.
    """
    g = np.asarray(gradtrust, dtype=np.float64)
    finite = np.isfinite(g)
    return np.logical_or(~finite, np.where(finite, g, np.inf) < threshold)


def cumulative_bucket_counts(
    values: npt.ArrayLike, upper_bounds: Sequence[float]
) -> dict[float, int]:
    """Prometheus-style cumulative bucket counts: how many ``values`` are ``<= le``.

    The ``+Inf`` bucket is included. Useful to predict what a histogram will show
    after a known set of observations.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    counts = {float(le): int(np.count_nonzero(v <= le)) for le in upper_bounds}
    counts[math.inf] = int(v.size)
    return counts


@dataclass(frozen=True)
class BatchSummary:
    """What one batch contributes to the metrics; ``*_values`` exclude non-finite scores."""

    predictions: int
    low_trust: int
    trust_values: npt.NDArray[np.float64]
    normalized_values: npt.NDArray[np.float64]
    confidence_values: npt.NDArray[np.float64]


def summarize_batch(
    gradtrust: npt.ArrayLike,
    confidence: npt.ArrayLike,
    num_classes: int,
    low_trust_threshold: float,
) -> BatchSummary:
    """Reduce one batch of per-sample scores to counter increments and histogram values.

    Non-finite scores are counted (as predictions, and as low trust) but never
    observed: one NaN in a histogram's ``_sum`` would poison it until the next restart.
    """
    g = np.asarray(gradtrust, dtype=np.float64)
    p = np.asarray(confidence, dtype=np.float64)
    if g.ndim != 1 or p.ndim != 1 or g.shape != p.shape:
        raise InvalidInputError(
            "gradtrust and confidence must be 1-D arrays with one value per prediction, got "
            f"shapes {g.shape} and {p.shape}; pass one score per sample of the batch"
        )
    normalized = normalize_trust(g, num_classes)
    finite_g = np.isfinite(g)
    return BatchSummary(
        predictions=int(g.size),
        low_trust=int(np.count_nonzero(low_trust_mask(g, low_trust_threshold))),
        trust_values=g[finite_g],
        normalized_values=normalized[finite_g],
        confidence_values=p[np.isfinite(p)],
    )


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ConfigError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 2:
        raise ConfigError(
            f"GradTrust needs at least 2 classes, got num_classes={num_classes}; "
            "check the classifier's output dimension"
        )


def _check_threshold(threshold: float, num_classes: int) -> float:
    """A GradTrust value of at most C; 1 or less turns low-trust counting off (g >= 1)."""
    value = float(threshold)
    if not (math.isfinite(value) and value <= num_classes):
        raise ConfigError(
            f"low_trust_threshold must be a finite GradTrust value of at most {num_classes} "
            f"(the number of classes), got {threshold!r}; set the model config parameter "
            f"low_trust_threshold in [1, {num_classes}] (1 or less turns low-trust counting off)"
        )
    return value


def _check_seconds(seconds: float, what: str) -> float:
    value = float(seconds)
    if not (math.isfinite(value) and value >= 0.0):
        raise InvalidInputError(f"{what} must be a finite, non-negative duration, got {seconds!r}")
    return value


def le_label(edge: float) -> str:
    """An upper edge as the ``le`` label writes it: ``+Inf``, else up to 16 significant digits
    without trailing zeros (``1``, ``0.1``, ``8.24``), as Triton's own histograms print it."""
    return "+Inf" if math.isinf(edge) and edge > 0 else f"{float(edge):.16g}"


class HistogramCounts:
    """The state of a Prometheus classic histogram, accumulated in this process.

    Adding a batch is two numpy calls, whatever its size; :meth:`take` hands the counts
    over (and starts afresh), so they can be sent to Triton as a few counter increments
    per flush instead of one message per observation.
    """

    def __init__(self, edges: Sequence[float]) -> None:
        e = np.asarray(edges, dtype=np.float64)
        if e.ndim != 1 or e.size == 0 or not np.isfinite(e).all() or np.any(np.diff(e) <= 0):
            raise ConfigError(
                f"histogram edges must be finite and strictly increasing, got {list(edges)!r}"
            )
        self.edges = e
        #: Observations per bucket, not cumulative; the last one is (largest edge, +Inf].
        self.buckets = np.zeros(e.size + 1, dtype=np.int64)
        self.total = 0.0

    @property
    def count(self) -> int:
        return int(self.buckets.sum())

    def add(self, values: npt.ArrayLike) -> None:
        """Observe finite values (the caller drops non-finite ones: a NaN would poison ``_sum``)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        # Bucket i holds edges[i-1] < v <= edges[i]: the first edge >= v.
        self.buckets += np.bincount(
            np.searchsorted(self.edges, v, side="left"), minlength=self.buckets.size
        )
        self.total += float(v.sum())

    def cumulative(self) -> npt.NDArray[np.int64]:
        """Counts at or below each edge, then the ``+Inf`` bucket (= :attr:`count`)."""
        return np.cumsum(self.buckets)

    def take(self) -> HistogramCounts:
        """Everything added so far, as a new object; this one starts again from zero."""
        taken = HistogramCounts.__new__(HistogramCounts)
        taken.edges, taken.buckets, taken.total = self.edges, self.buckets, self.total
        self.buckets = np.zeros_like(taken.buckets)
        self.total = 0.0
        return taken


class _ExportedHistogram:
    """One histogram as Triton counters ``<name>_bucket{le=...}``, ``<name>_sum``, ``<name>_count``.

    These are exactly the series a Prometheus classic histogram exposes, so PromQL
    (``histogram_quantile``, ``rate(..._sum) / rate(..._count)``) reads them unchanged; only
    the ``# TYPE`` lines say counter. Counters rather than the backend's histogram kind
    because those take one value per message, and these take a whole flush's counts.
    """

    def __init__(
        self,
        counter: Any,
        name: str,
        description: str,
        edges: Sequence[float],
        labels: dict[str, str],
    ) -> None:
        self.pending = HistogramCounts(edges)
        bucket = counter(f"{name}_bucket", f"{description} (histogram bucket: observations <= le)")
        self.buckets = [
            bucket.Metric(labels={**labels, "le": le_label(le)})
            for le in (*self.pending.edges.tolist(), math.inf)
        ]
        self.sum = counter(f"{name}_sum", f"{description} (histogram sum)").Metric(labels=labels)
        self.count = counter(f"{name}_count", f"{description} (histogram count)").Metric(
            labels=labels
        )

    def updates(self, taken: HistogramCounts) -> list[tuple[Any, float]]:
        """The counter increments that publish ``taken`` (none for an empty one)."""
        if taken.count == 0:
            return []
        calls = [
            (metric.increment, float(n))
            for metric, n in zip(self.buckets, taken.cumulative().tolist(), strict=True)
            if n
        ]
        return [
            *calls,
            (self.sum.increment, taken.total),
            (self.count.increment, float(taken.count)),
        ]


class TrustMetrics:
    """The gradtrust_* metrics of one served model version, for the Python backend.

    Create it once in ``initialize`` and :meth:`close` it in ``finalize``. Recording a
    batch only adds to in-process counts (microseconds, no message to the server); a
    background thread publishes them every ``flush_seconds``, so monitoring costs a few
    dozen backend calls per second however many predictions are served, and the endpoint
    lags the predictions by at most that interval. Publishing is best effort: a failed
    call is logged and counted in :attr:`failures`, never raised, because losing a sample
    of monitoring must not fail a prediction.
    """

    def __init__(
        self,
        pb_utils: Any,
        model: str,
        version: str,
        num_classes: int,
        low_trust_threshold: float,
        flush_seconds: float | None = 1.0,
    ) -> None:
        _check_num_classes(num_classes)
        self.num_classes = int(num_classes)
        self.low_trust_threshold = _check_threshold(low_trust_threshold, self.num_classes)
        if flush_seconds is not None and not (math.isfinite(flush_seconds) and flush_seconds > 0):
            raise ConfigError(
                f"flush_seconds must be a positive number of seconds or None, got {flush_seconds!r}"
            )
        self.flush_seconds = flush_seconds
        self.labels = {"model": str(model), "version": str(version)}
        self.failures = 0
        self._closed = False
        self._lock = threading.Lock()  # guards the pending counts
        self._flush_lock = threading.Lock()  # one flush at a time
        family = pb_utils.MetricFamily
        self._families: list[Any] = []

        def counter(name: str, description: str) -> Any:
            fam = family(name=name, description=description, kind=family.COUNTER)
            self._families.append(fam)
            return fam

        def histogram(name: str, description: str, edges: Sequence[float]) -> _ExportedHistogram:
            return _ExportedHistogram(counter, name, description, edges, self.labels)

        self._histograms: dict[str, _ExportedHistogram] = {
            TRUST: histogram(
                TRUST,
                "GradTrust of each prediction, in [1, number of classes]; higher = more trust",
                trust_buckets(self.num_classes, threshold=self.low_trust_threshold),
            ),
            TRUST_NORMALIZED: histogram(
                TRUST_NORMALIZED,
                "GradTrust of each prediction rescaled to [0, 1] as (g-1)/(C-1); "
                "higher = more trust",
                NORMALIZED_TRUST_BUCKETS,
            ),
            CONFIDENCE: histogram(
                CONFIDENCE,
                "Softmax confidence (top-class probability) of each prediction",
                CONFIDENCE_BUCKETS,
            ),
            TRUST_SECONDS: histogram(
                TRUST_SECONDS, "Seconds spent computing trust scores, per batch", SECONDS_BUCKETS
            ),
            HEATMAP_SECONDS: histogram(
                HEATMAP_SECONDS,
                "Seconds spent computing explanation heatmaps, per batch",
                SECONDS_BUCKETS,
            ),
        }
        self._counters: dict[str, Any] = {
            name: counter(name, description).Metric(labels=self.labels)
            for name, description in (
                (PREDICTIONS, "Predictions served with a trust score"),
                (LOW_TRUST, "Predictions with GradTrust below the model's low_trust_threshold"),
                (INVALID, "Requests rejected as invalid input"),
            )
        }
        self._pending_counts = dict.fromkeys(self._counters, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if flush_seconds is not None:
            self._thread = threading.Thread(
                target=self._flush_periodically, name=f"gradtrust-metrics-{model}", daemon=True
            )
            self._thread.start()

    def observe_batch(
        self, gradtrust: npt.ArrayLike, confidence: npt.ArrayLike, trust_seconds: float
    ) -> BatchSummary:
        """Record the scores of one batch and the seconds spent computing its trust.

        An empty batch records nothing. Returns what was recorded.
        """
        seconds = _check_seconds(trust_seconds, "trust_seconds")
        summary = summarize_batch(gradtrust, confidence, self.num_classes, self.low_trust_threshold)
        if summary.predictions == 0:
            return summary
        with self._lock:
            if self._closed:
                return summary
            self._pending_counts[PREDICTIONS] += summary.predictions
            self._pending_counts[LOW_TRUST] += summary.low_trust
            self._histograms[TRUST].pending.add(summary.trust_values)
            self._histograms[TRUST_NORMALIZED].pending.add(summary.normalized_values)
            self._histograms[CONFIDENCE].pending.add(summary.confidence_values)
            self._histograms[TRUST_SECONDS].pending.add([seconds])
        return summary

    def observe_heatmap(self, seconds: float) -> None:
        """Record the seconds spent computing the heatmaps of one batch."""
        value = _check_seconds(seconds, "heatmap seconds")
        with self._lock:
            if not self._closed:
                self._histograms[HEATMAP_SECONDS].pending.add([value])

    def count_invalid(self, n: int = 1) -> None:
        """Count ``n`` requests rejected as invalid input."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InvalidInputError(f"count_invalid needs a non-negative integer, got {n!r}")
        with self._lock:
            if not self._closed:
                self._pending_counts[INVALID] += int(n)

    def flush(self) -> int:
        """Publish everything recorded since the last flush; returns the backend calls made.

        Called by the background thread, by :meth:`close`, and by anyone who needs the
        endpoint current now (tests, or ``flush_seconds=None``).
        """
        with self._flush_lock:
            with self._lock:
                taken = {name: h.pending.take() for name, h in self._histograms.items()}
                counts, self._pending_counts = (
                    self._pending_counts,
                    dict.fromkeys(self._pending_counts, 0),
                )
            calls = [(self._counters[name].increment, float(n)) for name, n in counts.items() if n]
            for name, histogram in self._histograms.items():
                calls += histogram.updates(taken[name])
            for method, value in calls:
                self._call(method, value)
            return len(calls)

    def close(self) -> None:
        """Stop the flush thread, publish what is pending, then release the metrics before
        their families (the backend requires that order). Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
        self.flush()
        with self._lock:
            self._closed = True
        self._counters.clear()
        self._histograms.clear()
        self._families.clear()

    def _flush_periodically(self) -> None:
        interval = cast(float, self.flush_seconds)
        while not self._stop.wait(interval):
            try:
                self.flush()
            except Exception as err:  # noqa: BLE001 - the thread must outlive any one flush
                _log.warning("gradtrust metrics flush failed: %s", err)

    def _call(self, method: Any, value: float) -> None:
        try:
            method(value)
        except Exception as err:  # noqa: BLE001 - monitoring must never fail a prediction
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                _log.warning("gradtrust metric update failed (%d so far): %s", self.failures, err)
