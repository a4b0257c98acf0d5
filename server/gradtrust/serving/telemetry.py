"""Trust metrics for Prometheus, written by each Python backend stub and served by
``gradtrust serve``.

The people who rely on these numbers never send a request: they watch dashboards and get
paged when trust drops. So the metrics follow Prometheus conventions (``gradtrust_``
prefix, base units, ``_total`` counters, real histograms) and carry only the ``model``
and ``version`` labels, which keeps cardinality bounded.

How they reach Prometheus. Each model instance runs in its own Python backend stub
process. Triton's custom-metric API costs one message from the stub to the server per
value, which held demo throughput down to 55-81 % of plain when histograms were observed
per prediction (docs/BENCHMARKS.md). So the stubs write prometheus-client's multiprocess
files instead: ``gradtrust serve`` (:mod:`gradtrust.ops.exporter`) gives tritonserver, and
so every stub, a ``PROMETHEUS_MULTIPROC_DIR``; each batch adds its counts to this
process's memory-mapped files there (one 16-byte write per changed series, no message to
anyone), and the exporter merges the files of every stub, live or dead, on each scrape
with prometheus-client's own ``MultiProcessCollector``. A stub that is restarted or
reloaded leaves its files behind, so totals neither reset nor count twice.

The files are written with prometheus-client's own ``mmap_dict`` module, loaded on its
own: importing the ``prometheus_client`` package imports ``ssl``, which the Python
backend stub of the nvidia-pytriton wheel cannot load (its embedded interpreter lacks a
symbol that the environment's ``_ssl`` needs), while ``mmap_dict`` needs only the
standard library. The keys and file names follow prometheus-client's metric classes; the
unit tests read what this module writes with ``MultiProcessCollector`` and compare it
with what those classes write for the same observations.

Served scores, as the histograms see them (higher = more trust for all three):

- ``GRADTRUST``, the logarithm of the counterfactual (contrast) trust, in ``[0, inf)``:
  0 when the prediction is a coin toss, about ``log 2 - 2 log(1 - p)`` for a confident
  softmax probability ``p``. Its scale depends on the model (how far its logits spread),
  so its histogram compares a model with itself over time, not models with each other.
- ``TRUST_PROB``, the calibrated probability that the prediction is right, in ``[0, 1]``,
  only for entries with a trust calibration; comparable across models by construction.
- softmax confidence, in ``[1/C, 1]``.
"""

from __future__ import annotations

import bisect
import importlib.util
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from gradtrust.core.calibration import TrustCalibration, softmax_was_better
from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving import contract

__all__ = [
    "CONFIDENCE_BUCKETS",
    "HISTOGRAMS",
    "LABELS",
    "METRIC_NAMES",
    "SECONDS_BUCKETS",
    "TRUST_BUCKETS",
    "TRUST_PROBABILITY_BUCKETS",
    "BatchSummary",
    "LowTrustRule",
    "TrustMetrics",
    "low_trust_mask",
    "low_trust_rule",
    "summarize_batch",
]

_log = logging.getLogger(__name__)

#: The environment variable that switches prometheus-client to its multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

TRUST = "gradtrust_trust"
TRUST_PROBABILITY = "gradtrust_trust_probability"
CONFIDENCE = "gradtrust_confidence"
TRUST_SECONDS = "gradtrust_trust_compute_seconds"
HEATMAP_SECONDS = "gradtrust_heatmap_compute_seconds"
PREDICTIONS = "gradtrust_predictions_total"
LOW_TRUST = "gradtrust_low_trust_predictions_total"
INVALID = "gradtrust_invalid_requests_total"
CALIBRATED = "gradtrust_model_calibrated"
LOW_TRUST_THRESHOLD = "gradtrust_low_trust_threshold"
#: ECE of TRUST_PROB and of CONFIDENCE on each held-out part at calibration time (labels
#: ``part`` and ``output``): where TRUST_PROB's is higher, CONFIDENCE was the better
#: probability on that kind of traffic, and dashboards should say so.
HELDOUT_ECE = "gradtrust_calibration_heldout_ece"
#: Introspective (second-stage) predictions served, and those whose class differs from the
#: feed-forward prediction: their ratio is a shift signal (docs/MONITORING.md).
INTROSPECTIVE = "gradtrust_introspective_predictions_total"
INTROSPECTIVE_DISAGREEMENTS = "gradtrust_introspective_disagreements_total"

