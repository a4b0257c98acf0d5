"""Score a classifier that is already deployed in the same Triton, through BLS.

Business logic scripting lets a Python-backend model call another model of the same
server. A GradTrust entry whose config names a deployed classifier (``wrapped_model``)
and that model's input, logits and (optionally) features tensors sends each batch there
and scores what comes back, so a team keeps its existing deployment (TensorRT, ONNX
Runtime, PyTorch backend...) and adds trust scores beside it. Closed-form heatmaps need
the conv activation and the head weight, which a deployed model does not expose: wrapped
models serve every score (``gradnorm`` only with features) but no heatmaps.

:class:`BlsClassifier` has the interface :class:`gradtrust.serving.classifier.OnnxClassifier` offers
to :class:`gradtrust.serving.service.TrustService`; the Triton call itself is injected
(:func:`triton_infer`), so everything here runs without Triton.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradtrust.errors import ConfigError, GradTrustError
from gradtrust.serving.classifier import ACTIVATION, FEATURES, LOGITS

MODEL = "wrapped_model"
VERSION = "wrapped_version"
INPUT = "wrapped_input"
LOGITS_OUTPUT = "wrapped_logits"
FEATURES_OUTPUT = "wrapped_features"
#: The config parameters this module reads (the model's settings must accept them).
PARAMETER_KEYS: tuple[str, ...] = (MODEL, VERSION, INPUT, LOGITS_OUTPUT, FEATURES_OUTPUT)

#: ``infer(model, version, input_name, images, output_names) -> {output_name: array}``
InferFn = Callable[[str, int, str, np.ndarray, Sequence[str]], dict[str, np.ndarray]]

_TRITON_DTYPES = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_FP64": "float64"}


@dataclass(frozen=True)
class WrapSpec:
    """Which deployed model to call, and the names of its tensors."""

    model: str
    input: str
    logits: str
    features: str | None = None
    version: int = -1  # -1: the version Triton's policy picks

    def __post_init__(self) -> None:
        for key, value in ((MODEL, self.model), (INPUT, self.input), (LOGITS_OUTPUT, self.logits)):
            if not value.strip():
                raise ConfigError(f"config parameter {key} is empty: name the deployed tensor")

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> WrapSpec | None:
        """The spec when ``wrapped_model`` is set, else None (the entry has its own ONNX)."""
        model = params.get(MODEL, "").strip()
        if not model:
            others = sorted(k for k in PARAMETER_KEYS if params.get(k, "").strip())
            if others:
                raise ConfigError(
                    f"config parameter(s) {others} need {MODEL}: name the deployed classifier"
                )
            return None
        missing = [k for k in (INPUT, LOGITS_OUTPUT) if not params.get(k, "").strip()]
        if missing:
            raise ConfigError(
                f"{MODEL} is set but {missing} are not: name the deployed model's image input "
                "and its logits output (pre-softmax scores)"
            )
        try:
            version = int(params.get(VERSION, "").strip() or -1)
        except ValueError:
            raise ConfigError(f"config parameter {VERSION} must be an integer") from None
        features = params.get(FEATURES_OUTPUT, "").strip() or None
        return cls(model, params[INPUT].strip(), params[LOGITS_OUTPUT].strip(), features, version)

    def to_parameters(self) -> dict[str, str]:
        params = {MODEL: self.model, INPUT: self.input, LOGITS_OUTPUT: self.logits}
        if self.features:
            params[FEATURES_OUTPUT] = self.features
        if self.version != -1:
            params[VERSION] = str(self.version)
        return params


def image_input(model_config: Mapping[str, Any]) -> tuple[tuple[int, ...], str]:
    """(per-sample dims, numpy dtype name) of the entry's ``IMAGE`` input, from its config."""
    for item in model_config.get("input", []) or []:
        if item.get("name") == "IMAGE":
            dtype = _TRITON_DTYPES.get(str(item.get("data_type")))
            if dtype is None:
                raise ConfigError(
                    f"input IMAGE must be FP32, FP16 or FP64, not {item['data_type']}"
                )
            return tuple(int(d) for d in item.get("dims", [])), dtype
    raise ConfigError("the model config has no input named IMAGE")


