"""Where the per-sample scores come from: the model in this process, or a running server.

A scorer turns a batch of images into predictions and one array per score (higher =
more trust). :class:`InProcessScorer` runs the served ONNX file with onnxruntime and
computes exactly what the server computes (:func:`gradtrust.core.scores.compute_scores`),
plus, given the model's torch twin, the autograd-only baselines of
:mod:`gradtrust.tools.evaluate.torch_scores`. :class:`ServerScorer` asks a running Triton
server through :mod:`gradtrust_client`, so it measures what is really served (only the
scores the server returns, in float32).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from torch import nn

from gradtrust.core.calibration import compute_inputs, input_names
from gradtrust.core.scores import SCORE_NAMES, compute_scores
from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import FEATURES, LOGITS
from gradtrust.tools.evaluate.torch_scores import TORCH_SCORE_NAMES, has_dropout, torch_scores

Floats = NDArray[np.float64]
METHODS: tuple[str, ...] = (*SCORE_NAMES, *TORCH_SCORE_NAMES)
"""Every method the evaluation knows, in report order."""


@dataclass(frozen=True)
class Scored:
    """Predictions (N,) and ``{method: (N,) float64}`` for one image set; in process also
    the logits and penultimate features, which calibration inputs are computed from."""

    pred: NDArray[np.int64]
    scores: dict[str, Floats]
    logits: Floats | None = None
    features: Floats | None = None

    def calibration_inputs(self, contrast_k: int = 3) -> dict[str, Floats]:
        """Every input a calibration signal may use (:func:`gradtrust.core.calibration.
        input_names`), computed from the logits exactly as the server computes them."""
        if self.logits is None:
            raise ConfigError(
                "calibration inputs need the model's logits: score in process, not through a server"
            )
        names = input_names(self.logits.shape[1], contrast_k, self.features is not None)
        return compute_inputs(self.logits, names, self.features, contrast_k)

    def correct(self, labels: NDArray[np.integer]) -> NDArray[np.bool_]:
        labels = np.asarray(labels)
        if labels.shape != self.pred.shape:
            raise InvalidInputError(
                f"{labels.shape[0] if labels.ndim else 0} labels for {self.pred.size} images"
            )
        return np.asarray(self.pred == labels)


class Scorer(Protocol):
    """Anything that scores image batches; ``unavailable`` says why a method is missing."""

    unavailable: dict[str, str]

    @property
    def methods(self) -> tuple[str, ...]: ...

    def score(self, images: NDArray[np.floating], served_only: bool = False) -> Scored:
        """Score a batch; ``served_only`` skips what a server cannot compute (torch scores)."""
        ...


class PreprocessingScorer:
    """A scorer that first turns stored images into the network input (an image folder's
    pixels through the entry's preprocessing: :class:`LabelledData`'s ``to_input``)."""

    def __init__(
        self, inner: Scorer, to_input: Callable[[NDArray[np.floating]], NDArray[np.floating]]
    ) -> None:
        self.inner = inner
        self.to_input = to_input
        self.unavailable = inner.unavailable

    @property
    def methods(self) -> tuple[str, ...]:
        return self.inner.methods

    def score(self, images: NDArray[np.floating], served_only: bool = False) -> Scored:
        return self.inner.score(self.to_input(images), served_only)


class InProcessScorer:
    """The served ONNX model (onnxruntime, CPU) plus, optionally, its torch twin for the
    gradient baselines (odin, purview_*, mc_dropout)."""

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        torch_model: nn.Module | None = None,
        batch_size: int = 500,
        contrast_k: int = 3,
        intra_op_threads: int = 0,
    ) -> None:
        self.classifier = OnnxClassifier(onnx_path, intra_op_threads=intra_op_threads)
        self.torch_model = torch_model.eval() if torch_model is not None else None
        self.batch_size = batch_size
        self.contrast_k = contrast_k
        self.unavailable: dict[str, str] = {}
        if not self.classifier.has_features:
            self.unavailable["gradnorm"] = "the ONNX model has no 'features' output"
        if self.torch_model is None:
            for name in TORCH_SCORE_NAMES:
                self.unavailable[name] = "needs the model's torch twin (--torch-weights)"
        elif not has_dropout(self.torch_model):
            self.unavailable["mc_dropout"] = "the model has no dropout layers"

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m for m in METHODS if m not in self.unavailable)

    def score(self, images: NDArray[np.floating], served_only: bool = False) -> Scored:
        names = [m for m in SCORE_NAMES if m not in self.unavailable]
        outputs = [LOGITS, FEATURES] if "gradnorm" in names else [LOGITS]
        parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        for start in range(0, len(images), self.batch_size):
            result = self.classifier.run(images[start : start + self.batch_size], outputs)
            for name in outputs:
                parts[name].append(result[name])
        logits = np.concatenate(parts[LOGITS])
        features = np.concatenate(parts[FEATURES]) if FEATURES in parts else None
        scores = compute_scores(logits, names, features, self.contrast_k)
        if self.torch_model is not None and not served_only:
            extra, _ = torch_scores(self.torch_model, np.asarray(images))
            scores.update(extra)
        z = logits.astype(np.float64)
        h = None if features is None else features.astype(np.float64)
        return Scored(np.argmax(logits, axis=1).astype(np.int64), scores, z, h)

    def check_twin(self, images: NDArray[np.floating], atol: float = 1e-3) -> float:
        """Refuse a torch twin whose logits differ from the ONNX model's (returns the max gap)."""
        if self.torch_model is None:
            return 0.0
        import torch

        with torch.no_grad():
            twin = self.torch_model(torch.from_numpy(np.ascontiguousarray(images))).numpy()
        served = self.classifier.run(np.asarray(images), [LOGITS])[LOGITS]
        gap = float(np.abs(twin - served).max())
        if gap > atol:
            raise ConfigError(
                f"the torch weights and {self.classifier.path} disagree (max logit gap {gap:.3g}): "
                "they are not the same model; re-export the ONNX file from these weights "
                "(`make train-demo`) or pass --no-torch"
            )
        return gap


class ServerScorer:
    """Scores through a running GradTrust server (what clients really get, float32)."""

    def __init__(self, url: str, model: str, protocol: str = "http") -> None:
        from gradtrust_client import TrustClient

        self.client = TrustClient(url, protocol=protocol, model=model)
        info = self.client.model_info()
        self.names = [n for n in info.default_scores if n != "gradtrust"]
        self.unavailable = {
            m: "not served by this model (config parameter 'scores')"
            for m in SCORE_NAMES
            if m not in ("gradtrust", "msp", *self.names)
        }
        for name in TORCH_SCORE_NAMES:
            self.unavailable[name] = "needs autograd on the torch model: run in-process"

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m for m in METHODS if m not in self.unavailable)

    def score(self, images: NDArray[np.floating], served_only: bool = False) -> Scored:
        predictions = self.client.predict(np.asarray(images, np.float32), scores=self.names)
        scores: dict[str, Floats] = {
            "gradtrust": np.array([p.gradtrust for p in predictions], np.float64),
            "msp": np.array([p.confidence for p in predictions], np.float64),
        }
        for name in self.names:
            scores[name] = np.array([(p.scores or {})[name] for p in predictions], np.float64)
        ordered = {m: scores[m] for m in METHODS if m in scores}
        return Scored(np.array([p.class_id for p in predictions], np.int64), ordered)

    def close(self) -> None:
        self.client.close()
