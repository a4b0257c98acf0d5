"""One batch of requests in, one answer (outputs or an error) per request out.

This is the whole serving logic, free of Triton: the Python backend only converts tensors
(:mod:`gradtrust.triton_model`). Requests that Triton's dynamic batcher put together are
validated one by one, the valid ones go through the network in a single forward pass,
the scores are computed for the whole batch at once (each per sample), and a bad request
gets its own error without costing the others their answers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from gradtrust import heatmaps, scores
from gradtrust.bls import BlsClassifier
from gradtrust.config import ModelSettings, RequestOptions
from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.evaluation.calibration import TrustCalibration
from gradtrust.preprocess import spatial_size
from gradtrust.runtime import ACTIVATION, FEATURES, LOGITS, OnnxClassifier

# Output tensor names, as in config.pbtxt.
LABEL = "LABEL"
CLASS_ID = "CLASS_ID"
CONFIDENCE = "CONFIDENCE"
GRADTRUST = "GRADTRUST"
SCORES = "SCORES"
HEATMAP = "HEATMAP"
HEATMAP_STATS = "HEATMAP_STATS"
TRUST_PROB = "TRUST_PROB"

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class ScoringRequest:
    images: np.ndarray
    options: RequestOptions


@dataclass
class BatchResult:
    """Per-request answers plus what the metrics need (valid samples only)."""

    answers: list[Outputs | InvalidInputError]
    gradtrust: np.ndarray = field(default_factory=lambda: np.empty(0))
    confidence: np.ndarray = field(default_factory=lambda: np.empty(0))
    trust_seconds: float = 0.0
    heatmap_seconds: float | None = None


class TrustService:
    """Scores batches of images with a classifier in :mod:`gradtrust.runtime`'s convention."""

    def __init__(
        self,
        classifier: OnnxClassifier | BlsClassifier,
        settings: ModelSettings,
        layout: str = "NCHW",
        calibration: TrustCalibration | None = None,
    ) -> None:
        if classifier.num_classes != len(settings.labels):
            raise ConfigError(
                f"the labels file lists {len(settings.labels)} classes but the model has "
                f"{classifier.num_classes} logits: fix labels.txt (one label per line)"
            )
        if "gradnorm" in settings.scores and not classifier.has_features:
            raise ConfigError(
                "config parameter 'scores' includes gradnorm, which needs a 'features' output "
                "the model does not have: remove it or re-export with `gradtrust prepare`"
            )
        self.classifier = classifier
        self.settings = settings
        self.layout = layout  # NCHW or NHWC: where the heatmap size is in IMAGE
        self.calibration = calibration  # GradTrust -> P(correct), from `gradtrust calibrate`
        self.head_weight = classifier.head_weight() if classifier.has_activation else None
        self._label_bytes = np.array([[label.encode()] for label in settings.labels], dtype=object)

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def check_request_size(self, shape: Sequence[int], itemsize: int) -> None:
        """Reject an oversized IMAGE from its shape alone, before any pixel is read.

        Triton has already capped the batch at max_batch_size and checked the dims it
        knows; this bounds the bytes of one request and the pixels of one image, which
        matters for variable-size inputs (config parameters max_request_bytes and
        max_image_pixels).
        """
        dims = [int(d) for d in shape]
        if any(d < 0 for d in dims):
            raise InvalidInputError(f"IMAGE has a negative dimension in its shape {dims}")
        nbytes = int(np.prod(dims, dtype=np.float64)) * int(itemsize)
        limit = self.settings.max_request_bytes
        if nbytes > limit:
            raise InvalidInputError(
                f"IMAGE of shape {dims} holds {nbytes} bytes, over this model's limit of "
                f"{limit} bytes per request (config parameter max_request_bytes): "
                "send fewer or smaller images per request"
            )
        if len(dims) == 4:
            height, width = spatial_size(dims, self.layout)
            if height * width > self.settings.max_image_pixels:
                raise InvalidInputError(
                    f"IMAGE images are {height}x{width} = {height * width} pixels, over this "
                    f"model's limit of {self.settings.max_image_pixels} (config parameter "
                    "max_image_pixels): downscale them"
                )

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """Reject what the forward pass must not see; Triton has already checked shape and dtype."""
        if not isinstance(images, np.ndarray) or images.dtype.kind not in "fiu":
            kind = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise InvalidInputError(f"IMAGE has element type {kind}; send real-valued pixels")
        self.check_request_size(images.shape, images.dtype.itemsize)
        expected = self.classifier.input_shape
        if images.ndim != len(expected) + 1 or any(
            isinstance(e, int) and e != s for e, s in zip(expected, images.shape[1:], strict=True)
        ):
            raise InvalidInputError(
                f"IMAGE has shape {list(images.shape)}; "
                f"expected [batch, {', '.join(map(str, expected))}]"
            )
        if images.shape[0] == 0:
            raise InvalidInputError("IMAGE holds an empty batch: send at least one image")
        # Two reductions per sample instead of isfinite + two comparisons over every pixel:
        # min/max propagate NaN, and +-inf shows up as a non-finite extreme.
        flat = images.reshape(images.shape[0], -1)
        low, high = flat.min(axis=1), flat.max(axis=1)
        bad = ~(np.isfinite(low) & np.isfinite(high))
        if bad.any():
            raise InvalidInputError(
                f"IMAGE has NaN or Inf pixels in sample(s) {np.flatnonzero(bad).tolist()}: "
                "send finite pixel values"
            )
        if images.dtype.kind == "f" and images.dtype.itemsize > 4:
            big = float(np.finfo(np.float32).max)
            over = (low < -big) | (high > big)
            if over.any():
                raise InvalidInputError(
                    f"IMAGE pixels in sample(s) {np.flatnonzero(over).tolist()} exceed the "
                    "float32 range the model computes in: send finite FP32 pixel values"
                )
        lo, hi = self.settings.pixel_min, self.settings.pixel_max
        if lo is not None and hi is not None:
            out = (low < lo) | (high > hi)
            if out.any():
                raise InvalidInputError(
                    f"IMAGE pixels outside [{lo:g}, {hi:g}] in sample(s) "
                    f"{np.flatnonzero(out).tolist()}: "
                    f"scale pixels to [{lo:g}, {hi:g}] (e.g. divide 8-bit values by 255)"
                )
        return images

    def _check_options(self, options: RequestOptions) -> None:
        if options.heatmap_method is not None and self.head_weight is None:
            raise InvalidInputError(
                "this model cannot produce a HEATMAP: its ONNX file has no 'activation' output "
                "(the last conv activation before global average pooling); re-export it with "
                "`gradtrust prepare`, or do not request HEATMAP"
            )
        if options.scores and "gradnorm" in options.scores and not self.classifier.has_features:
            raise InvalidInputError(
                "score gradnorm needs the model's 'features' output, which it lacks"
            )

    def run(self, requests: Sequence[ScoringRequest]) -> BatchResult:
        answers: list[Outputs | InvalidInputError | None] = [None] * len(requests)
        accepted: list[int] = []
        for i, request in enumerate(requests):
            try:
                self.check_images(request.images)
                self._check_options(request.options)
                accepted.append(i)
            except InvalidInputError as err:
                answers[i] = err
        result = BatchResult(answers=[])
        if accepted:
            self._score(requests, accepted, answers, result)
        result.answers = [
            a if a is not None else InvalidInputError("not answered") for a in answers
        ]
        return result

    def _score_tables(
        self,
        requests: Sequence[ScoringRequest],
        accepted: list[int],
        offsets: np.ndarray,
        finite: np.ndarray,
        logits: np.ndarray,
        features: np.ndarray | None,
    ) -> dict[tuple[tuple[str, ...], int], np.ndarray | InvalidInputError]:
        """SCORES for all requests that ask for the same scores and k, in one call per group
        rather than one per request; a group that cannot be scored gets its error."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for n, i in enumerate(accepted):
            options = requests[i].options
            lo, hi = int(offsets[n]), int(offsets[n + 1])
            if options.scores and finite[lo:hi].all():
                groups.setdefault((options.scores, options.contrast_k), []).extend(range(lo, hi))
        tables: dict[tuple[tuple[str, ...], int], np.ndarray | InvalidInputError] = {}
        for (names, k), rows in groups.items():
            idx = np.asarray(rows)
            try:
                values = scores.compute_scores(
                    logits[idx],
                    names,
                    features=None if features is None else features[idx],
                    contrast_k=k,
                )
            except InvalidInputError as err:
                tables[(names, k)] = err
                continue
            table = np.zeros((len(logits), len(names)), dtype=np.float32)
            table[idx] = _to_float32(np.stack([values[name] for name in names], axis=1))
            tables[(names, k)] = table
        return tables

    def _score(
        self,
        requests: Sequence[ScoringRequest],
        accepted: list[int],
        answers: list[Outputs | InvalidInputError | None],
        result: BatchResult,
    ) -> None:
        wanted = [LOGITS]
        if self.classifier.has_features:
            wanted.append(FEATURES)
        if any(requests[i].options.heatmap_method for i in accepted):
            wanted.append(ACTIVATION)
        images = np.concatenate([requests[i].images for i in accepted], axis=0)
        net = self.classifier.run(images, wanted)
        logits = net[LOGITS].astype(np.float64)
        features = net[FEATURES].astype(np.float64) if FEATURES in net else None

        start = time.perf_counter()
        finite = np.isfinite(logits).all(axis=1)
        if features is not None:
            finite &= np.isfinite(features).all(axis=1)
        trust = np.full(len(logits), np.nan)
        conf = np.full(len(logits), np.nan)
        pred = np.zeros(len(logits), dtype=np.int64)
        if finite.any():
            ok = logits[finite]
            trust[finite] = scores.gradtrust(ok)
            conf[finite] = scores.msp(ok)
            pred[finite] = scores.predicted_class(ok)
        offsets = np.cumsum([0] + [len(requests[i].images) for i in accepted])
        tables = self._score_tables(requests, accepted, offsets, finite, logits, features)
        heatmap_seconds = 0.0
        for n, i in enumerate(accepted):
            rows = slice(int(offsets[n]), int(offsets[n + 1]))
            options = requests[i].options
            if not finite[rows].all():
                bad = np.flatnonzero(~finite[rows]).tolist()
                answers[i] = InvalidInputError(
                    f"the model produced non-finite logits or features for sample(s) {bad}; "
                    "check the input preprocessing"
                )
                continue
            try:
                outputs: Outputs = {
                    LABEL: self._label_bytes[pred[rows]],
                    CLASS_ID: pred[rows].reshape(-1, 1),
                    CONFIDENCE: conf[rows].astype(np.float32).reshape(-1, 1),
                    GRADTRUST: trust[rows].astype(np.float32).reshape(-1, 1),
                }
                if self.calibration is not None:
                    prob = self.calibration.apply(trust[rows])
                    outputs[TRUST_PROB] = prob.astype(np.float32).reshape(-1, 1)
                if options.scores:
                    table = tables[(options.scores, options.contrast_k)]
                    if isinstance(table, InvalidInputError):
                        raise table
                    outputs[SCORES] = table[rows]
                if options.heatmap_method:
                    t0 = time.perf_counter()
                    maps, stats = heatmaps.explain(
                        options.heatmap_method,
                        net[ACTIVATION][rows].astype(np.float64),
                        cast(np.ndarray, self.head_weight),  # not None: _check_options
                        logits[rows],
                        size=spatial_size(requests[i].images.shape, self.layout),
                        contrast_class=options.contrast_class,
                    )
                    heatmap_seconds += time.perf_counter() - t0
                    outputs[HEATMAP] = maps.astype(np.float32)
                    if stats is not None:
                        outputs[HEATMAP_STATS] = stats.astype(np.float32)
                answers[i] = outputs
            except InvalidInputError as err:
                answers[i] = err
        result.trust_seconds = time.perf_counter() - start - heatmap_seconds
        result.heatmap_seconds = heatmap_seconds if ACTIVATION in wanted else None
        ok_rows = np.zeros(len(logits), dtype=bool)
        for n, i in enumerate(accepted):
            if isinstance(answers[i], dict):
                ok_rows[int(offsets[n]) : int(offsets[n + 1])] = True
        result.gradtrust = trust[ok_rows]
        result.confidence = conf[ok_rows]


def _to_float32(values: np.ndarray) -> np.ndarray:
    """Saturate at float32's range instead of overflowing to inf (contrast_trust can be huge)."""
    big = np.finfo(np.float32).max
    return np.clip(values, -big, big).astype(np.float32)
