"""Shifted and out-of-distribution image sets for the MNIST demo, built only from real data
that ships inside installed packages (never a download at run time).

=============== ========================================================= ======== =========
set             source                                                    images   labels
=============== ========================================================= ======== =========
sklearn_digits  scikit-learn's 1797 real 8x8 digits (UCI), upscaled,        1797     yes (near
                contrast-stretched and framed like MNIST                           shift)
fashion_mnist   foolbox's 20 real Fashion-MNIST test images               20       no
photos          foolbox's 60 real CIFAR-10, CIFAR-100 and ImageNet        60       no
                images, grayscale, resized to 28 x 28
photo_patches   random crops of scikit-learn's two sample photos          200      no
letters         Latin letters rendered with Pillow's default font,        297      no
                framed like MNIST (letters that look like digits left out)
=============== ========================================================= ======== =========

scikit-image's textures are not used: scikit-image is not a dependency of this project.
A set whose package is missing is reported as unavailable with the reason, not skipped
silently. "Framed like MNIST" follows MNIST's own recipe: fit the ink's bounding box into
20 x 20 pixels keeping the aspect ratio, then place its centre of mass at the centre of a
28 x 28 black frame.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from gradtrust.errors import ConfigError

Images = NDArray[np.float32]
SIDE = 28
_BOX = 20
# Letters that a digit classifier could fairly read as a digit (0 O o D Q, 1 I l i j J,
# 2 Z z, 5 S s, 6 b G, 7 T, 8 B, 9 g q) are left out of the letters set.
LETTERS = "ACEFHKLMNPRUVWXYacdefhkmnprtuvwxy"


@dataclass(frozen=True)
class ImageSet:
    """Images float32 (N, 1, 28, 28) in [0, 1]; ``labels`` only for a labelled (near) shift."""

    name: str
    images: Images
    source: str
    labels: NDArray[np.int64] | None = None


def package_dir(package: str) -> Path:
    """The installed folder of ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(f"package {package!r} is not installed: `pip install -e '.[dev]'`")
    return Path(locations[0])


def mnist_frame(gray: NDArray[np.floating]) -> NDArray[np.float32]:
    """Frame white-on-black ink like MNIST: bounding box into 20 x 20, centre of mass at the
    centre of a 28 x 28 frame."""
    g = np.asarray(gray, dtype=np.float32)
    g = g / g.max() if g.max() > 0 else g
    rows, cols = np.flatnonzero(g.max(axis=1) > 0.05), np.flatnonzero(g.max(axis=0) > 0.05)
    if rows.size == 0:
        return np.zeros((SIDE, SIDE), np.float32)
    crop = g[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = _BOX / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    small = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR))
    small = np.clip(small, 0.0, 1.0)
    frame = np.zeros((SIDE, SIDE), np.float32)
    top, left = (SIDE - small.shape[0]) // 2, (SIDE - small.shape[1]) // 2
    frame[top : top + small.shape[0], left : left + small.shape[1]] = small
    mass = frame.sum()
    cy = float((frame.sum(axis=1) * np.arange(SIDE)).sum() / mass)
    cx = float((frame.sum(axis=0) * np.arange(SIDE)).sum() / mass)
    dy, dx = round((SIDE - 1) / 2 - cy), round((SIDE - 1) / 2 - cx)
    # Shift within the frame; the 4-pixel margin leaves room for the centring shift.
    return np.roll(frame, (dy, dx), axis=(0, 1))


def _stack(frames: list[NDArray[np.floating]]) -> Images:
    return np.clip(np.stack(frames), 0.0, 1.0).astype(np.float32)[:, None]


def _gray_resized(path: Path, box: tuple[int, int, int, int] | None = None) -> NDArray:
    with Image.open(path) as im:
        gray = im.convert("L")
        if box is not None:
            gray = gray.crop(box)
        return np.asarray(gray.resize((SIDE, SIDE), Image.Resampling.BOX), np.float32) / 255.0


def sklearn_digits() -> ImageSet:
    """scikit-learn's real 8x8 digits (0..16 intensities), upscaled and framed like MNIST."""
    path = package_dir("sklearn") / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    frames = []
    for row in table:
        small = (row[:64].reshape(8, 8) / 16.0).astype(np.float32)
        big = np.asarray(Image.fromarray(small).resize((40, 40), Image.Resampling.BICUBIC))
        # Stretch [0.3, 0.7] to [0, 1]: 8x8 digits upscaled are blurry blobs, MNIST strokes
        # saturate; without this the demo model reads 89 % of them as "8".
        frames.append(mnist_frame(np.clip((big - 0.3) / 0.4, 0.0, 1.0)))
    return ImageSet(
        "sklearn_digits",
        _stack(frames),
        "scikit-learn load_digits (1797 real 8x8 digits), bicubic x5, contrast-stretched, "
        "framed like MNIST",
        table[:, 64].astype(np.int64),
    )


