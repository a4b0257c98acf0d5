"""Read images into the model's input layout and draw explanation overlays.

Pillow and numpy only, so a service that calls the server needs no plotting stack.
Every array returned here is float32 in [0, 1], laid out (N, C, H, W) like the model input.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from gradtrust_client.errors import InvalidImageError, InvalidRequestError

ImageShape = tuple[int, int, int]
StrPath = str | os.PathLike[str]

_ARRAY_SUFFIXES = (".npy", ".npz")

#: The question each explanation method answers; {P} is the prediction, {Q} the contrast.
QUESTIONS = {
    "gradcam": "Why {P}?",
    "counterfactual": "What if these regions were absent? ({P})",
    "contrast": "Why {P}, rather than {Q}?",
    "voice": "How sure is the explanation of {P}?",
}

# Anchor colours of the heatmap palette (cold -> hot), linearly interpolated.
_PALETTE_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_PALETTE_RGB = np.array(
    [[40, 20, 90], [40, 120, 240], [40, 210, 130], [245, 205, 50], [200, 30, 20]],
    dtype=np.float64,
)


def load_images(paths: Sequence[StrPath], shape: ImageShape = (1, 28, 28)) -> np.ndarray:
    """Read PNG/JPEG/.npy/.npz files into one float32 batch of shape (N, *shape) in [0, 1]."""
    return load_images_with_names(paths, shape)[0]


def load_images_with_names(
    paths: Sequence[StrPath], shape: ImageShape = (1, 28, 28)
) -> tuple[np.ndarray, list[str]]:
    """Like :func:`load_images`, also naming each image (``file`` or ``file[i]`` in arrays).

    The names let a caller (the CLI) say which file each prediction belongs to when one
    .npy file holds many images.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if len(paths) == 0:
        raise InvalidImageError("no image files given: pass at least one PNG, JPEG or .npy path")
    shape = _check_shape(shape)
    batches: list[np.ndarray] = []
    names: list[str] = []
    for path in paths:
        path = Path(path)
        if path.suffix.lower() in _ARRAY_SUFFIXES:
            batch = _read_array_file(path, shape)
            names.extend(
                [str(path)] if len(batch) == 1 else [f"{path}[{i}]" for i in range(len(batch))]
            )
        else:
            batch = _read_picture(path, shape)[None]
            names.append(str(path))
        batches.append(batch)
    return np.concatenate(batches, axis=0), names


def as_model_batch(array: np.ndarray, shape: ImageShape, source: str = "images") -> np.ndarray:
    """Bring an in-memory array to float32 (N, *shape) in [0, 1], or say why it cannot be.

    Accepts one image or a batch: (H, W) and (N, H, W) when the model has one channel,
    (C, H, W) and (N, C, H, W). uint8 (and other integer) arrays are read as 0-255 and
    divided by 255; float arrays must already lie in [0, 1]. No resizing: arrays are
    taken as exact pixels.
    """
    array = np.asarray(array)
    channels, height, width = shape
    if array.ndim == 2 and channels == 1:
        array = array[None, None]
    elif array.ndim == 3 and array.shape == shape:
        array = array[None]
    elif array.ndim == 3 and channels == 1:
        array = array[:, None]
    if array.ndim != 4 or tuple(array.shape[1:]) != shape:
        raise InvalidImageError(
            f"{source}: got an array of shape {tuple(np.shape(array))}, but the model takes "
            f"images of shape {shape} (C, H, W); pass (N, {channels}, {height}, {width}), "
            f"one ({channels}, {height}, {width}) image"
            + (f", or ({height}, {width}) / (N, {height}, {width})" if channels == 1 else "")
        )
    return _to_unit_float(array, source)


def question_for(method: str, predicted: str, contrast: str | None = None) -> str:
    """The question an explanation answers, as a title: e.g. ``Why 7, rather than 1?``."""
    if method not in QUESTIONS:
        raise InvalidRequestError(
            f"unknown explanation method {method!r}: use one of {', '.join(QUESTIONS)}"
        )
    return QUESTIONS[method].format(P=predicted, Q=contrast or "the runner-up")


