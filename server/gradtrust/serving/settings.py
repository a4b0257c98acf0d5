"""Model-level settings (Triton config ``parameters``) and per-request options.

Both come in as strings: Triton hands a model its config parameters as
``{"key": {"string_value": "..."}}`` and a request's parameters as JSON. Parsing them
here, apart from Triton, keeps the rules testable and the messages identical on HTTP
and gRPC.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradtrust.core.scores import SCORE_NAMES
from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.bls import PARAMETER_KEYS as BLS_PARAMETERS
from gradtrust.serving.contract import (
    HEATMAP_METHODS,
    HEATMAP_SIZE_INPUT,
    HEATMAP_SIZES,
    PARAM_HEATMAP_SIZE,
    REQUEST_PARAMETERS,
)
from gradtrust.serving.decoding import IMAGE_FACTOR, REQUEST_FACTOR
from gradtrust.serving.decoding import PARAMETER_KEYS as IMAGE_PARAMETERS

#: The scores served in ``SCORES`` when a model's config does not choose
#: (GradTrust has its own output).
DEFAULT_SCORES: tuple[str, ...] = tuple(n for n in SCORE_NAMES if n != "gradtrust")
#: Default input limits (config parameters max_request_bytes and max_image_pixels).
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
#: Default cap on the images of one request that ask for a VOICE heatmap (config parameter
#: max_voice_images): VOICE explains against every class, so it costs about one forward
#: pass per image at C = 1000 (docs/BENCHMARKS.md); the cap keeps one request from
#: holding the model instance for long.
DEFAULT_MAX_VOICE_IMAGES = 8
#: Default bounds on decoding IMAGE_BYTES files (config parameters max_decoded_pixels_factor
#: and max_request_decoded_pixels_factor): an image may hold 16 x the pixels of the model's
#: input (4 x its height and width), a request 4 x the pixels of a full batch at the
#: model's size. Decoding time grows with the pixels, so one request's decoding costs at
#: most about 4 x that of a full batch of model-size images (docs/SECURITY.md).
DEFAULT_DECODED_PIXELS_FACTOR = 16.0
DEFAULT_REQUEST_DECODED_PIXELS_FACTOR = 4.0


def parse_score_names(text: str | Sequence[str], where: str) -> tuple[str, ...]:
    """``"msp, margin"`` -> ``("msp", "margin")``; unknown or repeated names are errors."""
    if not isinstance(text, str | list | tuple) or not all(
        isinstance(n, str) for n in ([] if isinstance(text, str) else text)
    ):
        raise InvalidInputError(
            f"{where} must be a comma-separated string of score names, got "
            f"{type(text).__name__} {_short(text)}; valid names: {', '.join(SCORE_NAMES)}"
        )
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(str(n).strip() for n in items if str(n).strip())
    unknown = [n for n in names if n not in SCORE_NAMES]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidInputError(
            f"unknown score name(s) {[n[:40] for n in unknown[:5]]}{more} in {where}; "
            f"valid names: {', '.join(SCORE_NAMES)}"
        )
    if len(set(names)) != len(names):
        raise InvalidInputError(f"score names repeat in {where}: {_short(list(names))}")
    if not names:
        raise InvalidInputError(f"{where} names no score; valid names: {', '.join(SCORE_NAMES)}")
    return names


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters: error messages echo input, never all of it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidInputError(
            f"{what} must be an integer >= {minimum}, got {type(value).__name__} {_short(value)}"
        )
    try:
        number = int(str(value).strip())
    except ValueError:
        raise InvalidInputError(
            f"{what} must be an integer >= {minimum}, got {_short(value)}"
        ) from None
    if number < minimum:
        raise InvalidInputError(f"{what} must be an integer >= {minimum}, got {number}")
    return number


@dataclass(frozen=True)
class ModelSettings:
    """What a model's config.pbtxt ``parameters`` decide for every request."""

    labels: tuple[str, ...]
    scores: tuple[str, ...] = DEFAULT_SCORES
    contrast_k: int = 3
    low_trust_threshold: float = 0.0
    pixel_min: float | None = None
    pixel_max: float | None = None
    #: Largest request (IMAGE tensor or IMAGE_BYTES files) in bytes, checked before any
    #: pixel is read. Triton already caps the batch at max_batch_size; this also bounds
    #: variable-size inputs (dims -1) and encoded files, which the batch cap does not.
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    #: Largest height x width of one IMAGE (variable-size inputs).
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    #: Most images in one request with ``heatmap_method=voice`` (gradtrust.serving.service).
    max_voice_images: int = DEFAULT_MAX_VOICE_IMAGES
    #: Pixels one decoded IMAGE_BYTES file may have, as a multiple of the model's input
    #: (gradtrust.serving.decoding.DecodeLimits).
    decoded_pixels_factor: float = DEFAULT_DECODED_PIXELS_FACTOR
    #: Pixels all files of one request may have, as a multiple of a full batch.
    request_decoded_pixels_factor: float = DEFAULT_REQUEST_DECODED_PIXELS_FACTOR

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], labels: Sequence[str]) -> ModelSettings:
        """Validate config parameters; raises :class:`ConfigError` naming the bad key."""
        known = {"scores", "contrast_k", "low_trust_threshold", "pixel_range", "onnx_file"}
        known |= {*IMAGE_PARAMETERS, *BLS_PARAMETERS}  # read by gradtrust.serving.decoding, .bls
        known |= {"max_request_bytes", "max_image_pixels"}
        known |= {"max_voice_images", IMAGE_FACTOR, REQUEST_FACTOR}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"unknown config parameter(s) {unknown}; known: {sorted(known)}")
        try:
            scores = parse_score_names(
                params.get("scores", ",".join(DEFAULT_SCORES)), "config parameter 'scores'"
            )
            k = _int(params.get("contrast_k", "3"), "config parameter 'contrast_k'", 1)
            max_bytes = _int(
                params.get("max_request_bytes", str(DEFAULT_MAX_REQUEST_BYTES)),
                "config parameter 'max_request_bytes'",
                1,
            )
            max_pixels = _int(
                params.get("max_image_pixels", str(DEFAULT_MAX_IMAGE_PIXELS)),
                "config parameter 'max_image_pixels'",
                1,
            )
            max_voice = _int(
                params.get("max_voice_images", str(DEFAULT_MAX_VOICE_IMAGES)),
                "config parameter 'max_voice_images'",
                0,
            )
            image_factor = _factor(params, IMAGE_FACTOR, DEFAULT_DECODED_PIXELS_FACTOR)
            request_factor = _factor(params, REQUEST_FACTOR, DEFAULT_REQUEST_DECODED_PIXELS_FACTOR)
            threshold = float(params.get("low_trust_threshold", "0"))
            lo = hi = None
            if params.get("pixel_range", "").strip():
                lo, hi = (float(v) for v in params["pixel_range"].split(","))
                if not lo < hi:
                    raise ValueError("pixel_range needs min < max")
        except (InvalidInputError, ValueError) as err:
            raise ConfigError(f"invalid model config: {err}") from err
        if len(labels) < 2:
            raise ConfigError("labels file must list at least two classes, one per line")
        return cls(
            tuple(labels),
            scores,
            k,
            threshold,
            lo,
            hi,
            max_request_bytes=max_bytes,
            max_image_pixels=max_pixels,
            max_voice_images=max_voice,
            decoded_pixels_factor=image_factor,
            request_decoded_pixels_factor=request_factor,
        )