class BlsClassifier:
    """The deployed classifier, seen through :data:`InferFn` calls."""

    has_activation = False

    def __init__(
        self,
        spec: WrapSpec,
        infer: InferFn,
        input_shape: Sequence[int],
        input_dtype: str,
        num_classes: int,
    ) -> None:
        self.spec = spec
        self.infer = infer
        # -1 (dynamic) dims become None, as onnxruntime reports them.
        self.input_shape: tuple[int | str | None, ...] = tuple(
            d if d > 0 else None for d in input_shape
        )
        self.input_dtype = np.dtype(input_dtype).type
        self.num_classes = int(num_classes)
        self.output_names = [LOGITS] + ([FEATURES] if spec.features else [])
        self.providers = [f"BLS -> {spec.model}"]

    @property
    def has_features(self) -> bool:
        return self.spec.features is not None

    def run(self, images: np.ndarray, outputs: Sequence[str] = (LOGITS,)) -> dict[str, np.ndarray]:
        """One call of the deployed model; returns logits (and features) under our names."""
        if ACTIVATION in outputs:
            raise ConfigError("a wrapped model has no activation output: heatmaps are off")
        remote = {LOGITS: self.spec.logits, FEATURES: self.spec.features}
        if any(remote.get(o) is None for o in outputs):
            raise ConfigError(f"{FEATURES_OUTPUT} is not configured, so features are unavailable")
        names = [str(remote[o]) for o in outputs]
        batch = np.ascontiguousarray(images, dtype=self.input_dtype)
        got = self.infer(self.spec.model, self.spec.version, self.spec.input, batch, names)
        result = {}
        for ours, theirs in zip(outputs, names, strict=True):
            value = np.asarray(got[theirs])
            value = value.reshape(len(batch), -1) if value.ndim > 2 else value
            if value.ndim != 2 or value.shape[0] != len(batch):
                raise GradTrustError(
                    f"wrapped model {self.spec.model!r} returned {theirs} of shape {value.shape} "
                    f"for a batch of {len(batch)}; expected ({len(batch)}, n)"
                )
            if ours == LOGITS and value.shape[1] != self.num_classes:
                raise GradTrustError(
                    f"wrapped model {self.spec.model!r} returned {value.shape[1]} logits but "
                    f"labels.txt lists {self.num_classes} classes: fix labels.txt or "
                    f"{LOGITS_OUTPUT}"
                )
            result[ours] = value
        return result

    def head_weight(self) -> np.ndarray:
        raise ConfigError("a wrapped model exposes no head weight: heatmaps are off")


def triton_infer(pb_utils: Any) -> InferFn:
    """An :data:`InferFn` doing BLS calls with Triton's ``triton_python_backend_utils``."""

    def infer(
        model: str, version: int, input_name: str, images: np.ndarray, outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        kwargs: dict[str, Any] = {}
        if hasattr(pb_utils, "PreferredMemory"):  # ask for CPU outputs (numpy) when supported
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(
                pb_utils.TRITONSERVER_MEMORY_CPU, 0
            )
        request = pb_utils.InferenceRequest(
            model_name=model,
            model_version=version,
            requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor(input_name, images)],
            **kwargs,
        )
        response = request.exec()
        if response.has_error():
            raise GradTrustError(
                f"wrapped model {model!r} failed: {response.error().message()}; check that it "
                f"is loaded and takes {input_name!r} of shape {list(images.shape)}"
            )
        result = {}
        for name in outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise GradTrustError(f"wrapped model {model!r} returned no output {name!r}")
            result[name] = tensor.as_numpy()
        return result

    return infer
