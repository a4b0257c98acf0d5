"""The Triton Python backend adapter: Triton tensors in, :class:`TrustService` answers out.

A model repository's ``1/model.py`` is one line, ``from gradtrust.triton_model import
TritonPythonModel``; everything else lives here and in the Triton-free core. This module
imports ``triton_python_backend_utils``, which exists only inside Triton's Python stub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from gradtrust.bls import BlsClassifier, WrapSpec, image_input, triton_infer
from gradtrust.config import ModelSettings, parse_request
from gradtrust.errors import GradTrustError, InvalidInputError
from gradtrust.evaluation.calibration import load_model_calibration
from gradtrust.metrics import TrustMetrics
from gradtrust.preprocess import PreprocessSpec, decode_batch
from gradtrust.runtime import OnnxClassifier
from gradtrust.service import (
    HEATMAP,
    HEATMAP_STATS,
    SCORES,
    TRUST_PROB,
    ScoringRequest,
    TrustService,
)

IMAGE = "IMAGE"
IMAGE_BYTES = "IMAGE_BYTES"


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    raw = model_config.get("parameters", {}) or {}
    return {k: str(v.get("string_value", "")) for k, v in raw.items()}


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
            classifier: OnnxClassifier | BlsClassifier
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
            self.service = TrustService(
                classifier,
                settings,
                layout=self.spec.layout,
                calibration=load_model_calibration(model_dir),
            )
        except GradTrustError as err:
            raise pb_utils.TritonModelException(f"{self.model_name}: {err}") from err
        self.output_names = [o["name"] for o in config["output"]]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }
        self.metrics: TrustMetrics | None = TrustMetrics(
            pb_utils,
            model=self.model_name,
            version=self.model_version,
            num_classes=classifier.num_classes,
            low_trust_threshold=settings.low_trust_threshold,
        )
        pb_utils.Logger.log_info(
            f"{self.model_name} v{self.model_version}: {classifier.num_classes} classes, "
            f"providers {classifier.providers}, heatmaps "
            f"{'on' if self.service.head_weight is not None else 'unavailable'}"
        )

    def _parse(self, request: Any) -> ScoringRequest:
        requested = set(request.requested_output_names())
        # Triton lists every output when the client named none: then only cheap ones are implied.
        named = requested != set(self.output_names)
        if named and TRUST_PROB in requested and self.service.calibration is None:
            raise InvalidInputError(
                f"{self.model_name} has no trust calibration, so no {TRUST_PROB}: run "
                "`gradtrust calibrate` on a labelled calibration set, then reload the model"
            )
        options = parse_request(
            request.parameters(),
            self.service.settings,
            want_scores=SCORES in requested,
            want_heatmap=named and bool(requested & {HEATMAP, HEATMAP_STATS}),
        )
        tensor = pb_utils.get_input_tensor_by_name(request, IMAGE)
        encoded = pb_utils.get_input_tensor_by_name(request, IMAGE_BYTES)
        if tensor is not None and encoded is not None:
            raise InvalidInputError(f"send either {IMAGE} or {IMAGE_BYTES}, not both")
        if encoded is not None:
            return ScoringRequest(decode_batch(encoded.as_numpy(), self.spec), options)
        if tensor is None:
            raise InvalidInputError(f"the request has no input named {IMAGE} or {IMAGE_BYTES}")
        return ScoringRequest(tensor.as_numpy(), options)

    def execute(self, requests: list[Any]) -> list[Any]:
        parsed: list[ScoringRequest | None] = []
        errors: dict[int, InvalidInputError] = {}
        for i, request in enumerate(requests):
            try:
                parsed.append(self._parse(request))
            except InvalidInputError as err:
                parsed.append(None)
                errors[i] = err
        good = [i for i, p in enumerate(parsed) if p is not None]
        batch = self.service.run([p for p in parsed if p is not None])
        answers: list[Any] = [None] * len(requests)
        for i, error in errors.items():
            answers[i] = error
        for i, answer in zip(good, batch.answers, strict=True):
            answers[i] = answer
        if self.metrics is not None:
            self.metrics.observe_batch(batch.gradtrust, batch.confidence, batch.trust_seconds)
            if batch.heatmap_seconds is not None:
                self.metrics.observe_heatmap(batch.heatmap_seconds)
            invalid = sum(isinstance(a, InvalidInputError) for a in answers)
            if invalid:
                self.metrics.count_invalid(invalid)
        return [self._response(a) for a in answers]

    def _response(self, answer: Any) -> Any:
        if isinstance(answer, InvalidInputError):
            return pb_utils.InferenceResponse(
                output_tensors=[],
                error=pb_utils.TritonError(str(answer), pb_utils.TritonError.INVALID_ARG),
            )
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=self.output_dtypes[name]))
            for name, value in answer.items()
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
