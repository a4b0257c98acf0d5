"""Turn encoded image files (PNG, JPEG) into the tensor a classifier takes, as its entry says.

A model entry written by ``gradtrust prepare`` records how its network expects pixels in
config ``parameters``: the layout of the input tensor, the resize target and the
per-channel normalisation ``x = (pixel * scale - mean) / std``. API callers can then send
image files as they are (the ``IMAGE_BYTES`` input) and the server decodes and normalises
them exactly like the training pipeline did. Sending ``IMAGE`` arrays skips all of this:
those are already the network's input tensor.

Pure functions over bytes and numpy arrays (Pillow for decoding), no Triton imports.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gradtrust.errors import ConfigError, InvalidInputError

LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC")
#: Pillow's names of the formats decoded ("MPO": a JPEG with more pictures, as phones write).
FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO")

LAYOUT = "image_layout"
SCALE = "image_scale"
MEAN = "image_mean"
STD = "image_std"
RESIZE = "image_resize"
#: The config parameters this module reads (the model's settings must accept them).
PARAMETER_KEYS: tuple[str, ...] = (LAYOUT, SCALE, MEAN, STD, RESIZE)

DEFAULT_SCALE = 1.0 / 255.0
#: Refuse images above this many pixels before decoding them (a "decompression bomb" is a
#: small file that expands to gigabytes).
MAX_PIXELS = 40_000_000

Dim = int | str | None


@dataclass(frozen=True)
class PreprocessSpec:
    """How one decoded image (H, W, channels) of 8-bit pixels becomes one network input.

    ``channels`` is None when the network input is not an image tensor of rank 3 (for
    example a flat vector): such a model takes ``IMAGE`` arrays only. ``size`` (H, W) is the
    resize target; None keeps each image's own size (models with a dynamic input size).
    """

    channels: int | None
    layout: str = "NCHW"
    size: tuple[int, int] | None = None
    scale: float = DEFAULT_SCALE
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(
                f"image layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"
            )
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ConfigError(f"image resize must be two positive integers H, W, got {self.size}")
        if not (math.isfinite(self.scale) and self.scale != 0):
            raise ConfigError(f"image scale must be a finite non-zero number, got {self.scale}")
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in {1, self.channels or 1} or not all(
                math.isfinite(v) for v in values
            ):
                raise ConfigError(
                    f"image {what} needs 1 value or one per channel ({self.channels}), "
                    f"all finite; got {list(values)}"
                )
        if min(self.std) <= 0:
            raise ConfigError(f"image std values must be > 0, got {list(self.std)}")
        if np.dtype(self.dtype).kind != "f":
            raise ConfigError(f"the network input must be a float tensor, got {self.dtype}")

    @classmethod
    def from_parameters(
        cls,
        params: Mapping[str, str],
        input_shape: Sequence[Dim],
        dtype: str = "float32",
    ) -> PreprocessSpec:
        """Read the ``image_*`` config parameters for a network whose per-sample input shape
        (batch dimension excluded, dynamic sizes as None or a name) is ``input_shape``."""
        layout = params.get(LAYOUT, "").strip().upper() or "NCHW"
        key = SCALE
        try:
            scale = float(params.get(SCALE, "").strip() or DEFAULT_SCALE)
            key = MEAN
            mean = _floats(params.get(MEAN, ""), (0.0,))
            key = STD
            std = _floats(params.get(STD, ""), (1.0,))
            key = RESIZE
            size = _size(params.get(RESIZE, ""))
        except ValueError:
            raise ConfigError(
                f"config parameter {key} is {params.get(key)!r}: write "
                + ("'H,W' (two integers)" if key == RESIZE else "numbers separated by commas")
            ) from None
        channels, fixed = image_geometry(input_shape, layout)
        if size is not None and fixed is not None and size != fixed:
            raise ConfigError(
                f"config parameter {RESIZE} is {size[0]},{size[1]} but the network takes "
                f"{fixed[0]}x{fixed[1]} images: remove the parameter or make them agree"
            )
        return cls(channels, layout, size or fixed, scale, mean, std, dtype)

    def to_parameters(self) -> dict[str, str]:
        """The config parameters that :meth:`from_parameters` reads back into this spec."""
        params = {
            LAYOUT: self.layout,
            SCALE: repr(self.scale),
            MEAN: ",".join(repr(v) for v in self.mean),
            STD: ",".join(repr(v) for v in self.std),
        }
        if self.size is not None:
            params[RESIZE] = f"{self.size[0]},{self.size[1]}"
        return params


def _floats(text: str, default: tuple[float, ...]) -> tuple[float, ...]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    return tuple(float(t) for t in items) if items else default


def _size(text: str) -> tuple[int, int] | None:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        return None
    if len(items) != 2:
        raise ValueError(f"{RESIZE} must be 'H,W', got {text!r}")
    height, width = (int(t) for t in items)
    return height, width


def image_geometry(
    input_shape: Sequence[Dim], layout: str
) -> tuple[int | None, tuple[int, int] | None]:
    """(channels, fixed (H, W) or None) of a per-sample input shape in ``layout``.

    Channels is None when the shape is not (C, H, W) / (H, W, C) with a fixed C.
    """
    if len(input_shape) != 3 or layout not in LAYOUTS:
        return None, None
    c, h, w = (input_shape[0], input_shape[1], input_shape[2])
    if layout == "NHWC":
        h, w, c = input_shape[0], input_shape[1], input_shape[2]
    channels = c if isinstance(c, int) and c > 0 else None
    fixed = (h, w) if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 else None
    return channels, fixed


def spatial_size(batch_shape: Sequence[int], layout: str) -> tuple[int, int]:
    """(H, W) of a batch (N, C, H, W) or (N, H, W, C): the size heatmaps are drawn at."""
    if layout == "NHWC" and len(batch_shape) == 4:
        return int(batch_shape[1]), int(batch_shape[2])
    return int(batch_shape[-2]), int(batch_shape[-1])


@dataclass(frozen=True)
class DecodeLimits:
    """How many pixels decoding may produce: per image and per request.

    Decoding costs time in proportion to the pixels decoded, and the model instance does
    nothing else meanwhile, so an unbounded file holds up every other client. Both bounds
    are checked from the files' headers (Pillow reads the size without decoding) before
    any pixel is decoded. :meth:`for_model` ties them to the model's input size, so that
    one request's worst case stays a fixed multiple of a normal one.
    """

    image_pixels: int
    request_pixels: int
    #: Where each number comes from, for the error messages (the config parameter).
    image_source: str = ""
    request_source: str = ""

    @classmethod
    def for_model(
        cls,
        spec: PreprocessSpec,
        max_batch_size: int,
        image_factor: float,
        request_factor: float,
        fallback_image_pixels: int,
    ) -> DecodeLimits:
        """``image_factor`` x the model's input pixels per image, ``request_factor`` x a
        full batch of them per request. A model with a dynamic input size has no input
        size to scale: then ``fallback_image_pixels`` per image and ``max_batch_size``
        (at least 1) of them per request."""
        batch = max(1, int(max_batch_size))
        if spec.size is None:
            per_image = int(fallback_image_pixels)
            return cls(
                per_image,
                per_image * batch,
                "config parameter max_image_pixels",
                f"max_image_pixels x max_batch_size {batch}",
            )
        height, width = spec.size
        return cls(
            max(1, int(image_factor * height * width)),
            max(1, int(request_factor * height * width * batch)),
            f"{image_factor:g} x the model's {height}x{width} input; config parameter "
            f"{IMAGE_FACTOR}",
            f"{request_factor:g} x a full batch of {batch} {height}x{width} images; config "
            f"parameter {REQUEST_FACTOR}",
        )


#: Config parameters of :meth:`DecodeLimits.for_model` (parsed by gradtrust.serving.settings).
IMAGE_FACTOR = "max_decoded_pixels_factor"
REQUEST_FACTOR = "max_request_decoded_pixels_factor"
#: Pillow modes of 16-bit grayscale PNGs (and of 32-bit integer images, refused below).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _open(data: object) -> Any:
    """Pillow's lazy image: format and size from the header, no pixel decoded yet."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise InvalidInputError("the file is empty: send the bytes of a PNG or JPEG file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(bytes(data)))
    except UnidentifiedImageError:
        raise InvalidInputError(
            "not an image file Pillow recognises: send the bytes of a PNG or JPEG file"
        ) from None
    except (
        OSError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        raise InvalidInputError(
            f"not a readable PNG or JPEG file ({err}): send the complete, unmodified file"
        ) from None
    if opened.format not in FORMATS:
        raise InvalidInputError(
            f"the file is a {opened.format} image and this server decodes PNG and JPEG "
            "only: convert it to PNG"
        )
    return opened


def _check_size(opened: Any, limits: DecodeLimits | None) -> None:
    """Refuse an image whose header announces more pixels than ``limits`` allow, saying
    to what size to scale it (which keeps its aspect ratio and fits)."""
    limit = MAX_PIXELS if limits is None else min(limits.image_pixels, MAX_PIXELS)
    pixels = opened.width * opened.height
    if pixels > limit:
        side = math.sqrt(limit / pixels)
        fit_w, fit_h = max(1, int(opened.width * side)), max(1, int(opened.height * side))
        source = f": {limits.image_source}" if limits is not None and limits.image_source else ""
        raise InvalidInputError(
            f"image of {opened.width}x{opened.height} pixels is larger than this model "
            f"decodes ({limit} pixels per image{source}): downscale it to at most "
            f"{fit_w}x{fit_h} before sending"
        )


def _eight_bit(image: Any) -> Any:
    """16-bit grayscale as 8 bits, scaled (65535 -> 255) rather than clipped, which is what
    Pillow's ``convert("L")`` would do (every pixel above 255 white)."""
    from PIL import Image

    if image.mode in _WIDE_MODES:
        wide = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), mode="L")
    if image.mode in ("I", "F"):
        raise InvalidInputError(
            f"the image has {image.mode!r} pixels (32-bit); this server decodes 8- and 16-bit "
            "PNG and JPEG: save it as an 8- or 16-bit PNG"
        )
    return image


