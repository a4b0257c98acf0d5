"""One batch of requests in, one answer (outputs or an error) per request out.

This is the whole serving logic, free of Triton: the Python backend only converts tensors
(:mod:`gradtrust.triton.model`). Requests that Triton's dynamic batcher put together are
validated, the valid ones go through the network in a single forward pass, the scores
are computed for the whole batch at once (each per sample), and a bad request gets its
own error without costing the others their answers.

The dynamic batcher sends many one-image requests, so what is done per request is kept
to slicing: pixel checks, casts and output columns are computed once per batch, heatmaps
once per method and map size (:meth:`TrustService._explain`: the head is then read once,
not once per request), and only the outputs a request names (and the network outputs some
request needs) are computed.
A small batch whose requests want only the cheap outputs is the exception: it is scored
one sample at a time on Python numbers (:meth:`TrustService._answer_plain`, the same
values bit for bit), because right after a forward pass every numpy call costs several
times its usual time and one image has too little arithmetic to pay for dozens of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import cast

import numpy as np

from gradtrust.core import heatmaps, scores
from gradtrust.core.calibration import TrustCalibration
from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.checks import ImageChecks, join_images
from gradtrust.serving.classifier import Classifier
from gradtrust.serving.contract import (
    ACTIVATION,
    CLASS_ID,
    CONFIDENCE,
    DEFAULT_OUTPUTS,
    FEATURES,
    GRADTRUST,
    HEATMAP,
    HEATMAP_SIZE_ACTIVATION,
    HEATMAP_STATS,
    INTROSPECTIVE_AGREES,
    INTROSPECTIVE_CLASS_ID,
    INTROSPECTIVE_CONFIDENCE,
    INTROSPECTIVE_LABEL,
    INTROSPECTIVE_OUTPUTS,
    LABEL,
    LOGITS,
    SCORES,
    TRUST_PROB,
)
from gradtrust.serving.decoding import spatial_size
from gradtrust.serving.introspector import Introspector
from gradtrust.serving.settings import ModelSettings, RequestOptions

Outputs = dict[str, np.ndarray]
_FLOAT32 = np.dtype(np.float32)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_EMPTY = np.empty(0)  # what a batch with no answered sample records (read-only, shared)
_EMPTY.flags.writeable = False
#: Batches of at most this many samples are scored one sample at a time
#: (:meth:`TrustService._answer_plain`); bigger ones in one vectorised pass.
_PER_SAMPLE_MAX = 8
#: One request's HEATMAP (n, H, W) and, for VOICE, HEATMAP_STATS (n, 2), float32.
_Explanation = tuple[np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class ScoringRequest:
    """One client request: its images, its options and the outputs it named."""

    images: np.ndarray
    options: RequestOptions
    #: The outputs the client named: only those are computed and returned. None (it named
    #: none): :data:`DEFAULT_OUTPUTS`, plus SCORES and HEATMAP as ``options`` say.
    outputs: frozenset[str] | None = None

    def wants(self, name: str) -> bool:
        return self.outputs is None or name in self.outputs


@dataclass
class BatchResult:
    """Per-request answers plus what the metrics need (valid samples only)."""

    answers: list[Outputs | InvalidInputError]
    gradtrust: np.ndarray = field(default_factory=lambda: _EMPTY)
    confidence: np.ndarray = field(default_factory=lambda: _EMPTY)
    trust_seconds: float = 0.0
    heatmap_seconds: float | None = None
    #: TRUST_PROB of the same samples when the entry is calibrated (the metrics need it
    #: for every prediction, whether or not a request asked for it), else None.
    trust_prob: np.ndarray | None = None
    #: Introspective predictions computed for this batch, and how many of them differ
    #: from the feed-forward class (the shift signal of gradtrust_introspective_*).
    introspective: int = 0
    introspective_disagreements: int = 0


class TrustService:
    """Scores batches of images with any :class:`~gradtrust.serving.classifier.Classifier`."""

    def __init__(
        self,
        classifier: Classifier,
        settings: ModelSettings,
        layout: str = "NCHW",
        calibration: TrustCalibration | None = None,
        introspector: Introspector | None = None,
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
        if calibration is not None and calibration.needs_features and not classifier.has_features:
            raise ConfigError(
                "trust_calibration.json computes TRUST_PROB from "
                f"{list(calibration.signal.inputs)}, which need a 'features' output this "
                "model does not have: re-run "
                "`gradtrust calibrate` for this entry"
            )
        if introspector is not None and not classifier.has_features:
            raise ConfigError(
                "the entry has an introspective network, which needs the model's 'features' "
                "output, but its ONNX file has none: re-export it with `gradtrust prepare`"
            )
        self.classifier = classifier
        self.settings = settings
        #: The second stage (INTROSPECTIVE_* outputs, on request), from `gradtrust introspect`.
        self.introspector = introspector
        self.calibration = calibration  # TRUST_PROB from logits (and h): `gradtrust calibrate`
        # The head weight as the maps use it (float64, checked), once per model, not per request.
        self.head = (
            heatmaps.Head.from_weight(classifier.head_weight())
            if classifier.has_activation
            else None
        )
        self._label_bytes = np.array([[label.encode()] for label in settings.labels], dtype=object)
        # Read-only: one-image answers hand out (1, 1) views of these rather than copies.
        self._label_bytes.flags.writeable = False
        self._class_ids = np.arange(len(settings.labels), dtype=np.int64).reshape(-1, 1)
        self._class_ids.flags.writeable = False
        self.checks = ImageChecks(settings, classifier.input_shape, layout)

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def _check_options(self, options: RequestOptions, images: int) -> None:
        if options.heatmap_method is not None and self.head is None:
            raise InvalidInputError(
                "this model cannot produce a HEATMAP: its ONNX file has no 'activation' output "
                "(the last conv activation before global average pooling); re-export it with "
                "`gradtrust prepare`, or do not request HEATMAP"
            )
        if _needs_features(options) and not self.classifier.has_features:
            raise InvalidInputError(
                "score gradnorm needs the model's 'features' output, which it lacks"
            )
        cap = self.settings.max_voice_images
        if options.heatmap_method == "voice" and images > cap:
            raise InvalidInputError(
                f"heatmap_method=voice is limited to {cap} image(s) per request by the model's "
                f"config parameter 'max_voice_images' (VOICE explains against every class); "
                f"this request has {images}: split it into requests of at most {cap} image(s)"
                if cap
                else "heatmap_method=voice is turned off for this model (config parameter "
                "'max_voice_images' is 0): ask for another heatmap_method"
            )

    def run(self, requests: Sequence[ScoringRequest]) -> BatchResult:
        """One answer per request, in order: its outputs, or the error that is its own."""
        answers: list[Outputs | InvalidInputError | None] = [None] * len(requests)
        shaped: list[int] = []
        for i, request in enumerate(requests):
            try:
                self.checks.check_layout(request.images)
                shaped.append(i)
            except InvalidInputError as err:
                answers[i] = err
        result = BatchResult(answers=[])
        if shaped:
            accepted, images = self._accept(requests, shaped, answers)
            if accepted:
                self._score([requests[i] for i in accepted], accepted, images, answers, result)
        result.answers = [
            a if a is not None else InvalidInputError("not answered") for a in answers
        ]
        return result

    def _accept(
        self,
        requests: Sequence[ScoringRequest],
        shaped: list[int],
        answers: list[Outputs | InvalidInputError | None],
    ) -> tuple[list[int], np.ndarray]:
        """Pixel checks, then options, of well-shaped requests; returns the accepted ones and
        their images in one array."""
        problems, images = self.checks.screen([requests[i].images for i in shaped])
        accepted: list[int] = []
        for i, problem in zip(shaped, problems, strict=True):
            try:
                if problem is not None:
                    raise problem
                self._check_options(requests[i].options, len(requests[i].images))
                if self.introspector is None and _wants_introspection(requests[i]):
                    raise InvalidInputError(
                        "this model has no introspective network, so no INTROSPECTIVE_* "
                        "outputs: train one with `gradtrust introspect` (it writes "
                        "introspection.onnx into the entry), then reload the model"
                    )
                accepted.append(i)
            except InvalidInputError as err:
                answers[i] = err
        if accepted and (images is None or len(accepted) < len(shaped)):
            images = join_images([requests[i].images for i in accepted])
        return accepted, cast(np.ndarray, images)

    def _score(
        self,
        chosen: list[ScoringRequest],
        accepted: list[int],
        images: np.ndarray,
        answers: list[Outputs | InvalidInputError | None],
        result: BatchResult,
    ) -> None:
        """Forward pass and scores of the accepted requests (``chosen``, at ``accepted``)."""
        net: dict[str, np.ndarray] | None = None
        if self.calibration is None and all(map(_is_plain, chosen)):
            net = self.classifier.run(images, [LOGITS])
            if self._answer_plain(chosen, accepted, net[LOGITS], answers, result):
                return
        introspect = [_wants_introspection(r) for r in chosen]
        needs_features = [_needs_features(r.options) or _wants_introspection(r) for r in chosen]
        wanted = [LOGITS]
        calibration_needs_features = (
            self.calibration is not None and self.calibration.needs_features
        )
        if any(needs_features) or calibration_needs_features:
            wanted.append(FEATURES)
        if any(r.options.heatmap_method for r in chosen):
            wanted.append(ACTIVATION)
        if net is None:  # (else it ran above with [LOGITS], which is all ``wanted`` names then)
            net = self.classifier.run(images, wanted)
        logits = net[LOGITS].astype(np.float64)
        features = net[FEATURES].astype(np.float64) if FEATURES in wanted else None

        start = time.perf_counter()
        sizes = [len(r.images) for r in chosen]
        bounds = list(accumulate(sizes, initial=0))
        finite = np.isfinite(logits).all(axis=1)
        # float32 (or narrower) logits: no difference of two overflows float64.
        spans_fit = net[LOGITS].dtype.kind == "f" and net[LOGITS].dtype.itemsize <= 4
        trust, conf, pred = _base_scores(logits, finite, spans_fit)
        prob = self._trust_prob(logits, features, finite, trust, conf)
        failed = _non_finite(needs_features, bounds, finite, features)
        tables = self._score_tables(chosen, sizes, failed, logits, features)
        kinds = {r.outputs for n, r in enumerate(chosen) if n not in failed}
        picks = self._columns(kinds, trust, conf, pred, prob)
        second = self._introspect(introspect, sizes, failed, logits, features, pred, result)
        explained, heatmap_seconds = self._explain(chosen, bounds, failed, net, logits)
        answered = [False] * len(chosen)
        for n, request in enumerate(chosen):
            i = accepted[n]
            if n in failed:
                answers[i] = failed[n]
                continue
            rows = slice(bounds[n], bounds[n + 1])
            options = request.options
            outputs: Outputs = {name: column[rows] for name, column in picks[request.outputs]}
            if introspect[n]:
                outputs.update(
                    (name, column[rows]) for name, column in second if request.wants(name)
                )
            try:
                if options.scores:
                    table = tables[(options.scores, options.contrast_k)]
                    if isinstance(table, InvalidInputError):
                        raise table
                    if request.wants(SCORES):
                        outputs[SCORES] = table[rows]
                if options.heatmap_method:
                    explanation = explained[n]
                    if isinstance(explanation, InvalidInputError):
                        raise explanation
                    maps, stats = explanation
                    if request.wants(HEATMAP):
                        outputs[HEATMAP] = maps
                    if stats is not None and request.wants(HEATMAP_STATS):
                        outputs[HEATMAP_STATS] = stats
                answers[i] = outputs
                answered[n] = True
            except InvalidInputError as err:
                answers[i] = err
        result.trust_seconds = time.perf_counter() - start - heatmap_seconds
        result.heatmap_seconds = heatmap_seconds if ACTIVATION in wanted else None
        # The metrics count the answered samples only.
        kept: slice | np.ndarray = (
            slice(None) if all(answered) else np.repeat(np.asarray(answered), sizes)
        )
        result.gradtrust, result.confidence = trust[kept], conf[kept]
        if prob is not None:
            result.trust_prob = prob[kept]

    def _answer_plain(
        self,
        chosen: list[ScoringRequest],
        accepted: list[int],
        logits: np.ndarray,
        answers: list[Outputs | InvalidInputError | None],
        result: BatchResult,
    ) -> bool:
        """Answer a small batch of requests that want only the cheap outputs of an
        uncalibrated model, one sample at a time on Python numbers; False (nothing done)
        when the batch is not one (the general path then answers it).

        The values are bit for bit those of the general path (``scores.compute_scores``,
        ``_columns``), with a handful of numpy calls per sample instead of several dozen
        per batch: right after a forward pass each numpy call costs several times its
        usual time, and the dynamic batcher's usual batch is one or a few images.
        """
        n = len(logits)
        if logits.dtype != _FLOAT32 or logits.ndim != 2 or logits.shape[1] < 2:
            return False
        if not 0 < n <= _PER_SAMPLE_MAX:
            return False
        start = time.perf_counter()
        samples = [scores.gradtrust_msp_of_sample(logits[i : i + 1]) for i in range(n)]
        answered: list[tuple[float, float, int]] = []
        first = 0
        for request, i in zip(chosen, accepted, strict=True):
            rows = samples[first : first + len(request.images)]
            first += len(rows)
            if None in rows:
                bad = [j for j, row in enumerate(rows) if row is None]
                answers[i] = InvalidInputError(
                    f"the model produced non-finite logits or features for sample(s) {bad}; "
                    "check the input preprocessing"
                )
                continue
            done = cast(list[tuple[float, float, int]], rows)
            answers[i] = self._plain_outputs(request, done)
            answered += done
        if answered:  # the metrics count the answered samples only
            both = np.array([[row[0] for row in answered], [row[1] for row in answered]])
            result.gradtrust, result.confidence = both  # two contiguous rows, one call
        result.trust_seconds = time.perf_counter() - start
        return True

    def _plain_outputs(
        self, request: ScoringRequest, rows: list[tuple[float, float, int]]
    ) -> Outputs:
        """The cheap outputs a request names, from its samples' (gradtrust, msp, class):
        the same arrays as ``_columns`` gives (GRADTRUST saturates at float32's maximum;
        it is never negative), the label and class of one image as read-only views."""
        wanted = DEFAULT_OUTPUTS if request.outputs is None else request.outputs
        outputs: Outputs = {}
        preds = [row[2] for row in rows]
        # One image (the usual request): a (1, 1) view of the tables; more: the rows named.
        index = slice(preds[0], preds[0] + 1) if len(preds) == 1 else preds
        if LABEL in wanted:
            outputs[LABEL] = self._label_bytes[index]
        if CLASS_ID in wanted:
            outputs[CLASS_ID] = self._class_ids[index]
        if CONFIDENCE in wanted:
            outputs[CONFIDENCE] = np.array([[row[1]] for row in rows], dtype=np.float32)
        if GRADTRUST in wanted:
            outputs[GRADTRUST] = np.array(
                [[min(row[0], _FLOAT32_MAX)] for row in rows], dtype=np.float32
            )
        return outputs

    def _score_tables(
        self,
        chosen: list[ScoringRequest],
        sizes: list[int],
        failed: dict[int, InvalidInputError],
        logits: np.ndarray,
        features: np.ndarray | None,
    ) -> dict[tuple[tuple[str, ...], int], np.ndarray | InvalidInputError]:
        """SCORES for all requests that ask for the same scores and k, in one call per group
        rather than one per request; a group that cannot be scored gets its error."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for n, request in enumerate(chosen):
            options = request.options
            if options.scores and n not in failed:
                groups.setdefault((options.scores, options.contrast_k), []).append(n)
        tables: dict[tuple[tuple[str, ...], int], np.ndarray | InvalidInputError] = {}
        for (names, k), members in groups.items():
            every = len(members) == len(chosen)  # the usual case: no row selection
            rows: slice | np.ndarray = slice(None)
            if not every:
                member = np.zeros(len(chosen), dtype=bool)
                member[members] = True
                rows = np.repeat(member, sizes)
            try:
                values = scores.compute_scores(
                    logits[rows],
                    names,
                    features=None if features is None else features[rows],
                    contrast_k=k,
                )
            except InvalidInputError as err:
                tables[(names, k)] = err
                continue
            stacked = _to_float32(np.stack([values[name] for name in names], axis=1))
            if every:
                tables[(names, k)] = stacked
            else:
                table = np.zeros((len(logits), len(names)), dtype=np.float32)
                table[rows] = stacked
                tables[(names, k)] = table
        return tables

    def _explain(
        self,
        chosen: list[ScoringRequest],
        bounds: list[int],
        failed: dict[int, InvalidInputError],
        net: dict[str, np.ndarray],
        logits: np.ndarray,
    ) -> tuple[dict[int, _Explanation | InvalidInputError], float]:
        """HEATMAP (and HEATMAP_STATS) of every request that asked for one, by position,
        float32 as they are sent, and the seconds spent on them; request ``n``'s rows are
        ``bounds[n]:bounds[n + 1]``.

        Requests with the same method and map size are explained in one
        :func:`heatmaps.explain` call: contrast's ``p W`` and VOICE's product with every
        class's weight then read the head once for the group instead of once per request
        (the dynamic batcher's one-image requests would otherwise share nothing). Maps are
        per sample, so a request gets the same maps as alone (VOICE's float32 product up
        to rounding, see the heatmaps module's docstring). A group that fails (say, one
        image's activation overflows VOICE's float32 product) is explained again one
        request at a time, so only the request at fault gets the error.
        """
        groups: dict[tuple[str, tuple[int, int] | None], list[int]] = {}
        for n, request in enumerate(chosen):
            method = request.options.heatmap_method
            if method and n not in failed:
                size = (
                    None
                    if request.options.heatmap_size == HEATMAP_SIZE_ACTIVATION
                    else spatial_size(request.images.shape, self.checks.layout)
                )
                groups.setdefault((method, size), []).append(n)
        if not groups:
            return {}, 0.0
        start = time.perf_counter()
        explained: dict[int, _Explanation | InvalidInputError] = {}
        for (method, size), members in groups.items():
            if len(members) > 1:
                try:
                    done = self._explain_rows(method, size, members, chosen, bounds, net, logits)
                except InvalidInputError:
                    pass  # one request at a time below: each gets its own answer or error
                else:
                    explained.update(done)
                    continue
            for n in members:
                try:
                    explained.update(
                        self._explain_rows(method, size, [n], chosen, bounds, net, logits)
                    )
                except InvalidInputError as err:
                    explained[n] = err
        return explained, time.perf_counter() - start

    def _explain_rows(
        self,
        method: str,
        size: tuple[int, int] | None,
        members: list[int],
        chosen: list[ScoringRequest],
        bounds: list[int],
        net: dict[str, np.ndarray],
        logits: np.ndarray,
    ) -> dict[int, _Explanation]:
        """One :func:`heatmaps.explain` call over the samples of ``members`` (positions in
        ``chosen``), split back into each request's (maps, stats), float32."""
        spans = [(bounds[n], bounds[n + 1]) for n in members]
        starts = _starts(spans)  # where each request's rows begin in the group's outputs
        if all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)):
            rows: slice | np.ndarray = slice(spans[0][0], spans[-1][1])  # no copy
        else:
            rows = np.concatenate([np.arange(lo, hi) for lo, hi in spans])
        contrast_class: np.ndarray | int | None = None
        named = [chosen[n].options.contrast_class for n in members]
        if method == "contrast" and any(q is not None for q in named):
            if len(members) == 1:
                contrast_class = named[0]
            else:  # the default Q where a request named none, its class where it did
                contrast_class = heatmaps.contrast_targets(logits[rows])
                for (lo, hi), q, first in zip(spans, named, starts, strict=True):
                    if q is not None:
                        contrast_class[first : first + hi - lo] = q
        maps, stats = heatmaps.explain(
            method,
            net[ACTIVATION][rows],  # in its own precision: heatmaps docstring
            cast(heatmaps.Head, self.head),  # not None: _check_options
            logits[rows],
            size=size,
            contrast_class=contrast_class,
        )
        maps32 = maps.astype(np.float32)
        stats32 = None if stats is None else stats.astype(np.float32)
        out: dict[int, _Explanation] = {}
        for n, (lo, hi), first in zip(members, spans, starts, strict=True):
            part = slice(first, first + hi - lo)
            out[n] = (maps32[part], None if stats32 is None else stats32[part])
        return out

    def _introspect(
        self,
        introspect: list[bool],
        sizes: list[int],
        failed: dict[int, InvalidInputError],
        logits: np.ndarray,
        features: np.ndarray | None,
        pred: np.ndarray,
        result: BatchResult,
    ) -> list[tuple[str, np.ndarray]]:
        """The INTROSPECTIVE_* columns (N, 1) of the batch, computed only on the rows of
        requests that named one of them (others' rows stay 0); nothing when none did."""
        if not any(introspect) or self.introspector is None or features is None:
            return []  # the usual case, decided without building any array
        member = np.array(introspect)
        member[list(failed)] = False
        if not member.any():
            return []
        rows = np.repeat(member, sizes)
        second = self.introspector.predict(logits[rows], features[rows])
        agrees = second.class_id == pred[rows]
        result.introspective = int(rows.sum())
        result.introspective_disagreements = int((~agrees).sum())
        n = len(logits)
        cls = np.zeros((n, 1), np.int64)
        conf = np.zeros((n, 1), np.float32)
        agree = np.zeros((n, 1), np.bool_)
        cls[rows, 0], conf[rows, 0], agree[rows, 0] = second.class_id, second.confidence, agrees
        return [
            (INTROSPECTIVE_CLASS_ID, cls),
            (INTROSPECTIVE_LABEL, self._label_bytes[cls[:, 0]]),
            (INTROSPECTIVE_CONFIDENCE, conf),
            (INTROSPECTIVE_AGREES, agree),
        ]

    def _trust_prob(
        self,
        logits: np.ndarray,
        features: np.ndarray | None,
        finite: np.ndarray,
        trust: np.ndarray,
        conf: np.ndarray,
    ) -> np.ndarray | None:
        """TRUST_PROB of every sample when the entry is calibrated (NaN where the logits or
        features are not finite), else None. Computed for the whole batch whether or not a
        request asked for it: the metrics count every prediction's. The batch's GRADTRUST
        and msp (``trust``, ``conf`` from :func:`_base_scores`) are handed to the
        calibration rather than computed a second time."""
        if self.calibration is None:
            return None
        ok = finite if features is None else finite & np.isfinite(features).all(axis=1)
        if ok.all():  # the usual case: no row selection, no copies
            known = {"gradtrust": trust, "msp": conf}
            return self.calibration.apply(logits, features, known)
        prob = np.full(len(logits), np.nan)
        if ok.any():
            prob[ok] = self.calibration.apply(
                logits[ok],
                None if features is None else features[ok],
                {"gradtrust": trust[ok], "msp": conf[ok]},
            )
        return prob

    def _columns(
        self,
        kinds: set[frozenset[str] | None],
        trust: np.ndarray,
        conf: np.ndarray,
        pred: np.ndarray,
        prob: np.ndarray | None,
    ) -> dict[frozenset[str] | None, list[tuple[str, np.ndarray]]]:
        """The cheap outputs as (N, 1) columns of the whole batch, each computed only if a
        request wants it; per distinct ``ScoringRequest.outputs`` (``kinds``), the (name,
        column) pairs its requests get row slices of."""

        named = frozenset().union(*(DEFAULT_OUTPUTS if k is None else k for k in kinds))

        def needed(name: str) -> bool:
            return name in named

        columns: dict[str, np.ndarray] = {}
        if needed(LABEL):
            columns[LABEL] = self._label_bytes[pred]
        if needed(CLASS_ID):
            columns[CLASS_ID] = pred.reshape(-1, 1)
        if needed(CONFIDENCE):
            columns[CONFIDENCE] = conf.astype(np.float32).reshape(-1, 1)
        if needed(GRADTRUST):
            columns[GRADTRUST] = _to_float32(trust).reshape(-1, 1)  # finite, see scores.gradtrust
        if prob is not None and needed(TRUST_PROB):
            columns[TRUST_PROB] = prob.astype(np.float32).reshape(-1, 1)
        return {
            kind: [(name, col) for name, col in columns.items() if _named(kind, name)]
            for kind in kinds
        }