def upsample_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map at the model's activation resolution (``heatmap_size="activation"``), (h, w) or
    (N, h, w), brought to ``size`` = (H, W) as the server would: bilinear upsampling with
    half-pixel centres (``align_corners=False``), then each map min-max normalised to [0, 1]
    (a constant map becomes zeros). Returns float32.

    For gradcam, counterfactual and contrast this reproduces the server's input-size map
    (to float32 rounding): bilinear weights are non-negative and sum to 1, so upsampling
    commutes with the server's min-max step. A VOICE map is a variance of maps, not a map,
    so its upsampling is a display of the activation-resolution VOICE, not the input-size one.
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim not in (2, 3) or 0 in heat.shape:
        raise InvalidImageError(f"heatmap must be (h, w) or (N, h, w), got shape {heat.shape}")
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise InvalidImageError(f"size must be two positive integers, got {tuple(size)}")
    up = _interpolation(heat.shape[-2], height) @ heat @ _interpolation(heat.shape[-1], width).T
    low = up.min(axis=(-2, -1), keepdims=True)
    span = up.max(axis=(-2, -1), keepdims=True) - low
    flat = (span <= 0) | (heat == heat[..., :1, :1]).all(axis=(-2, -1), keepdims=True)
    out = np.where(flat, 0.0, (up - low) / np.where(flat, 1.0, span))
    return out.astype(np.float32)


def _interpolation(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D linear interpolation with half-pixel centres."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    frac = np.where(low < n_in - 1, src - low, 0.0)
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    matrix[rows, low] = 1.0 - frac
    matrix[rows, np.minimum(low + 1, n_in - 1)] += frac
    return matrix


def overlay_png(
    image: np.ndarray, heatmap: np.ndarray, title: str, out_path: StrPath, *, scale: int = 8
) -> Path:
    """Write the heatmap blended over the image, upscaled ``scale`` times, title above.

    ``image`` is (C, H, W), (1, C, H, W) or (H, W) in [0, 1]; ``heatmap`` is (H', W') in
    [0, 1] and is brought to the image's size by :func:`upsample_heatmap` if its size
    differs (a map at the activation's resolution). The PNG is ``W*scale`` wide;
    its height is ``H*scale`` plus a title band sized to the (wrapped) title. Returns the
    path written.
    """
    if scale < 1:
        raise InvalidImageError(f"overlay scale must be a positive integer, got {scale}")
    picture = np.asarray(image, dtype=np.float64)
    while picture.ndim > 3 and picture.shape[0] == 1:
        picture = picture[0]
    if picture.ndim == 2:
        picture = picture[None]
    if picture.ndim != 3 or picture.shape[0] not in (1, 3):
        raise InvalidImageError(
            f"overlay image must be (H, W), (1, H, W) or (3, H, W), got shape {np.shape(image)}"
        )
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2:
        raise InvalidImageError(f"overlay heatmap must be (H, W), got shape {heat.shape}")
    height, width = picture.shape[1:]
    if heat.shape != (height, width):
        heat = upsample_heatmap(heat, (height, width)).astype(np.float64)
    big = (width * scale, height * scale)

    base = np.repeat(picture, 3, axis=0) if picture.shape[0] == 1 else picture
    base_img = Image.fromarray(_to_bytes(np.moveaxis(base, 0, -1)), mode="RGB")
    base_big = np.asarray(base_img.resize(big, Image.Resampling.NEAREST), dtype=np.float64)
    heat_img = Image.fromarray(np.nan_to_num(np.clip(heat, 0.0, 1.0)).astype(np.float32), "F")
    heat_big = np.asarray(heat_img.resize(big, Image.Resampling.BILINEAR), dtype=np.float64)
    heat_big = np.clip(heat_big, 0.0, 1.0)

    alpha = (0.15 + 0.6 * heat_big)[..., None]
    blended = (1.0 - alpha) * base_big + alpha * _palette(heat_big)
    body = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")

    canvas = _with_title(body, title)
    out = Path(out_path)
    if out.parent and not out.parent.exists():
        raise InvalidImageError(f"cannot write {out}: folder {out.parent} does not exist")
    canvas.save(out, format="PNG")
    return out


def _check_shape(shape: Sequence[int]) -> ImageShape:
    dims = tuple(int(d) for d in shape)
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise InvalidImageError(
            f"image shape must be three positive sizes (C, H, W), got {tuple(shape)}; a model "
            "with variable-size inputs needs arrays of the exact size instead of files"
        )
    return dims[0], dims[1], dims[2]


def _read_picture(path: Path, shape: ImageShape) -> np.ndarray:
    channels, height, width = shape
    if channels not in (1, 3):
        raise InvalidImageError(
            f"{path}: picture files give 1 (grayscale) or 3 (RGB) channels, but the model takes "
            f"{channels}; pass a .npy array of shape ({channels}, {height}, {width}) instead"
        )
    try:
        with Image.open(path) as img:
            img.load()
            if channels == 1 and img.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(img, dtype=np.float64) / 65535.0
                resized = Image.fromarray(pixels.astype(np.float32), "F")
                resized = resized.resize((width, height), Image.Resampling.BILINEAR)
                return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)[None]
            converted = img.convert("L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise InvalidImageError(f"cannot read {path}: no such file") from None
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"cannot read {path}: not an image format pillow knows (use PNG, JPEG or .npy)"
        ) from None
    except OSError as exc:
        raise InvalidImageError(f"cannot read {path}: {exc}") from None
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted, dtype=np.float32) / np.float32(255.0)
    return pixels[None] if channels == 1 else np.moveaxis(pixels, -1, 0)