#: The histograms (each exposes ``_bucket{le}``, ``_sum`` and ``_count``).
HISTOGRAMS: tuple[str, ...] = (TRUST, TRUST_PROBABILITY, CONFIDENCE, TRUST_SECONDS, HEATMAP_SECONDS)
#: Every metric family the stubs export, as named on the endpoint (counters with ``_total``).
METRIC_NAMES: tuple[str, ...] = (
    *HISTOGRAMS,
    PREDICTIONS,
    LOW_TRUST,
    INVALID,
    CALIBRATED,
    LOW_TRUST_THRESHOLD,
    HELDOUT_ECE,
    INTROSPECTIVE,
    INTROSPECTIVE_DISAGREEMENTS,
)
#: The only labels (the threshold gauge adds ``score``, one of two values; the held-out
#: ECE gauge adds ``part`` and ``output``, a few values each).
LABELS: tuple[str, ...] = ("model", "version")

# GRADTRUST = log contrast trust: about log 2 - 2 log(1 - p) for a top probability p, so
# 2 ~ p = 0.5, 5 ~ 0.88, 10 ~ 0.99, 20 ~ 0.99994. Errors live below 10 on the models we
# measured; the edges are dense there and coarse above, the same for every model so that
# a model's distribution today compares with its own baseline bucket for bucket.
TRUST_BUCKETS: tuple[float, ...] = (
    0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0,
    30.0, 40.0, 50.0, 75.0, 100.0,
)  # fmt: skip
# Trained classifiers put most predictions near full confidence and near P(correct) = 1,
# so these edges are dense near 1; a shift of mass out of the top buckets is what the
# dashboards show first.
TRUST_PROBABILITY_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995,
    0.999, 1.0,
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

Score = Literal["gradtrust", "trust_prob"]


@dataclass(frozen=True)
class LowTrustRule:
    """Which score decides "low trust", and below what value.

    A calibrated entry judges ``TRUST_PROB`` against the threshold its calibration chose
    (a probability, comparable across models); an uncalibrated one judges ``GRADTRUST``
    against the config parameter ``low_trust_threshold``. A threshold at or below the
    score's minimum (0 for both) turns low-trust counting off.
    """

    score: Score
    threshold: float

    def __post_init__(self) -> None:
        if self.score not in ("gradtrust", "trust_prob"):
            raise ConfigError(f"low trust is judged on gradtrust or trust_prob, not {self.score!r}")
        if not math.isfinite(self.threshold):
            raise ConfigError(
                f"the low-trust threshold must be a finite number, got {self.threshold!r}: set "
                "the config parameter low_trust_threshold (or re-run `gradtrust calibrate`)"
            )
        if self.score == "trust_prob" and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(
                f"a low-trust threshold on TRUST_PROB is a probability, got {self.threshold!r}: "
                "re-run `gradtrust calibrate`"
            )


_SMALL_BATCH = 16
"""Up to this many predictions, :func:`summarize_batch` counts low trust in Python."""