def _starts(spans: list[tuple[int, int]]) -> list[int]:
    """Where each (lo, hi) span of batch rows starts once the spans are put end to end."""
    return list(accumulate((hi - lo for lo, hi in spans[:-1]), initial=0))


def _named(outputs: frozenset[str] | None, name: str) -> bool:
    """Whether a cheap output goes to requests that named ``outputs`` (None: the defaults)."""
    return name in (DEFAULT_OUTPUTS if outputs is None else outputs)


def _is_plain(request: ScoringRequest) -> bool:
    """A request for the cheap outputs only: no SCORES, no HEATMAP, no introspection."""
    options = request.options
    return not options.scores and not options.heatmap_method and not _wants_introspection(request)


def _wants_introspection(request: ScoringRequest) -> bool:
    """Introspection is never a default output: only a request that names one gets it."""
    return request.outputs is not None and not request.outputs.isdisjoint(INTROSPECTIVE_OUTPUTS)


def _needs_features(options: RequestOptions) -> bool:
    return options.scores is not None and not scores.NEEDS_FEATURES.isdisjoint(options.scores)


def _base_scores(
    logits: np.ndarray, finite: np.ndarray, spans_fit: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GradTrust, confidence (MSP) and predicted class of every sample with finite logits
    (NaN, NaN, 0 for the others), in one validated pass over the batch."""
    # ``logits`` are float64 and ``finite`` says where they are finite: the rows scored are
    # validated already, so the scores are computed without checking them again.
    if finite.all():
        trust, conf = scores.gradtrust_and_msp(logits, spans_fit)
        # np.argmax is scores.predicted_class without validating the logits a second time.
        return trust, conf, np.argmax(logits, axis=1).astype(np.int64, copy=False)
    trust = np.full(len(logits), np.nan)
    conf = np.full(len(logits), np.nan)
    pred = np.zeros(len(logits), dtype=np.int64)
    if finite.any():
        ok = logits[finite]
        trust[finite], conf[finite] = scores.gradtrust_and_msp(ok, spans_fit)
        pred[finite] = np.argmax(ok, axis=1)
    return trust, conf, pred


def _non_finite(
    needs_features: list[bool],
    bounds: list[int],
    finite: np.ndarray,
    features: np.ndarray | None,
) -> dict[int, InvalidInputError]:
    """The error of each request (by position) whose logits, or features when its scores
    need them, are not all finite; other requests do not depend on the features."""
    with_features = finite if features is None else finite & np.isfinite(features).all(axis=1)
    if with_features.all():
        return {}
    failed: dict[int, InvalidInputError] = {}
    for n, needs in enumerate(needs_features):
        ok = (with_features if needs else finite)[bounds[n] : bounds[n + 1]]
        if not ok.all():
            bad = np.flatnonzero(~ok).tolist()
            failed[n] = InvalidInputError(
                f"the model produced non-finite logits or features for sample(s) {bad}; "
                "check the input preprocessing"
            )
    return failed


def _to_float32(values: np.ndarray) -> np.ndarray:
    """Saturate at float32's range instead of overflowing to inf (contrast_trust can be huge)."""
    # np.minimum(np.maximum(...)) is what np.clip computes (NaN stays NaN), without its
    # Python-level wrapper, which cost more than the arithmetic for one-image requests.
    return np.minimum(np.maximum(values, -_FLOAT32_MAX), _FLOAT32_MAX).astype(np.float32)