def _read_array_file(path: Path, shape: ImageShape) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InvalidImageError(f"cannot read {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InvalidImageError(f"cannot read {path} as a numpy array: {exc}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if "images" in keys:
                array = loaded["images"]
            elif len(keys) == 1:
                array = loaded[keys[0]]
            else:
                raise InvalidImageError(
                    f"{path} holds arrays {keys}: name the images array 'images' or save one array"
                )
    else:
        array = loaded
    return as_model_batch(array, shape, source=str(path))


def _to_unit_float(array: np.ndarray, source: str) -> np.ndarray:
    if array.size == 0:
        return array.astype(np.float32)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise InvalidImageError(
            f"{source}: pixel type {array.dtype} is not supported; use uint8 (0-255) or float (0-1)"
        )
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise InvalidImageError(
                f"{source}: integer pixels must lie in 0-255, found {low}..{high}"
            )
        return array.astype(np.float32) / np.float32(255.0)
    if np.iscomplexobj(array):
        raise InvalidImageError(f"{source}: complex pixels are not supported")
    if not np.all(np.isfinite(array)):
        raise InvalidImageError(f"{source}: pixels contain NaN or infinity")
    low_f, high_f = float(array.min()), float(array.max())
    if low_f < 0.0 or high_f > 1.0:
        raise InvalidImageError(
            f"{source}: float pixels must lie in [0, 1], found {low_f:.4g}..{high_f:.4g}; "
            "divide 0-255 data by 255 (or pass it as uint8)"
        )
    return array.astype(np.float32)


def _to_bytes(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.nan_to_num(unit) * 255.0), 0, 255).astype(np.uint8)


def _palette(values: np.ndarray) -> np.ndarray:
    channels = [np.interp(values, _PALETTE_STOPS, _PALETTE_RGB[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError, AttributeError, TypeError):  # Pillow without FreeType
        return ImageFont.load_default()


def _with_title(body: Image.Image, title: str) -> Image.Image:
    """Stack a white band with the wrapped title above ``body``; width stays the body's."""
    width = body.width
    font = _font(max(10, min(16, width // 16)))
    measure = ImageDraw.Draw(body)
    pad = 6
    lines = _wrap(title, lambda text: measure.textlength(text, font=font), width - 2 * pad)
    line_height = int(measure.textbbox((0, 0), "Ag?", font=font)[3]) + 3
    band = pad * 2 + line_height * max(1, len(lines))
    canvas = Image.new("RGB", (width, band + body.height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        left = max(pad, (width - draw.textlength(line, font=font)) / 2)
        draw.text((left, pad + i * line_height), line, fill="black", font=font)
    canvas.paste(body, (0, band))
    return canvas


def _wrap(text: str, length: Callable[[str], float], limit: float) -> list[str]:
    """Greedy word wrap by rendered width; a single over-long word keeps its own line."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and length(candidate) > limit:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines
