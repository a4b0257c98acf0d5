"""Triton Python-backend model for the benchmarks' "plain" baseline: the same onnxruntime
session as GradTrust Serve (:class:`gradtrust.serving.classifier.OnnxClassifier`, same options), the
same batching, but it returns the logits and nothing else: no input checks, no scores,
no metrics. ``bench/serving.py`` copies this file to ``1/model.py`` of a generated model
(no ``from __future__`` import: the benchmark may put lines before the imports).
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import LOGITS


class TritonPythonModel:
    """Logits for every image: the cheapest honest Python-backend classifier."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"]
        device = "gpu" if args.get("model_instance_kind") == "GPU" else "cpu"
        self.classifier = OnnxClassifier(path / params.get("onnx_file", "model.onnx"), device)

    def execute(self, requests: list[Any]) -> list[Any]:
        images = [pb_utils.get_input_tensor_by_name(r, "IMAGE").as_numpy() for r in requests]
        logits = self.classifier.run(np.concatenate(images), [LOGITS])[LOGITS]
        bounds = np.cumsum([0] + [len(x) for x in images])
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("LOGITS", logits[lo:hi])])
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