def _decode_opened(opened: Any, spec: PreprocessSpec) -> NDArray[np.uint8]:
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened.seek(0)  # animated PNG, multi-picture JPEG: the first frame
            opened.load()
            image: Image.Image = ImageOps.exif_transpose(_eight_bit(opened))
            image = image.convert("L" if spec.channels == 1 else "RGB")
            if spec.size is not None and (image.height, image.width) != spec.size:
                image = image.resize((spec.size[1], spec.size[0]), Image.Resampling.BILINEAR)
    except InvalidInputError:
        raise
    except (
        OSError,
        ValueError,
        EOFError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        raise InvalidInputError(
            f"not a readable PNG or JPEG file ({err}): send the complete, unmodified file"
        ) from None
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(pixels.shape[0], pixels.shape[1], 1 if spec.channels == 1 else 3)


def _check_channels(spec: PreprocessSpec) -> None:
    if spec.channels not in (1, 3):
        raise InvalidInputError(
            "this model cannot decode image files: its input is not a 1- or 3-channel image "
            f"tensor (channels: {spec.channels}); send the IMAGE tensor instead"
        )


def decode_image(
    data: bytes, spec: PreprocessSpec, limits: DecodeLimits | None = None
) -> NDArray[np.uint8]:
    """One PNG or JPEG file -> uint8 pixels (H, W, channels), resized to ``spec.size``.

    The EXIF orientation of photos is applied; an alpha channel is dropped; grayscale and
    colour are converted to what the network takes; 16-bit grayscale is scaled to 8 bits;
    of an animated PNG or a multi-picture JPEG the first frame is used. Resizing is
    Pillow's bilinear filter. The size is checked against ``limits`` (default: only the
    absolute :data:`MAX_PIXELS`) from the header, before decoding.
    """
    _check_channels(spec)
    opened = _open(data)
    _check_size(opened, limits)
    return _decode_opened(opened, spec)


def preprocess(pixels: NDArray[np.generic], spec: PreprocessSpec) -> NDArray[np.floating]:
    """A batch of pixels (N, H, W, channels) -> the network input in ``spec.layout``.

    ``x = (pixel * scale - mean) / std`` per channel, in float64, then cast to the network's
    dtype. The input array is not modified.
    """
    raw = np.asarray(pixels)
    if raw.ndim != 4 or raw.shape[-1] != spec.channels:
        raise InvalidInputError(
            f"pixels must have shape (batch, height, width, {spec.channels}), got {raw.shape}"
        )
    x = (raw.astype(np.float64) * spec.scale - np.asarray(spec.mean)) / np.asarray(spec.std)
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.dtype(spec.dtype))


