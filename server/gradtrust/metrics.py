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

Cost: every metric call is a message from the Python backend stub to the server.
The Python backend has no bulk ``observe``, so a batch of ``n`` predictions costs
``3 n`` histogram observations plus a constant handful of counter increments, all
made from the single :meth:`TrustMetrics.observe_batch` call per batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    "TrustMetrics",
    "cumulative_bucket_counts",
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


class TrustMetrics:
    """The gradtrust_* metric families of one served model version, for the Python backend.

    Create it once in ``initialize`` and :meth:`close` it in ``finalize``. Metric calls are
    best effort: a failed call is logged and counted in :attr:`failures`, never raised,
    because losing a sample of monitoring must not fail a prediction.
    """

    def __init__(
        self,
        pb_utils: Any,
        model: str,
        version: str,
        num_classes: int,
        low_trust_threshold: float,
    ) -> None:
        _check_num_classes(num_classes)
        self.num_classes = int(num_classes)
        self.low_trust_threshold = _check_threshold(low_trust_threshold, self.num_classes)
        self.labels = {"model": str(model), "version": str(version)}
        self.failures = 0
        self._closed = False
        family = pb_utils.MetricFamily
        self._families: list[Any] = []
        self._metrics: list[Any] = []

        def histogram(name: str, description: str, buckets: Sequence[float]) -> Any:
            fam = family(name=name, description=description, kind=family.HISTOGRAM)
            self._families.append(fam)
            metric = fam.Metric(labels=self.labels, buckets=[float(b) for b in buckets])
            self._metrics.append(metric)
            return metric

        def counter(name: str, description: str) -> Any:
            fam = family(name=name, description=description, kind=family.COUNTER)
            self._families.append(fam)
            metric = fam.Metric(labels=self.labels)
            self._metrics.append(metric)
            return metric

        self._trust = histogram(
            TRUST,
            "GradTrust of each prediction, in [1, number of classes]; higher = more trust",
            trust_buckets(self.num_classes, threshold=self.low_trust_threshold),
        )
        self._normalized = histogram(
            TRUST_NORMALIZED,
            "GradTrust of each prediction rescaled to [0, 1] as (g-1)/(C-1); higher = more trust",
            NORMALIZED_TRUST_BUCKETS,
        )
        self._confidence = histogram(
            CONFIDENCE, "Softmax confidence (top-class probability) of each prediction",
            CONFIDENCE_BUCKETS,
        )  # fmt: skip
        self._predictions = counter(PREDICTIONS, "Predictions served with a trust score")
        self._low_trust = counter(
            LOW_TRUST, "Predictions whose GradTrust was below the model's low_trust_threshold"
        )
        self._trust_seconds = histogram(
            TRUST_SECONDS, "Seconds spent computing trust scores, per batch", SECONDS_BUCKETS
        )
        self._heatmap_seconds = histogram(
            HEATMAP_SECONDS, "Seconds spent computing explanation heatmaps, per batch",
            SECONDS_BUCKETS,
        )  # fmt: skip
        self._invalid = counter(INVALID, "Requests rejected as invalid input")

    def observe_batch(
        self, gradtrust: npt.ArrayLike, confidence: npt.ArrayLike, trust_seconds: float
    ) -> BatchSummary:
        """Record the scores of one batch and the seconds spent computing its trust.

        An empty batch records nothing. Returns what was recorded.
        """
        seconds = _check_seconds(trust_seconds, "trust_seconds")
        summary = summarize_batch(gradtrust, confidence, self.num_classes, self.low_trust_threshold)
        if summary.predictions == 0 or self._closed:
            return summary
        self._call(self._predictions.increment, float(summary.predictions))
        if summary.low_trust:
            self._call(self._low_trust.increment, float(summary.low_trust))
        for metric, values in (
            (self._trust, summary.trust_values),
            (self._normalized, summary.normalized_values),
            (self._confidence, summary.confidence_values),
        ):
            for value in values.tolist():
                self._call(metric.observe, value)
        self._call(self._trust_seconds.observe, seconds)
        return summary

    def observe_heatmap(self, seconds: float) -> None:
        """Record the seconds spent computing the heatmaps of one batch."""
        value = _check_seconds(seconds, "heatmap seconds")
        if not self._closed:
            self._call(self._heatmap_seconds.observe, value)

    def count_invalid(self, n: int = 1) -> None:
        """Count ``n`` requests rejected as invalid input."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InvalidInputError(f"count_invalid needs a non-negative integer, got {n!r}")
        if n and not self._closed:
            self._call(self._invalid.increment, float(n))

    def close(self) -> None:
        """Release the metrics, then their families (the backend requires that order)."""
        if self._closed:
            return
        self._closed = True
        self._metrics.clear()
        self._trust = self._normalized = self._confidence = None
        self._predictions = self._low_trust = self._invalid = None
        self._trust_seconds = self._heatmap_seconds = None
        self._families.clear()

    def _call(self, method: Any, value: float) -> None:
        try:
            method(value)
        except Exception as err:  # noqa: BLE001 - monitoring must never fail a prediction
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                _log.warning("gradtrust metric update failed (%d so far): %s", self.failures, err)
