"""The Triton Python backend adapter: Triton tensors in, :class:`TrustService` answers out.

A model repository's ``1/model.py`` is one line, ``from gradtrust.triton.model import
TritonPythonModel``; everything else lives here and in the Triton-free core. This module
imports ``triton_python_backend_utils``, which exists only inside Triton's Python stub.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from gradtrust.core.calibration import load_model_calibration
from gradtrust.errors import GradTrustError, InvalidInputError
from gradtrust.serving.bls import BlsClassifier, WrapSpec, image_input, triton_infer
from gradtrust.serving.classifier import Classifier, OnnxClassifier
from gradtrust.serving.contract import (
    HEATMAP,
    HEATMAP_STATS,
    IMAGE,
    IMAGE_BYTES,
    INTROSPECTION_ONNX,
    SCORES,
    TRUST_PROB,
)
from gradtrust.serving.decoding import DecodeLimits, PreprocessSpec, decode_batch
from gradtrust.serving.introspector import Introspector
from gradtrust.serving.service import (
    BatchResult,
    ScoringRequest,
    TrustService,
)
from gradtrust.serving.settings import ModelSettings, RequestOptions, parse_request
from gradtrust.serving.telemetry import TrustMetrics, low_trust_rule

#: Seconds between two log lines about invalid requests (or about one kind of bug): a
#: client repeating a bad request must not flood the log (6 MB in 10 s was observed).
LOG_INTERVAL_S = 60.0


class LogThrottle:
    """At most one log line per ``interval_s`` for each kind of event; the events in
    between are counted and reported with the next line."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, kind: str, count: int = 1, now: float | None = None) -> int | None:
        """``count`` events of ``kind`` now: None means stay quiet (they are counted);
        a number means log now, mentioning that many events held back since last time."""
        now = time.monotonic() if now is None else now
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._held[kind] = self._held.get(kind, 0) + count
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)


def _parameters_text(request: Any) -> Any:
    """The request's parameters as Triton hands them over (JSON text). The stub decodes
    them as UTF-8; bytes that are not UTF-8 are the client's mistake, not a bug."""
    try:
        return request.parameters()
    except UnicodeDecodeError as err:
        raise InvalidInputError(
            f"request parameters are not valid UTF-8 (byte {err.start} of them cannot be "
            "decoded): send parameter names and values as UTF-8 text"
        ) from None


class _InternalError(Exception):
    """A request failed for a reason other than its input: it gets INTERNAL."""


def _describe(err: Exception) -> str:
    """What the client may read: our own errors say what is wrong (a misconfigured wrapped
    model, say); anything else is a bug, whose details stay in the server log."""
    if isinstance(err, GradTrustError):
        return str(err)
    return (
        f"internal error ({type(err).__name__}) while scoring this request; the server log "
        "has the details. Other requests are not affected."
    )


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    raw = model_config.get("parameters", {}) or {}
    return {k: str(v.get("string_value", "")) for k, v in raw.items()}


def _feature_width(classifier: Classifier) -> int | None:
    """The penultimate width an introspective network must take: the head weight's, for a
    classifier in this entry; unknown until it answers for one called through BLS."""
    return classifier.head_weight().shape[1] if isinstance(classifier, OnnxClassifier) else None