def decode_batch(
    values: NDArray[np.object_],
    spec: PreprocessSpec,
    limits: DecodeLimits | None = None,
) -> NDArray[np.floating]:
    """Triton's IMAGE_BYTES tensor (N, 1) or (N,) of file bytes -> the network input batch.

    Every file's header is read and checked against ``limits`` (per image, and the sum
    over the request) before the first pixel is decoded, so an oversized request is
    refused in milliseconds rather than after seconds of decoding.
    """
    items = np.asarray(values, dtype=np.object_).reshape(-1)
    if items.size == 0:
        raise InvalidInputError("IMAGE_BYTES holds an empty batch: send at least one file")
    _check_channels(spec)
    opened = []
    total = 0
    for i, item in enumerate(items):
        try:
            one = _open(item)
            _check_size(one, limits)
        except InvalidInputError as err:
            raise InvalidInputError(f"IMAGE_BYTES sample {i}: {err}") from None
        opened.append(one)
        total += one.width * one.height
    if limits is not None and total > limits.request_pixels:
        raise InvalidInputError(
            f"IMAGE_BYTES holds {len(items)} images of {total} pixels in all, more than this "
            f"model decodes per request ({limits.request_pixels} pixels: "
            f"{limits.request_source}): send "
            "fewer or smaller images per request"
        )
    decoded = []
    for i, one in enumerate(opened):
        try:
            decoded.append(_decode_opened(one, spec))
        except InvalidInputError as err:
            raise InvalidInputError(f"IMAGE_BYTES sample {i}: {err}") from None
    sizes = sorted({d.shape[:2] for d in decoded})
    if len(sizes) > 1:
        raise InvalidInputError(
            f"IMAGE_BYTES images have different sizes {sizes} and this model does not resize "
            "them: send images of one size, or one image per request"
        )
    return preprocess(np.stack(decoded), spec)