def low_trust_mask(values: npt.ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """True where a prediction counts as low trust: its score below ``threshold``.

    A non-finite score carries no evidence of trust, so it counts as low trust too.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    return np.logical_or(~finite, np.where(finite, v, np.inf) < threshold)


@dataclass(frozen=True)
class BatchSummary:
    """What one batch contributes; ``*_values`` hold the finite scores only (a NaN in a
    histogram's ``_sum`` would poison it until the next restart)."""

    predictions: int
    low_trust: int
    trust_values: npt.NDArray[np.float64]
    confidence_values: npt.NDArray[np.float64]
    trust_prob_values: npt.NDArray[np.float64] | None


def _one_per_sample(name: str, values: npt.ArrayLike, size: int | None) -> npt.NDArray[np.float64]:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or (size is not None and v.size != size):
        raise InvalidInputError(
            f"{name} must be a 1-D array with one value per prediction"
            + (f" ({size})" if size is not None else "")
            + f", got shape {v.shape}"
        )
    return v


def _finite(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    # Small batches (the usual one image) decide on Python floats: right after a forward
    # pass the two numpy calls cost several times the whole check.
    if v.size <= _SMALL_BATCH and all(map(math.isfinite, v.tolist())):
        return v
    finite = np.isfinite(v)
    return v if finite.all() else v[finite]


def summarize_batch(
    gradtrust: npt.ArrayLike,
    confidence: npt.ArrayLike,
    rule: LowTrustRule,
    trust_prob: npt.ArrayLike | None = None,
) -> BatchSummary:
    """Reduce one batch of per-sample scores to counter increments and histogram values.

    ``trust_prob`` is required when ``rule`` judges TRUST_PROB. Non-finite scores are
    counted (as predictions, and as low trust when they are the judged score) but never
    observed.
    """
    g = _one_per_sample("gradtrust", gradtrust, None)
    p = _one_per_sample("confidence", confidence, g.size)
    q = None if trust_prob is None else _one_per_sample("trust_prob", trust_prob, g.size)
    if rule.score == "trust_prob" and q is None:
        raise InvalidInputError("low trust is judged on TRUST_PROB, but none was passed")
    judged = q if rule.score == "trust_prob" and q is not None else g
    if judged.size <= _SMALL_BATCH:
        # low_trust_mask's rule on Python floats: right after a forward pass each numpy call
        # costs several times its usual time, and one-image batches are the usual case.
        low = sum(1 for v in judged.tolist() if not (math.isfinite(v) and v >= rule.threshold))
    else:
        low = int(np.count_nonzero(low_trust_mask(judged, rule.threshold)))
    return BatchSummary(
        predictions=int(g.size),
        low_trust=low,
        trust_values=_finite(g),
        confidence_values=_finite(p),
        trust_prob_values=None if q is None else _finite(q),
    )


def _load_mmap_dict() -> ModuleType:
    """prometheus-client's ``mmap_dict`` module, without importing its package (see the
    module docstring)."""
    loaded = sys.modules.get("prometheus_client.mmap_dict")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("prometheus_client")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "prometheus-client is not installed, so no gradtrust_* metrics can be written: "
            "pip install 'gradtrust-serve[server]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "mmap_dict.py"
    module_spec = importlib.util.spec_from_file_location("_gradtrust_prometheus_mmap", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot load {path}: reinstall prometheus-client")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _le(edge: float) -> str:
    """An upper edge as prometheus-client writes ``le`` (Python's shortest repr; +Inf)."""
    return "+Inf" if math.isinf(edge) else repr(float(edge))


class _Files:
    """This process's metric files in one directory, one per kind, as prometheus-client
    names them (``counter_<pid>.db``, ``histogram_<pid>.db``, ``gauge_livemax_<pid>.db``).

    Shared by every :class:`TrustMetrics` of the process: two writers of one file would
    each track its length and overwrite each other's entries.
    """

    _lock = threading.Lock()
    _open: dict[str, Any] = {}

    @classmethod
    def get(cls, directory: str, kind: str) -> Any:
        path = os.path.join(directory, f"{kind}_{os.getpid()}.db")
        with cls._lock:
            file = cls._open.get(path)
            if file is None:
                file = cls._open[path] = _load_mmap_dict().MmapedDict(path)
            return file


class _Series:
    """One sample series: its value in this process, mirrored into this process's file.

    Increments are written through at once (16 bytes at a fixed place of a shared memory
    map, which a reader sees whole), so a scrape is current after every batch and a stub
    that dies loses nothing. Without a directory the value stays in memory.
    """

    __slots__ = ("_file", "_key", "value")

    def __init__(self, file: Any, key: str) -> None:
        self._file, self._key = file, key
        self.value = 0.0
        if file is not None:
            with _Files._lock:
                self.value = float(file.read_value(key)[0])  # a reused pid continues

    def inc(self, amount: float) -> None:
        self.set(self.value + amount)

    def set(self, value: float) -> None:
        self.value = value
        if self._file is not None:
            with _Files._lock:
                self._file.write_value(self._key, value, 0.0)


class _Family:
    """Creates the series of one metric family as prometheus-client's classes would."""

    def __init__(
        self, directory: str | None, kind: str, name: str, doc: str, labels: dict[str, str]
    ) -> None:
        self._file = None if directory is None else _Files.get(directory, kind)
        self.name, self.doc, self.labels = name, doc, labels

    def series(self, sample: str, **extra: str) -> _Series:
        labels = {**self.labels, **extra}
        key = json.dumps([self.name, sample, labels, self.doc], sort_keys=True)
        return _Series(self._file, key)


class _Histogram:
    """A classic histogram: one series per bucket (not cumulative: the reader sums them
    and derives ``_count``), and ``_sum``. A batch costs one write per non-empty bucket
    plus one for the sum, however many values it holds."""

    _SMALL = 16  # up to this many values, a Python loop beats numpy's call overhead

    def __init__(
        self,
        directory: str | None,
        name: str,
        doc: str,
        labels: dict[str, str],
        edges: Sequence[float],
    ) -> None:
        family = _Family(directory, "histogram", name, doc, labels)
        self.edges = [float(e) for e in edges]
        self._array = np.asarray(self.edges)
        self.buckets = [family.series(f"{name}_bucket", le=_le(e)) for e in (*self.edges, math.inf)]
        self.sum = family.series(f"{name}_sum")

    def add(self, values: npt.NDArray[np.float64]) -> None:
        """Observe finite values (a NaN would poison ``_sum``: callers drop them)."""
        if values.size == 0:
            return
        if values.size <= self._SMALL:
            listed = values.tolist()
            if len(listed) == 1:  # numpy's sum of one value is that value
                self.add_one(listed[0])
                return
            counts: dict[int, int] = {}
            for v in listed:
                i = bisect.bisect_left(self.edges, v)  # the first edge >= v: le is inclusive
                counts[i] = counts.get(i, 0) + 1
            for i, n in counts.items():
                self.buckets[i].inc(n)
        else:
            per_bucket = np.bincount(
                np.searchsorted(self._array, values, side="left"), minlength=len(self.buckets)
            )
            for i in np.flatnonzero(per_bucket).tolist():
                self.buckets[i].inc(int(per_bucket[i]))
        self.sum.inc(float(values.sum()))

    def add_one(self, value: float) -> None:
        """Observe one finite value without building an array (one-image batches, and
        the per-batch durations, right after a forward pass when numpy calls are slow)."""
        self.buckets[bisect.bisect_left(self.edges, value)].inc(1)
        self.sum.inc(float(value))


def _check_seconds(seconds: float, what: str) -> float:
    value = float(seconds)
    if not (math.isfinite(value) and value >= 0.0):
        raise InvalidInputError(f"{what} must be a finite, non-negative duration, got {seconds!r}")
    return value


class TrustMetrics:
    """The gradtrust_* metrics of one served model instance.

    Create it once in ``initialize``. Each batch updates the metrics directly: in a stub
    started by ``gradtrust serve`` that is a write to this process's memory-mapped files,
    read by the exporter on the next scrape, so the endpoint is current after every batch
    and nothing is lost when the stub dies. ``directory`` defaults to
    ``$PROMETHEUS_MULTIPROC_DIR``; without one (tritonserver started some other way) the
    values stay in this process and a warning says how to export them.
    """

    def __init__(
        self,
        model: str,
        version: str,
        rule: LowTrustRule,
        calibrated: bool,
        directory: str | os.PathLike[str] | None = None,
        heldout_ece: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        self.rule = rule
        self.calibrated = bool(calibrated)
        if rule.score == "trust_prob" and not self.calibrated:
            raise ConfigError("low trust on TRUST_PROB needs a calibrated entry")
        where = directory if directory is not None else os.environ.get(MULTIPROC_ENV)
        self.directory = str(where) if where else None
        if self.directory is not None and not os.path.isdir(self.directory):
            raise ConfigError(
                f"the metrics directory {self.directory} (${MULTIPROC_ENV}) does not exist: "
                "start the server with `gradtrust serve`, which creates it"
            )
        labels = {"model": str(model), "version": str(version)}

        def histogram(name: str, doc: str, edges: Sequence[float]) -> _Histogram:
            return _Histogram(self.directory, name, doc, labels, edges)

        def counter(name: str, doc: str) -> _Series:
            family = _Family(self.directory, "counter", name.removesuffix("_total"), doc, labels)
            return family.series(name)

        self._trust = histogram(
            TRUST,
            "GRADTRUST of each prediction: log of the counterfactual trust, >= 0; "
            "higher = more trust",
            TRUST_BUCKETS,
        )
        self._confidence = histogram(
            CONFIDENCE,
            "Softmax confidence (top-class probability) of each prediction",
            CONFIDENCE_BUCKETS,
        )
        self._trust_prob = (
            histogram(
                TRUST_PROBABILITY,
                "TRUST_PROB of each prediction: calibrated probability that it is correct",
                TRUST_PROBABILITY_BUCKETS,
            )
            if self.calibrated
            else None
        )
        self._trust_seconds = histogram(
            TRUST_SECONDS, "Seconds spent computing trust scores, per batch", SECONDS_BUCKETS
        )
        self._heatmap_seconds = histogram(
            HEATMAP_SECONDS,
            "Seconds spent computing explanation heatmaps, per batch",
            SECONDS_BUCKETS,
        )
        self._predictions = counter(PREDICTIONS, "Predictions served with a trust score")
        self._low_trust = counter(
            LOW_TRUST,
            "Predictions below the model's low-trust threshold (on TRUST_PROB when the "
            "model is calibrated, else on GRADTRUST)",
        )
        self._invalid = counter(INVALID, "Requests rejected as invalid input")
        self._introspective = counter(
            INTROSPECTIVE, "Introspective (second-stage) predictions served on request"
        )
        self._disagreements = counter(
            INTROSPECTIVE_DISAGREEMENTS,
            "Introspective predictions whose class differs from the feed-forward prediction",
        )
        # "live" gauges: the exporter drops a stub's values once the stub is gone, so an
        # unloaded or replaced model stops reporting its old state.
        _Family(
            self.directory,
            "gauge_livemax",
            CALIBRATED,
            "1 if the model serves calibrated trust (TRUST_PROB, low trust judged on it), else 0",
            labels,
        ).series(CALIBRATED).set(1.0 if self.calibrated else 0.0)
        _Family(
            self.directory,
            "gauge_livemax",
            LOW_TRUST_THRESHOLD,
            "Below this value of the score named by 'score' a prediction counts as low trust",
            labels,
        ).series(LOW_TRUST_THRESHOLD, score=rule.score).set(rule.threshold)
        self._export_heldout_ece(model, version, labels, heldout_ece or {})
        if self.directory is None:
            _log.warning(
                "%s v%s: $%s is not set, so the gradtrust_* metrics stay inside this process; "
                "serve with `gradtrust serve` to export them",
                model,
                version,
                MULTIPROC_ENV,
            )

    def _export_heldout_ece(
        self,
        model: str,
        version: str,
        labels: dict[str, str],
        heldout_ece: Mapping[str, Mapping[str, float]],
    ) -> None:
        """The calibration's held-out ECE per part, and a warning for every part where
        TRUST_PROB was less calibrated than CONFIDENCE (calibrate said so; the people who
        read the log and the dashboards must hear it too)."""
        if not heldout_ece:
            return
        family = _Family(
            self.directory,
            "gauge_livemax",
            HELDOUT_ECE,
            "ECE of TRUST_PROB and of CONFIDENCE on each held-out part of the calibration "
            "data (lower = better calibrated)",
            labels,
        )
        for part, ece in heldout_ece.items():
            family.series(HELDOUT_ECE, part=part, output=contract.TRUST_PROB).set(ece["trust_prob"])
            family.series(HELDOUT_ECE, part=part, output=contract.CONFIDENCE).set(ece["confidence"])
            if softmax_was_better(ece):
                _log.warning(
                    "%s v%s: at calibration, TRUST_PROB was less calibrated than CONFIDENCE on "
                    "%s held-out data (ECE %.4f against %.4f): on that kind of traffic read "
                    "CONFIDENCE as the probability, or re-run `gradtrust calibrate` on data "
                    "that looks like it",
                    model,
                    version,
                    part,
                    ece["trust_prob"],
                    ece["confidence"],
                )

    @property
    def exported(self) -> bool:
        """Whether the metrics reach the exporter (a metrics directory is set)."""
        return self.directory is not None

    @property
    def predictions(self) -> int:
        """Predictions this instance counted (in this process)."""
        return int(self._predictions.value)

    def observe_batch(
        self,
        gradtrust: npt.ArrayLike,
        confidence: npt.ArrayLike,
        trust_seconds: float,
        trust_prob: npt.ArrayLike | None = None,
    ) -> BatchSummary:
        """Record the scores of one batch and the seconds spent computing its trust.

        ``trust_prob`` (one per prediction) is needed when the model is calibrated. An
        empty batch records nothing. Returns what was recorded.
        """
        seconds = _check_seconds(trust_seconds, "trust_seconds")
        if np.size(gradtrust) == 0:  # every request of the batch was rejected
            empty = np.empty(0)
            return BatchSummary(0, 0, empty, empty, None)
        if self.calibrated and trust_prob is None:
            raise InvalidInputError("a calibrated model's metrics need TRUST_PROB per prediction")
        summary = summarize_batch(
            gradtrust, confidence, self.rule, trust_prob if self.calibrated else None
        )
        if summary.predictions == 0:
            return summary
        self._trust.add(summary.trust_values)
        self._confidence.add(summary.confidence_values)
        if self._trust_prob is not None and summary.trust_prob_values is not None:
            self._trust_prob.add(summary.trust_prob_values)
        self._trust_seconds.add_one(seconds)
        if summary.low_trust:
            self._low_trust.inc(summary.low_trust)
        # Last: a scrape between these writes sees predictions_total <= each _count.
        self._predictions.inc(summary.predictions)
        return summary

    def observe_heatmap(self, seconds: float) -> None:
        """Record the seconds spent computing the heatmaps of one batch."""
        self._heatmap_seconds.add_one(_check_seconds(seconds, "heatmap seconds"))

    def count_invalid(self, n: int = 1) -> None:
        """Count ``n`` requests rejected as invalid input."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InvalidInputError(f"count_invalid needs a non-negative integer, got {n!r}")
        if n:
            self._invalid.inc(int(n))

    def count_introspection(self, predictions: int, disagreements: int) -> None:
        """Count one batch's introspective predictions and how many disagree with the
        feed-forward class (two writes per batch that asked for introspection)."""
        if not 0 <= disagreements <= predictions:
            raise InvalidInputError(
                f"disagreements ({disagreements}) must lie in 0..predictions ({predictions})"
            )
        if disagreements:
            self._disagreements.inc(int(disagreements))
        if predictions:  # last, as in observe_batch: a scrape never sees more disagreements
            self._introspective.inc(int(predictions))


def low_trust_rule(calibration: TrustCalibration | None, config_threshold: float) -> LowTrustRule:
    """The rule a served entry counts low trust by: TRUST_PROB below the calibration's
    threshold when the entry is calibrated, else GRADTRUST below the config parameter
    ``low_trust_threshold`` (which then has the model's own, uncalibrated scale)."""
    if calibration is None:
        return LowTrustRule("gradtrust", float(config_threshold))
    return LowTrustRule("trust_prob", float(calibration.low_trust_threshold))
