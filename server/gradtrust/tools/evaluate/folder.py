"""Labelled images from a folder, read the way the server reads them.

``gradtrust calibrate --data FOLDER`` and ``gradtrust evaluate --data FOLDER`` take one
sub-folder per class (torchvision's ImageFolder layout), named as in the entry's
``labels.txt``. Each PNG or JPEG file is decoded by the server's own code for the
``IMAGE_BYTES`` input (:func:`gradtrust.serving.decoding.decode_image`: EXIF orientation,
grey or colour conversion, resize) with the entry's config parameters, so the numbers a
calibration is fitted on are the numbers the server will see.

The images are kept as pixels in [0, 1], channels first, which is what the corruptions of
:mod:`gradtrust.tools.evaluate.shifts` take; :class:`EntryPreprocessing` turns them into
the network's input with the entry's normalisation
(:func:`gradtrust.serving.decoding.preprocess`), after rounding to 8-bit pixels as an image
file would hold them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.decoding import Dim, PreprocessSpec, decode_image, preprocess
from gradtrust.tools.evaluate.repository import read_config_parameters
from gradtrust.tools.evaluate.runner import LabelledData

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
Images = NDArray[np.float32]


def entry_labels(entry: str | os.PathLike[str]) -> tuple[str, ...]:
    """The class names of a model entry, one per line of its labels.txt."""
    path = Path(entry) / "labels.txt"
    if not path.is_file():
        raise ConfigError(f"{path} not found: an entry needs labels.txt (one class per line)")
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def entry_spec(
    entry: str | os.PathLike[str], input_shape: Sequence[Dim], dtype: str = "float32"
) -> PreprocessSpec:
    """The entry's preprocessing (its ``image_*`` config parameters), for a network whose
    per-sample input shape is ``input_shape``."""
    params = read_config_parameters(Path(entry) / "config.pbtxt")
    return PreprocessSpec.from_parameters(params, input_shape, dtype)


@dataclass(frozen=True)
class EntryPreprocessing:
    """Pixels in [0, 1] (N, channels, H, W) -> the network input, as the server makes it
    from an image file with these pixels."""

    spec: PreprocessSpec

    def __call__(self, images: NDArray[np.floating]) -> NDArray[np.floating]:
        pixels = np.rint(np.clip(np.asarray(images, np.float64), 0.0, 1.0) * 255.0)
        return preprocess(pixels.astype(np.uint8).transpose(0, 2, 3, 1), self.spec)


def read_image_folder(
    folder: str | os.PathLike[str], labels: Sequence[str], spec: PreprocessSpec
) -> tuple[Images, NDArray[np.int64], list[Path]]:
    """Every image under ``folder/<class name>/``: pixels in [0, 1] (N, channels, H, W),
    the class index of each (its position in ``labels``), and the files, sorted by path.

    Refuses, naming them, sub-folders that are not classes of the entry and classes with
    no sub-folder; refuses an unreadable file by its path. Files that are not .png, .jpg
    or .jpeg are skipped.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder of class sub-folders")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in present if name not in labels]
    missing = [name for name in labels if name not in present]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"sub-folder(s) {unknown} are not classes of the entry")
        if missing:
            parts.append(f"class(es) {missing} have no sub-folder")
        raise ConfigError(
            f"{root}: {'; '.join(parts)}. Name one sub-folder per line of the entry's "
            f"labels.txt ({', '.join(labels)})"
        )
    files = [
        (path, labels.index(name))
        for name in present
        for path in sorted((root / name).rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise ConfigError(f"{root} holds no .png, .jpg or .jpeg files in its class sub-folders")
    pixels = []
    for path, _ in tqdm(files, desc=f"read {root.name}", unit="img", leave=False):
        try:
            pixels.append(decode_image(path.read_bytes(), spec))
        except (InvalidInputError, OSError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from None
    sizes = sorted({p.shape for p in pixels})
    if len(sizes) > 1:
        raise ConfigError(
            f"{root}: images of different sizes {sizes[:4]} and the entry does not resize: "
            "set the config parameter image_resize, or resize the files"
        )
    images = np.stack(pixels).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return images, np.array([i for _, i in files], np.int64), [p for p, _ in files]


def stratified_split(
    labels: NDArray[np.int64], fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(calibration indices, held-out indices): about ``fraction`` of every class held out,
    seeded, each sorted."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 13])
    held: list[NDArray[np.int64]] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        held.append(members[: int(round(fraction * members.size))])
    out = np.sort(np.concatenate(held)).astype(np.int64)
    keep = np.setdiff1d(np.arange(labels.size), out).astype(np.int64)
    return keep, out


def folder_data(
    folder: str | os.PathLike[str],
    entry: str | os.PathLike[str],
    input_shape: Sequence[Dim],
    dtype: str = "float32",
    heldout_fraction: float = 0.4,
    seed: int = 0,
) -> LabelledData:
    """A labelled image folder split, per class and seeded, into a calibration part and a
    held-out ("test") part of about ``heldout_fraction``, read for the model ``entry``."""
    spec = entry_spec(entry, input_shape, dtype)
    images, labels, _ = read_image_folder(folder, entry_labels(entry), spec)
    keep, held = stratified_split(labels, heldout_fraction, seed)
    return LabelledData(
        f"{folder} ({labels.size} images: calibration {keep.size}, held out {held.size})",
        images[held],
        labels[held],
        images[keep],
        labels[keep],
        to_input=EntryPreprocessing(spec),
    )