def _foolbox_files(prefixes: tuple[str, ...]) -> list[Path]:
    folder = package_dir("foolbox") / "data"
    files = sorted(p for p in folder.iterdir() if p.name.startswith(prefixes))
    if not files:
        raise ConfigError(f"no {prefixes} images in {folder}: reinstall foolbox")
    return files


def fashion_mnist() -> ImageSet:
    """foolbox's 20 real Fashion-MNIST test images (28 x 28, already white on black)."""
    files = _foolbox_files(("fashionMNIST_",))
    return ImageSet(
        "fashion_mnist",
        _stack([_gray_resized(p) for p in files]),
        f"foolbox/data Fashion-MNIST ({len(files)} real test images)",
    )


def photos() -> ImageSet:
    """foolbox's real CIFAR-10, CIFAR-100 and ImageNet images, grayscale, box-resized to 28x28."""
    files = _foolbox_files(("cifar10_", "cifar100_", "imagenet_"))
    return ImageSet(
        "photos",
        _stack([_gray_resized(p) for p in files]),
        f"foolbox/data CIFAR-10, CIFAR-100, ImageNet ({len(files)} real photos), grayscale",
    )


def photo_patches(seed: int = 0, count: int = 200) -> ImageSet:
    """Random square crops (48..160 px) of scikit-learn's two sample photos, resized to 28x28."""
    folder = package_dir("sklearn") / "datasets" / "images"
    paths = sorted(folder.glob("*.jpg"))
    if not paths:
        raise ConfigError(f"no sample photos in {folder}: reinstall scikit-learn")
    rng = np.random.default_rng([seed, 7])
    frames = []
    for i in range(count):
        path = paths[i % len(paths)]
        with Image.open(path) as im:
            width, height = im.size
        side = int(rng.integers(48, 161))
        left, top = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        frames.append(_gray_resized(path, (left, top, left + side, top + side)))
    return ImageSet(
        "photo_patches",
        _stack(frames),
        f"{count} random crops of scikit-learn's sample photos "
        f"({', '.join(p.name for p in paths)})",
    )


def letters() -> ImageSet:
    """Letters in Pillow's default font, 3 stroke widths x 3 rotations, framed like MNIST."""
    font = ImageFont.load_default(size=40)
    frames = []
    for char in LETTERS:
        for stroke in (1, 2, 3):
            for angle in (-12.0, 0.0, 12.0):
                canvas = Image.new("L", (72, 72), 0)
                ImageDraw.Draw(canvas).text(
                    (36, 36),
                    char,
                    fill=255,
                    font=font,
                    anchor="mm",
                    stroke_width=stroke,
                    stroke_fill=255,
                )
                rotated = canvas.rotate(angle, resample=Image.Resampling.BILINEAR)
                frames.append(mnist_frame(np.asarray(rotated, np.float32) / 255.0))
    return ImageSet(
        "letters",
        _stack(frames),
        f"{len(LETTERS)} letters x 9 variants rendered with Pillow's default font",
    )


OOD_BUILDERS: dict[str, Callable[[int], ImageSet]] = {
    "fashion_mnist": lambda seed: fashion_mnist(),
    "photos": lambda seed: photos(),
    "photo_patches": photo_patches,
    "letters": lambda seed: letters(),
    "sklearn_digits": lambda seed: sklearn_digits(),
}
"""Every set by name. sklearn_digits is a *near* shift: labelled, so it is also scored as a
misprediction setting."""


def load_sets(
    names: tuple[str, ...] | None = None, seed: int = 0
) -> tuple[dict[str, ImageSet], dict[str, str]]:
    """Build the named sets (all by default); returns (sets, {name: why unavailable})."""
    sets: dict[str, ImageSet] = {}
    missing: dict[str, str] = {}
    for name in tuple(OOD_BUILDERS) if names is None else names:
        if name not in OOD_BUILDERS:
            raise ConfigError(f"unknown image set {name!r}; known: {', '.join(OOD_BUILDERS)}")
        try:
            sets[name] = OOD_BUILDERS[name](seed)
        except (ConfigError, OSError) as exc:
            missing[name] = str(exc)
    return sets, missing