def _read_labels(model_dir: Path) -> list[str]:
    path = model_dir / "labels.txt"
    if not path.is_file():
        raise pb_utils.TritonModelException(
            f"{path} not found: a model entry needs labels.txt with one class name per line"
        )
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class TritonPythonModel:
    """Label, confidence and GradTrust for every image; scores and heatmaps on request."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.model_version = args["model_version"]
        model_dir = Path(args["model_repository"])
        params = _parameters(config)
        onnx_path = model_dir / self.model_version / params.get("onnx_file", "model.onnx")
        device = "gpu" if args.get("model_instance_kind") == "GPU" else "cpu"
        try:
            labels = _read_labels(model_dir)
            settings = ModelSettings.from_parameters(params, labels)
            wrap = WrapSpec.from_parameters(params)
            classifier: Classifier
            if wrap is None:
                classifier = OnnxClassifier(
                    onnx_path, device=device, device_id=int(args.get("model_instance_device_id", 0))
                )
            else:  # a classifier deployed in this server, called through BLS
                dims, dtype = image_input(config)
                classifier = BlsClassifier(wrap, triton_infer(pb_utils), dims, dtype, len(labels))
            self.spec = PreprocessSpec.from_parameters(
                params, classifier.input_shape, np.dtype(classifier.input_dtype).name
            )
            # What decoding IMAGE_BYTES may cost, checked from the files' headers.
            self.decode_limits = DecodeLimits.for_model(
                self.spec,
                int(config.get("max_batch_size", 0)),
                settings.decoded_pixels_factor,
                settings.request_decoded_pixels_factor,
                settings.max_image_pixels,
            )
            introspection = model_dir / self.model_version / INTROSPECTION_ONNX
            self.service = TrustService(
                classifier,
                settings,
                layout=self.spec.layout,
                calibration=load_model_calibration(model_dir),
                introspector=Introspector(
                    introspection, classifier.num_classes, _feature_width(classifier)
                )
                if introspection.is_file()
                else None,
            )
        except GradTrustError as err:
            raise pb_utils.TritonModelException(f"{self.model_name}: {err}") from err
        self.output_dtypes = {
            o["name"]: np.dtype(pb_utils.triton_string_to_numpy(o["data_type"]))
            for o in config["output"]
        }
        self.all_outputs = frozenset(self.output_dtypes)
        self.plain_options: dict[tuple[bool, bool], RequestOptions] = {}
        self.log_throttle = LogThrottle()
        try:
            self.metrics = TrustMetrics(
                model=self.model_name,
                version=self.model_version,
                rule=low_trust_rule(self.service.calibration, settings.low_trust_threshold),
                calibrated=self.service.calibration is not None,
                heldout_ece=None
                if self.service.calibration is None
                else self.service.calibration.heldout_ece,
            )
        except GradTrustError as err:
            raise pb_utils.TritonModelException(f"{self.model_name}: {err}") from err
        pb_utils.Logger.log_info(
            f"{self.model_name} v{self.model_version}: {classifier.num_classes} classes, "
            f"providers {classifier.providers}, heatmaps "
            f"{'on' if self.service.head is not None else 'unavailable'}, introspection "
            f"{'on request' if self.service.introspector is not None else 'unavailable'}"
        )

    def _parse(self, request: Any) -> ScoringRequest:
        requested = frozenset(request.requested_output_names())
        # Triton lists every output when the client named none: then only cheap ones are implied.
        named = requested != self.all_outputs
        if named and TRUST_PROB in requested and self.service.calibration is None:
            raise InvalidInputError(
                f"{self.model_name} has no trust calibration, so no {TRUST_PROB}: run "
                "`gradtrust calibrate` on a labelled calibration set, then reload the model"
            )
        options = self._options(
            _parameters_text(request),
            want_scores=SCORES in requested,
            want_heatmap=named and not requested.isdisjoint((HEATMAP, HEATMAP_STATS)),
        )
        outputs = requested if named else None
        # One walk over the inputs (pb_utils.get_input_tensor_by_name walks them per name).
        tensor = encoded = None
        for item in request.inputs():
            name = item.name()
            if name == IMAGE:
                tensor = item
            elif name == IMAGE_BYTES:
                encoded = item
        if tensor is not None and encoded is not None:
            raise InvalidInputError(f"send either {IMAGE} or {IMAGE_BYTES}, not both")
        limit = self.service.settings.max_request_bytes
        if encoded is not None:
            files = encoded.as_numpy()
            size = sum(len(f) for f in files.reshape(-1) if isinstance(f, bytes | bytearray))
            if size > limit:
                raise InvalidInputError(
                    f"{IMAGE_BYTES} holds {size} bytes of files, over this model's limit of "
                    f"{limit} bytes per request (config parameter max_request_bytes): send "
                    "fewer or smaller files per request"
                )
            return ScoringRequest(
                decode_batch(files, self.spec, self.decode_limits), options, outputs
            )
        if tensor is None:
            raise InvalidInputError(f"the request has no input named {IMAGE} or {IMAGE_BYTES}")
        # A view of the request's shared memory: TrustService checks the size limits from
        # its shape before any pixel is read.
        return ScoringRequest(tensor.as_numpy(), options, outputs)

    def _options(self, parameters: Any, want_scores: bool, want_heatmap: bool) -> RequestOptions:
        """:func:`parse_request`; for a request without parameters (Triton sends "{}"), the
        usual case, the answer depends on the two flags only and is parsed once."""
        if parameters not in ("{}", ""):
            return parse_request(parameters, self.service.settings, want_scores, want_heatmap)
        key = (want_scores, want_heatmap)
        options = self.plain_options.get(key)
        if options is None:
            options = parse_request(parameters, self.service.settings, want_scores, want_heatmap)
            self.plain_options[key] = options
        return options

    def _run(self, requests: list[ScoringRequest]) -> BatchResult:
        """The batch in one pass; if that hits a bug, each request alone, so that only the
        request that triggers it fails (INTERNAL) and the others are still answered."""
        try:
            return self.service.run(requests)
        except Exception as err:  # a bug, not bad input: isolate it rather than fail all
            self._log_bug("a batch", err)
        answers: list[Any] = []  # outputs, InvalidInputError or _InternalError
        result = BatchResult(answers=answers)
        gradtrust, confidence = [result.gradtrust], [result.confidence]
        trust_prob = [] if self.service.calibration is None else [np.empty(0)]
        for request in requests:
            try:
                one = self.service.run([request])
            except Exception as err:
                self._log_bug("a request", err)
                answers.append(_InternalError(_describe(err)))
                continue
            answers.extend(one.answers)
            gradtrust.append(one.gradtrust)
            confidence.append(one.confidence)
            if one.trust_prob is not None:
                trust_prob.append(one.trust_prob)
            result.trust_seconds += one.trust_seconds
            result.introspective += one.introspective
            result.introspective_disagreements += one.introspective_disagreements
            if one.heatmap_seconds is not None:
                result.heatmap_seconds = (result.heatmap_seconds or 0.0) + one.heatmap_seconds
        result.gradtrust = np.concatenate(gradtrust)
        result.confidence = np.concatenate(confidence)
        result.trust_prob = np.concatenate(trust_prob) if trust_prob else None
        return result

    def _log_bug(self, what: str, err: Exception) -> None:
        held = self.log_throttle.allow(f"bug:{type(err).__name__}")
        if held is None:
            return
        again = f" ({held} more since the last report)" if held else ""
        pb_utils.Logger.log_error(
            f"{self.model_name}: unexpected {type(err).__name__} while scoring {what}{again}:\n"
            + "".join(traceback.format_exception(err))
        )

    def _log_invalid(self, errors: list[InvalidInputError]) -> None:
        """One warning per interval about rejected requests, with the latest reason."""
        held = self.log_throttle.allow("invalid", len(errors))
        if held is None:
            return
        pb_utils.Logger.log_warn(
            f"{self.model_name}: {held + len(errors)} invalid request(s) rejected since the "
            f"last report (at most one report per {self.log_throttle.interval_s:g} s); "
            f"latest: {str(errors[-1])[:300]}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        parsed: list[ScoringRequest | None] = []
        errors: dict[int, InvalidInputError | _InternalError] = {}
        for i, request in enumerate(requests):
            try:
                parsed.append(self._parse(request))
            except InvalidInputError as err:
                parsed.append(None)
                errors[i] = err
            except Exception as err:  # a bug: this request fails, the batch goes on
                self._log_bug("a request's inputs", err)
                parsed.append(None)
                errors[i] = _InternalError(_describe(err))
        good = [i for i, p in enumerate(parsed) if p is not None]
        batch = self._run([p for p in parsed if p is not None])
        answers: list[Any] = [None] * len(requests)
        for i, error in errors.items():
            answers[i] = error
        for i, answer in zip(good, batch.answers, strict=True):
            answers[i] = answer
        rejected = [a for a in answers if isinstance(a, InvalidInputError)]
        try:  # monitoring must never cost a prediction its answer
            self.metrics.observe_batch(
                batch.gradtrust, batch.confidence, batch.trust_seconds, batch.trust_prob
            )
            if batch.heatmap_seconds is not None:
                self.metrics.observe_heatmap(batch.heatmap_seconds)
            if batch.introspective:
                self.metrics.count_introspection(
                    batch.introspective, batch.introspective_disagreements
                )
            if rejected:
                self.metrics.count_invalid(len(rejected))
        except Exception as err:
            self._log_bug("the batch's metrics", err)
        if rejected:
            self._log_invalid(rejected)
        return [self._response(a) for a in answers]

    def _response(self, answer: Any) -> Any:
        if isinstance(answer, InvalidInputError):
            return pb_utils.InferenceResponse(
                output_tensors=[],
                error=pb_utils.TritonError(str(answer), pb_utils.TritonError.INVALID_ARG),
            )
        if isinstance(answer, _InternalError):
            return pb_utils.InferenceResponse(
                output_tensors=[],
                error=pb_utils.TritonError(str(answer), pb_utils.TritonError.INTERNAL),
            )
        dtypes = self.output_dtypes
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(
                    name,
                    # In its config's dtype: the service's arrays already are, so no copy.
                    # (pb_utils.Tensor makes a non-contiguous array contiguous itself.)
                    value if value.dtype == dtypes[name] else value.astype(dtypes[name]),
                )
                for name, value in answer.items()
            ]
        )

    def finalize(self) -> None:
        # Nothing to flush: every batch's metrics are already in this stub's metrics file,
        # which the exporter keeps reading after the stub is gone.
        pass
