"""Image corruptions at five severities, for grayscale images in [0, 1].

The fifteen ImageNet-C corruptions (Hendrycks & Dietterich 2019) assume 224-pixel
colour photos; these are ten of them re-done for small grayscale digits with numpy and
Pillow only (no scipy, no OpenCV). The parameters were chosen on the demo classifier so
that severity 1 barely hurts it and severity 5 clearly does: ImageNet-C's own values are
far too strong here (adding 0.1 to every pixel already drives the demo model to 10 %
accuracy), so these sweeps are milder than ImageNet-C's and not comparable to it. Each function
takes float images (N, 1, H, W) in [0, 1], a severity 1..5 and a numpy Generator, and
returns new float32 images in [0, 1] (the input is never modified). Randomness comes
only from the generator, so a (seed, corruption, severity) triple fixes the result.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from gradtrust.errors import InvalidInputError

Images = NDArray[np.float32]
Corruption = Callable[[NDArray[np.floating], int, np.random.Generator], Images]

SEVERITIES = (1, 2, 3, 4, 5)

# Per-corruption parameters, one per severity (1..5).
_GAUSSIAN_SIGMA = (0.03, 0.045, 0.06, 0.08, 0.10)
_SHOT_PHOTONS = (30.0, 12.0, 6.0, 4.0, 3.0)
_IMPULSE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.08)
_DEFOCUS_RADIUS = (0.8, 1.1, 1.4, 1.7, 2.0)
_MOTION_LENGTH = (2.0, 2.5, 3.0, 3.5, 4.5)
_CONTRAST_FACTOR = (0.95, 0.9, 0.85, 0.8, 0.7)
_BRIGHTNESS_SHIFT = (0.01, 0.02, 0.03, 0.04, 0.06)
_PIXELATE_FACTOR = (0.7, 0.6, 0.55, 0.5, 0.45)
_JPEG_QUALITY = (25, 18, 12, 9, 7)
_ELASTIC_PIXELS = (1.0, 1.5, 2.0, 2.5, 3.0)  # RMS displacement
_ELASTIC_SMOOTH = 3.0  # Gaussian sigma of the displacement field, pixels


def _check(images: NDArray[np.floating], severity: int) -> NDArray[np.float64]:
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4 or x.shape[1] != 1:
        raise InvalidInputError(
            f"corruptions take grayscale images (N, 1, H, W), got shape {x.shape}"
        )
    if severity not in SEVERITIES:
        raise InvalidInputError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return x.copy()


def _done(x: NDArray[np.float64]) -> Images:
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _filter(x: NDArray[np.float64], kernels: NDArray[np.float64]) -> NDArray[np.float64]:
    """Correlate each image (N, 1, H, W) with its own odd-sized kernel (N, k, k), edge padding.

    A shift-and-add over the k*k taps: for the small kernels used here it is as fast as an
    FFT and exact.
    """
    n, _, h, w = x.shape
    k = kernels.shape[-1]
    r = k // 2
    padded = np.pad(x[:, 0], ((0, 0), (r, r), (r, r)), mode="edge")
    out = np.zeros((n, h, w))
    for dy in range(k):
        for dx in range(k):
            weight = kernels[:, dy, dx]
            if np.any(weight):
                out += weight[:, None, None] * padded[:, dy : dy + h, dx : dx + w]
    return out[:, None]


def _supersampled_kernel(inside: Callable[[NDArray, NDArray], NDArray], radius: float) -> NDArray:
    """A normalised kernel whose taps are the share of 8x8 sub-pixel points ``inside`` holds."""
    r = int(np.ceil(radius))
    offsets = (np.arange(8) + 0.5) / 8.0 - 0.5
    taps = np.arange(-r, r + 1, dtype=np.float64)
    yy = taps[:, None, None, None] + offsets[None, None, :, None]
    xx = taps[None, :, None, None] + offsets[None, None, None, :]
    kernel = inside(np.broadcast_to(yy, (taps.size,) * 2 + (8, 8)), xx).mean(axis=(2, 3))
    return kernel / kernel.sum()


def gaussian_noise(images: NDArray[np.floating], severity: int, rng: np.random.Generator) -> Images:
    """Add N(0, sigma^2) noise per pixel."""
    x = _check(images, severity)
    return _done(x + rng.normal(0.0, _GAUSSIAN_SIGMA[severity - 1], x.shape))


def shot_noise(images: NDArray[np.floating], severity: int, rng: np.random.Generator) -> Images:
    """Poisson photon noise: ``Poisson(lambda x) / lambda`` (fewer photons = worse)."""
    x = _check(images, severity)
    lam = _SHOT_PHOTONS[severity - 1]
    return _done(rng.poisson(x * lam) / lam)


def impulse_noise(images: NDArray[np.floating], severity: int, rng: np.random.Generator) -> Images:
    """Salt-and-pepper noise: a share of pixels set to 0 or 1 with equal odds."""
    x = _check(images, severity)
    hit = rng.random(x.shape) < _IMPULSE_AMOUNT[severity - 1]
    salt = rng.random(x.shape) < 0.5
    return _done(np.where(hit, salt.astype(np.float64), x))


def defocus_blur(images: NDArray[np.floating], severity: int, rng: np.random.Generator) -> Images:
    """Blur with an anti-aliased disk (the out-of-focus point spread function)."""
    x = _check(images, severity)
    radius = _DEFOCUS_RADIUS[severity - 1]
    disk = _supersampled_kernel(lambda yy, xx: (yy**2 + xx**2 <= radius**2) * 1.0, radius)
    return _done(_filter(x, np.broadcast_to(disk, (x.shape[0], *disk.shape))))


def motion_blur(images: NDArray[np.floating], severity: int, rng: np.random.Generator) -> Images:
    """Blur along a line segment of fixed length at a random angle per image."""
    x = _check(images, severity)
    length = _MOTION_LENGTH[severity - 1]
    half = length / 2.0
    angles = rng.uniform(0.0, np.pi, x.shape[0])
    kernels = []
    for angle in angles:
        dy, dx = np.sin(angle), np.cos(angle)

        def on_segment(yy: NDArray, xx: NDArray, dy: float = dy, dx: float = dx) -> NDArray:
            along = yy * dy + xx * dx
            across = np.abs(yy * dx - xx * dy)
            return ((np.abs(along) <= half) & (across <= 0.5)) * 1.0

        kernels.append(_supersampled_kernel(on_segment, half))
    return _done(_filter(x, np.stack(kernels)))


def contrast(images: NDArray[np.floating], severity: int, rng: np.random.Generator) -> Images:
    """Pull every pixel towards the image mean: ``(x - mean) c + mean``."""
    x = _check(images, severity)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return _done((x - mean) * _CONTRAST_FACTOR[severity - 1] + mean)


def brightness(images: NDArray[np.floating], severity: int, rng: np.random.Generator) -> Images:
    """Add a constant to every pixel (clipped at 1)."""
    x = _check(images, severity)
    return _done(x + _BRIGHTNESS_SHIFT[severity - 1])


def _per_image(x: NDArray[np.float64], fn: Callable[[Image.Image], Image.Image]) -> NDArray:
    return np.stack([np.asarray(fn(Image.fromarray(img[0].astype(np.float32))))[None] for img in x])


def pixelate(images: NDArray[np.floating], severity: int, rng: np.random.Generator) -> Images:
    """Box-downsample by a factor, then upsample back with nearest neighbour."""
    x = _check(images, severity)
    h, w = x.shape[2:]
    f = _PIXELATE_FACTOR[severity - 1]
    small = (max(1, round(w * f)), max(1, round(h * f)))
    return _done(
        _per_image(
            x,
            lambda im: im.resize(small, Image.Resampling.BOX).resize(
                (w, h), Image.Resampling.NEAREST
            ),
        ).astype(np.float64)
    )


def jpeg_compression(
    images: NDArray[np.floating], severity: int, rng: np.random.Generator
) -> Images:
    """Round-trip through 8-bit JPEG at a low quality (blocking and ringing artefacts)."""
    x = _check(images, severity)
    quality = _JPEG_QUALITY[severity - 1]
    out = np.empty_like(x)
    for i, img in enumerate(x):
        gray = Image.fromarray(np.round(np.clip(img[0], 0, 1) * 255).astype(np.uint8))
        buffer = io.BytesIO()
        gray.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[i, 0] = np.asarray(decoded.convert("L"), dtype=np.float64) / 255.0
    return _done(out)


def _gaussian_smooth(field: NDArray[np.float64], sigma: float) -> NDArray[np.float64]:
    """Separable Gaussian smoothing of (N, H, W) fields, reflect padding."""
    r = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        padded = np.pad(field, pad, mode="reflect")
        size = field.shape[axis]
        field = sum(
            t * np.take(padded, np.arange(i, i + size), axis=axis) for i, t in enumerate(taps)
        )
    return field


def _bilinear(x: NDArray[np.float64], yy: NDArray, xx: NDArray) -> NDArray[np.float64]:
    """Sample images (N, H, W) at real coordinates (N, H, W), clamping at the border."""
    n, h, w = x.shape
    yy = np.clip(yy, 0, h - 1)
    xx = np.clip(xx, 0, w - 1)
    y0 = np.minimum(np.floor(yy).astype(np.int64), h - 2)
    x0 = np.minimum(np.floor(xx).astype(np.int64), w - 2)
    fy, fx = yy - y0, xx - x0
    idx = np.arange(n)[:, None, None]
    top = x[idx, y0, x0] * (1 - fx) + x[idx, y0, x0 + 1] * fx
    bottom = x[idx, y0 + 1, x0] * (1 - fx) + x[idx, y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def elastic_transform(
    images: NDArray[np.floating], severity: int, rng: np.random.Generator
) -> Images:
    """Warp by a smooth random displacement field (RMS displacement grows with severity)."""
    x = _check(images, severity)
    n, _, h, w = x.shape
    shifts = []
    for _ in range(2):
        field = _gaussian_smooth(rng.uniform(-1.0, 1.0, (n, h, w)), _ELASTIC_SMOOTH)
        rms = np.sqrt((field**2).mean(axis=(1, 2), keepdims=True))
        shifts.append(field / np.where(rms > 0, rms, 1.0) * _ELASTIC_PIXELS[severity - 1])
    grid_y, grid_x = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w), indexing="ij")
    warped = _bilinear(x[:, 0], grid_y[None] + shifts[0], grid_x[None] + shifts[1])
    return _done(warped[:, None])


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "elastic_transform": elastic_transform,
}
"""Every corruption by name, in the order of the report."""


def corrupt(images: NDArray[np.floating], name: str, severity: int, seed: int = 0) -> Images:
    """Apply corruption ``name`` at ``severity`` with a generator seeded by
    (seed, corruption index, severity), so each setting is reproducible on its own."""
    if name not in CORRUPTIONS:
        raise InvalidInputError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    index = list(CORRUPTIONS).index(name)
    rng = np.random.default_rng([seed, index, severity])
    return CORRUPTIONS[name](images, severity, rng)


def with_corruptions(
    images: NDArray[np.floating],
    labels: NDArray[np.integer],
    seed: int = 0,
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS),
    severities: tuple[int, ...] = SEVERITIES,
    include_clean: bool = True,
) -> tuple[Images, NDArray[np.int64]]:
    """The images as they are (unless ``include_clean`` is False), followed by every
    (corruption, severity) copy of them: a "shifted traffic" mix for calibrating on data
    harder than the clean split."""
    parts = [np.asarray(images, np.float32)] if include_clean else []
    for name in corruptions:
        for severity in severities:
            parts.append(corrupt(images, name, severity, seed))
    return np.concatenate(parts), np.tile(np.asarray(labels, np.int64), len(parts))
