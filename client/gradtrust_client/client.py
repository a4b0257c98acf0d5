"""TrustClient: predictions with trust scores, and explanations, from a GradTrust model.

The client reads the model's config once (input shape, max batch size, default score
list) so callers pass any number of images of the right size and get one typed result
per image back, whichever protocol they use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from gradtrust_client import _contract as C
from gradtrust_client._transport import DEFAULT_URLS, ParamValue, Transport
from gradtrust_client.errors import (
    InvalidImageError,
    InvalidRequestError,
    ModelNotReadyError,
    ServerUnavailableError,
    TrustClientError,
)
from gradtrust_client.images import QUESTIONS, as_model_batch, load_images, question_for
from gradtrust_client.retry import DEFAULT_RETRY, RetryPolicy

DEFAULT_MODEL = "gradtrust_mnist"
METHODS = tuple(QUESTIONS)
_BASE_OUTPUTS = (C.LABEL, C.CLASS_ID, C.CONFIDENCE, C.GRADTRUST)

Images = np.ndarray | Sequence[str | os.PathLike[str]] | str | os.PathLike[str]


@dataclass(frozen=True)
class Prediction:
    """One image's prediction.

    ``confidence`` is the softmax probability of ``label`` in [0, 1]; ``gradtrust`` is the
    log of the counterfactual gradient-variance ratio, >= 0 (0: the runner-up classes are as
    probable as the label). Higher means more trust for both and for every entry of
    ``scores`` (name -> value, in the order requested; None when none were requested).
    ``trust_prob`` is the calibrated probability that the prediction is correct (None unless
    requested; the model must have been calibrated with ``gradtrust calibrate``).
    """

    label: str
    class_id: int
    confidence: float
    gradtrust: float
    scores: dict[str, float] | None = None
    trust_prob: float | None = None
    #: The second stage's answer (None unless requested with ``introspect=True``).
    introspection: Introspection | None = None


@dataclass(frozen=True)
class Introspection:
    """The introspective (second-stage) prediction of one image: the class a small network
    predicts from the model's gradients towards every class, its probability, and whether
    it agrees with the feed-forward ``Prediction.label``. Disagreement is a shift signal."""

    label: str
    class_id: int
    confidence: float
    agrees: bool


@dataclass(frozen=True)
class Explanation:
    """One image's prediction and a heatmap answering ``question`` about it.

    ``heatmap`` is a read-only (H, W) float32 array in [0, 1] at the input's resolution,
    or at the model's activation resolution (h, w) when asked with
    ``heatmap_size="activation"`` (:func:`gradtrust_client.images.upsample_heatmap` brings
    it to the image; :func:`~gradtrust_client.images.overlay_png` does so by itself).
    ``contrast_class`` is the contrast requested (None: the server's default, the
    runner-up class); ``stats`` holds ``snr`` and ``iou`` for method ``voice``.
    """

    label: str
    class_id: int
    confidence: float
    gradtrust: float
    heatmap: np.ndarray = field(compare=False, repr=False)
    method: str
    contrast_class: int | str | None = None
    stats: dict[str, float] | None = None

    @property
    def prediction(self) -> Prediction:
        return Prediction(self.label, self.class_id, self.confidence, self.gradtrust)

    def question(self, labels: Sequence[str] | None = None) -> str:
        """The question this heatmap answers, e.g. ``Why 7, rather than 1?``."""
        contrast = self.contrast_class
        if isinstance(contrast, int) and labels is not None and 0 <= contrast < len(labels):
            contrast = labels[contrast]
        return question_for(self.method, self.label, None if contrast is None else str(contrast))


@dataclass(frozen=True)
class ModelInfo:
    """What the client learned from the model's config.

    ``input_shape`` is one image's (C, H, W) without the batch dimension (-1 for a
    variable size); ``labels`` is None unless the config lists them.
    """

    name: str
    input_name: str
    input_shape: tuple[int, ...]
    max_batch_size: int
    default_scores: tuple[str, ...]
    labels: tuple[str, ...] | None
    outputs: tuple[str, ...]
    #: "IMAGE_BYTES" when the model decodes PNG/JPEG files itself (``gradtrust prepare``
    #: entries): files are then sent as they are and preprocessed by the server.
    encoded_input: str | None = None


class TrustClient:
    """Talks to a GradTrust model on a Triton server over HTTP or gRPC.

    Use as a context manager (or call :meth:`close`). Every method raises only
    :class:`~gradtrust_client.errors.TrustClientError` subclasses. One client per
    thread: the underlying tritonclient connections are not shared safely.

    Transient failures (server unreachable, model backend restarting) are retried as
    ``retry`` says (:data:`~gradtrust_client.retry.DEFAULT_RETRY`: 4 tries over about
    0.7 s; :data:`~gradtrust_client.retry.NO_RETRY` turns it off); rejected requests never.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "http",
        model: str = DEFAULT_MODEL,
        timeout_s: float = 60.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        compress_responses: bool = False,
    ) -> None:
        """``url`` is host:port; None means localhost:8000 (http) or localhost:8001 (grpc).

        ``compress_responses`` (HTTP): let the server gzip its answers. Off by default:
        full-size heatmaps are float32 and barely compress, while gzipping a 224 x 224
        map costs the server about 5 ms of CPU, more than the map itself; turn it on for
        a slow network link. gRPC responses are never compressed here.
        """
        if protocol not in DEFAULT_URLS:
            raise InvalidRequestError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        self.model = model
        self.retry = retry
        self._transport = Transport(
            url or DEFAULT_URLS[protocol], protocol, timeout_s, compress_responses
        )
        self._info: ModelInfo | None = None

    @property
    def url(self) -> str:
        return self._transport.url

    @property
    def protocol(self) -> str:
        return self._transport.protocol

    def __enter__(self) -> TrustClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()

    def is_ready(self) -> bool:
        """True when the server answers and the model is loaded; False when either is not."""
        try:
            return self._transport.server_live() and self._transport.model_ready(self.model)
        except (ServerUnavailableError, ModelNotReadyError):
            return False

    def model_info(self, refresh: bool = False) -> ModelInfo:
        """Read (once, then cached) the model's input, batch size and default scores."""
        if self._info is None or refresh:
            if not self.retry.call(lambda: self._transport.model_ready(self.model)):
                raise ModelNotReadyError(
                    f"model {self.model!r} is not ready on {self._transport.location}: check the "
                    "model name (--model), and the server log for a model that failed to load"
                )
            config = self.retry.call(lambda: self._transport.model_config(self.model))
            self._info = _parse_config(self.model, config)
        return self._info

    def predict(
        self,
        images: Images,
        scores: bool | Sequence[str] = False,
        contrast_k: int | None = None,
        trust_prob: bool = False,
        introspect: bool = False,
    ) -> list[Prediction]:
        """Classify images (an array or file paths); one :class:`Prediction` each, in order.

        ``scores=True`` asks for the model's default score list, a sequence of names for
        those scores. ``contrast_k`` sets how many runner-up classes ``contrast_trust``
        compares against. ``trust_prob=True`` also asks for TRUST_PROB; ``introspect=True``
        for the introspective prediction (the model needs ``gradtrust introspect``). Any
        number of images works: batches are split to fit the model.
        """
        info = self.model_info()
        names = self._score_names(scores, info)
        params: dict[str, ParamValue] = {}
        if names:
            params[C.PARAM_SCORES] = ",".join(names)
        if contrast_k is not None:
            if isinstance(contrast_k, bool) or not isinstance(contrast_k, int | np.integer):
                raise InvalidRequestError(f"contrast_k must be an integer, got {contrast_k!r}")
            if contrast_k < 1:
                raise InvalidRequestError(f"contrast_k must be at least 1, got {contrast_k}")
            params[C.PARAM_CONTRAST_K] = int(contrast_k)
        outputs = [
            *_BASE_OUTPUTS,
            *([C.SCORES] if names else []),
            *([C.TRUST_PROB] if trust_prob else []),
            *(C.INTROSPECTIVE_OUTPUTS if introspect else ()),
        ]
        results: list[Prediction] = []
        for arrays in self._run(images, info, outputs, params):
            base = _base_fields(arrays)
            table = _rows(arrays, C.SCORES, len(names)) if names else None
            probs = _rows(arrays, C.TRUST_PROB, 1) if trust_prob else None
            second = _introspections(arrays, len(base)) if introspect else None
            for i, (label, class_id, confidence, gradtrust) in enumerate(base):
                row = None if table is None else dict(zip(names, map(float, table[i]), strict=True))
                prob = None if probs is None else float(probs[i, 0])
                results.append(
                    Prediction(
                        label,
                        class_id,
                        confidence,
                        gradtrust,
                        row,
                        prob,
                        None if second is None else second[i],
                    )
                )
        return results

    def explain(
        self,
        images: Images,
        method: str = "gradcam",
        contrast: int | str | None = None,
        heatmap_size: str = C.HEATMAP_SIZE_INPUT,
    ) -> list[Explanation]:
        """Heatmaps answering ``method``'s question for each image (see :data:`QUESTIONS`).

        ``contrast`` (class index or label) names Q for ``method="contrast"``; None lets the
        server pick the runner-up class. ``heatmap_size="activation"`` asks for the maps at
        the model's activation resolution (for a 7 x 7 layer, 49 values instead of the
        image's pixels); upsample them with :func:`gradtrust_client.images.upsample_heatmap`.
        """
        if method not in METHODS:
            raise InvalidRequestError(
                f"unknown explanation method {method!r}: use one of {', '.join(METHODS)}"
            )
        if heatmap_size not in C.HEATMAP_SIZES:
            raise InvalidRequestError(
                f"unknown heatmap_size {heatmap_size!r}: use one of {', '.join(C.HEATMAP_SIZES)}"
            )
        params: dict[str, ParamValue] = {C.PARAM_HEATMAP_METHOD: method}
        if heatmap_size != C.HEATMAP_SIZE_INPUT:
            params[C.PARAM_HEATMAP_SIZE] = heatmap_size
        if contrast is not None:
            if method != "contrast":
                raise InvalidRequestError(
                    f"a contrast class only applies to method='contrast', not {method!r}"
                )
            params[C.PARAM_CONTRAST_CLASS] = _check_contrast(contrast)
        info = self.model_info()
        with_stats = method == "voice"
        outputs = [*_BASE_OUTPUTS, C.HEATMAP, *([C.HEATMAP_STATS] if with_stats else [])]
        results: list[Explanation] = []
        for arrays in self._run(images, info, outputs, params):
            heatmaps = np.array(arrays[C.HEATMAP], dtype=np.float32)
            if heatmaps.ndim != 3 or len(heatmaps) != len(arrays[C.CLASS_ID]):
                raise TrustClientError(
                    f"server returned HEATMAP of shape {heatmaps.shape}; expected (N, H, W)"
                )
            heatmaps.setflags(write=False)
            stats = _rows(arrays, C.HEATMAP_STATS, 2) if with_stats else None
            for i, fields in enumerate(_base_fields(arrays)):
                stat = (
                    None
                    if stats is None
                    else {"snr": float(stats[i, 0]), "iou": float(stats[i, 1])}
                )
                results.append(Explanation(*fields, heatmaps[i], method, contrast, stat))
        return results

    def _score_names(self, scores: bool | Sequence[str], info: ModelInfo) -> list[str]:
        if scores is False or scores is None:
            return []
        if scores is True:
            if not info.default_scores:
                raise InvalidRequestError(
                    f"model {self.model!r} declares no default scores (config parameter "
                    "'scores'): pass the score names explicitly"
                )
            return list(info.default_scores)
        if isinstance(scores, str):
            scores = scores.split(",")
        names = [str(name).strip() for name in scores]
        if not names or any(not name or "," in name for name in names):
            raise InvalidRequestError(f"score names must be non-empty, without commas: {scores!r}")
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"score names are repeated: {names}")
        return names

    def _run(
        self,
        images: Images,
        info: ModelInfo,
        outputs: Sequence[str],
        params: dict[str, ParamValue],
    ) -> list[dict[str, np.ndarray]]:
        paths = _paths(images)
        if paths is not None and info.encoded_input is not None:
            name = info.encoded_input
            batch = _read_files(paths)
        else:
            name, batch = info.input_name, _to_batch(images, info)
        step = info.max_batch_size

        def send(chunk: np.ndarray) -> dict[str, np.ndarray]:
            return self.retry.call(
                lambda: self._transport.infer(self.model, name, chunk, outputs, params)
            )

        return [send(batch[i : i + step]) for i in range(0, len(batch), step)]


def _paths(images: Images) -> list[str | os.PathLike[str]] | None:
    """The file paths in ``images``, or None when it is an array."""
    if isinstance(images, str | os.PathLike):
        return [images]
    if (
        isinstance(images, Sequence)
        and len(images) > 0
        and all(isinstance(item, str | os.PathLike) for item in images)
    ):
        return list(images)
    return None


def _read_files(paths: Sequence[str | os.PathLike[str]]) -> np.ndarray:
    """Files as they are, for a model's BYTES input: (N, 1) object array of bytes."""
    try:
        return np.array([[Path(p).read_bytes()] for p in paths], dtype=np.object_)
    except OSError as err:
        raise InvalidImageError(f"cannot read {err.filename}: {err.strerror}") from None


def _to_batch(images: Images, info: ModelInfo) -> np.ndarray:
    shape = info.input_shape
    paths = _paths(images)
    if paths is not None:
        if len(shape) != 3 or min(shape) <= 0:
            raise InvalidImageError(
                f"model {info.name!r} takes inputs of shape {shape}: only fixed (C, H, W) inputs "
                "can be read from files; pass an array instead"
            )
        return load_images(paths, (shape[0], shape[1], shape[2]))
    array = np.asarray(images)
    if len(shape) == 3 and min(shape) > 0:
        return as_model_batch(array, (shape[0], shape[1], shape[2]))
    if array.ndim != len(shape) + 1 or any(
        d > 0 and d != got for d, got in zip(shape, array.shape[1:], strict=True)
    ):
        raise InvalidImageError(
            f"got an array of shape {array.shape}; model {info.name!r} takes (N, *{shape})"
        )
    actual = tuple(int(d) for d in array.shape[1:])
    return as_model_batch(array, (actual[0], actual[1], actual[2])) if len(actual) == 3 else array


def _check_contrast(contrast: int | str) -> int | str:
    if isinstance(contrast, bool) or not isinstance(contrast, int | str | np.integer):
        raise InvalidRequestError(
            f"contrast must be a class index or a label, got {type(contrast).__name__}"
        )
    if isinstance(contrast, str):
        if not contrast.strip():
            raise InvalidRequestError("contrast label must not be empty")
        return contrast.strip()
    if contrast < 0:
        raise InvalidRequestError(f"contrast class index must be >= 0, got {contrast}")
    return int(contrast)


def _rows(arrays: dict[str, np.ndarray], name: str, columns: int) -> np.ndarray:
    table = np.asarray(arrays[name], dtype=np.float64)
    count = len(arrays[C.CLASS_ID])
    if table.shape != (count, columns):
        raise TrustClientError(
            f"server returned {name} of shape {table.shape}; expected ({count}, {columns})"
        )
    return table


def _introspections(arrays: dict[str, np.ndarray], count: int) -> list[Introspection]:
    columns = [np.asarray(arrays[name]).reshape(-1) for name in C.INTROSPECTIVE_OUTPUTS]
    if any(len(c) != count for c in columns):
        raise TrustClientError(
            f"server returned introspective outputs of lengths {[len(c) for c in columns]}; "
            f"expected {count} each"
        )
    ids, labels, confidence, agrees = columns
    return [
        Introspection(_text(labels[i]), int(ids[i]), float(confidence[i]), bool(agrees[i]))
        for i in range(count)
    ]


def _base_fields(arrays: dict[str, np.ndarray]) -> list[tuple[str, int, float, float]]:
    labels = np.asarray(arrays[C.LABEL]).reshape(-1)
    ids = np.asarray(arrays[C.CLASS_ID]).reshape(-1)
    confidence = np.asarray(arrays[C.CONFIDENCE], dtype=np.float64).reshape(-1)
    gradtrust = np.asarray(arrays[C.GRADTRUST], dtype=np.float64).reshape(-1)
    if not len(labels) == len(ids) == len(confidence) == len(gradtrust):
        raise TrustClientError(
            "server returned outputs of different lengths: "
            f"LABEL {len(labels)}, CLASS_ID {len(ids)}, CONFIDENCE {len(confidence)}, "
            f"GRADTRUST {len(gradtrust)}"
        )
    return [
        (_text(label), int(class_id), float(conf), float(trust))
        for label, class_id, conf, trust in zip(labels, ids, confidence, gradtrust, strict=True)
    ]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _parse_config(model: str, config: dict[str, Any]) -> ModelInfo:
    inputs = config.get("input") or []
    chosen = [item for item in inputs if item.get("name") == C.IMAGE] or [
        item for item in inputs if item.get("name") != C.IMAGE_BYTES
    ]
    if len(chosen) != 1:
        raise TrustClientError(
            f"model {model!r} has inputs {[i.get('name') for i in inputs]}; a GradTrust model "
            "has one input named IMAGE"
        )
    entry = chosen[0]
    dtype = entry.get("data_type", "TYPE_FP32")
    if dtype != "TYPE_FP32":
        raise TrustClientError(f"model {model!r} input is {dtype}; this client sends TYPE_FP32")
    max_batch = int(config.get("max_batch_size", 0))
    if max_batch < 1:
        raise TrustClientError(
            f"model {model!r} has max_batch_size {max_batch}; GradTrust models batch (set "
            "max_batch_size >= 1 in config.pbtxt)"
        )
    parameters = config.get("parameters") or {}
    return ModelInfo(
        name=str(config.get("name", model)),
        input_name=str(entry["name"]),
        input_shape=tuple(int(d) for d in entry.get("dims", [])),
        max_batch_size=max_batch,
        default_scores=tuple(_split(_param(parameters, "scores"))),
        labels=tuple(_split(_param(parameters, "labels"))) or None,
        outputs=tuple(str(out.get("name")) for out in config.get("output") or []),
        encoded_input=C.IMAGE_BYTES
        if any(i.get("name") == C.IMAGE_BYTES for i in inputs)
        else None,
    )


def _param(parameters: dict[str, Any], key: str) -> str:
    value = parameters.get(key)
    if isinstance(value, dict):
        return str(value.get("string_value", ""))
    return "" if value is None else str(value)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]