def _factor(params: Mapping[str, str], key: str, default: float) -> float:
    """A config parameter that multiplies the model's input size: a finite number >= 1."""
    text = params.get(key, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1.0):
        raise ValueError(
            f"{key} must be a number >= 1 (a multiple of the model's input size), got {text!r}"
        )
    return value


@dataclass(frozen=True)
class RequestOptions:
    """What one request asks for, after validation against the model's settings."""

    scores: tuple[str, ...] | None  # None: SCORES not requested
    contrast_k: int
    heatmap_method: str | None  # None: HEATMAP not requested
    contrast_class: int | None
    #: "input" (the HEATMAP at the input's resolution) or "activation" (at the activation's).
    heatmap_size: str = HEATMAP_SIZE_INPUT


def parse_request(
    parameters: str | Mapping[str, Any] | None,
    settings: ModelSettings,
    want_scores: bool,
    want_heatmap: bool,
) -> RequestOptions:
    """Read a request's parameters (JSON text or a mapping); raises :class:`InvalidInputError`."""
    if isinstance(parameters, str):
        try:
            params = json.loads(parameters) if parameters.strip() else {}
        except (json.JSONDecodeError, RecursionError) as err:
            raise InvalidInputError(f"request parameters are not valid JSON: {err}") from None
    else:
        params = parameters if parameters is not None else {}
    if not isinstance(params, Mapping):
        raise InvalidInputError(
            "request parameters must be a JSON object of name: value pairs, got "
            f"{type(params).__name__} {_short(params)}"
        )
    unknown = sorted(str(k)[:40] for k in params if k not in REQUEST_PARAMETERS)
    if len(unknown) > 5:
        unknown = [*unknown[:5], f"... {len(unknown) - 5} more"]
    if unknown:
        raise InvalidInputError(
            f"unknown request parameter(s) {unknown}; known: {', '.join(REQUEST_PARAMETERS)}"
        )
    scores = None
    if want_scores or "scores" in params:
        scores = (
            parse_score_names(params["scores"], "request parameter 'scores'")
            if "scores" in params
            else settings.scores
        )
    k = _int(params.get("contrast_k", settings.contrast_k), "request parameter 'contrast_k'", 1)
    method = None
    if want_heatmap or "heatmap_method" in params:
        value = params.get("heatmap_method", "gradcam")
        method = value.strip() if isinstance(value, str) else value
        if method not in HEATMAP_METHODS:
            raise InvalidInputError(
                f"unknown heatmap_method {_short(method)}; "
                f"valid methods: {', '.join(HEATMAP_METHODS)}"
            )
    contrast_class = None
    if "contrast_class" in params:
        contrast_class = class_index(params["contrast_class"], settings.labels)
    heatmap_size = params.get(PARAM_HEATMAP_SIZE, HEATMAP_SIZE_INPUT)
    if isinstance(heatmap_size, str):
        heatmap_size = heatmap_size.strip()
    if heatmap_size not in HEATMAP_SIZES:
        raise InvalidInputError(
            f"unknown {PARAM_HEATMAP_SIZE} {_short(heatmap_size)}; valid values: "
            f"{', '.join(HEATMAP_SIZES)}"
        )
    return RequestOptions(scores, k, method, contrast_class, heatmap_size)


def class_index(value: Any, labels: Sequence[str]) -> int:
    """A class given as an index or a label -> its index; out of range is an error."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidInputError(
            f"contrast_class must be a class index (0..{len(labels) - 1}) or a label, "
            f"got {type(value).__name__} {_short(value)}"
        )
    text = str(value).strip()
    if text in labels and not text.lstrip("-").isdigit():
        return labels.index(text)
    try:
        index = int(text)
    except ValueError:
        raise InvalidInputError(
            f"contrast_class {_short(value)} is neither a class index "
            f"(0..{len(labels) - 1}) nor a label"
        ) from None
    if not 0 <= index < len(labels):
        raise InvalidInputError(
            f"contrast_class {index} is out of range: the model has classes 0..{len(labels) - 1}"
        )
    return index
