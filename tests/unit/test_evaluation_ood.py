"""Shifted and out-of-distribution sets: real data from installed packages, no downloads."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrust.errors import ConfigError
from gradtrust.tools.evaluate import ood

EXPECTED = {
    "fashion_mnist": 20,
    "photos": 60,
    "photo_patches": 200,
    "letters": 9 * len(ood.LETTERS),
    "sklearn_digits": 1797,
}


@pytest.fixture(scope="module")
def sets():
    loaded, missing = ood.load_sets()
    assert missing == {}
    return loaded


@pytest.mark.parametrize("name", list(EXPECTED))
def test_image_set_holds_model_ready_images_when_loaded(name, sets):
    s = sets[name]
    assert s.images.shape == (EXPECTED[name], 1, 28, 28) and s.images.dtype == np.float32
    assert s.images.min() >= 0.0 and s.images.max() <= 1.0 and s.images.max() > 0.5
    assert s.source


def test_sklearn_digits_carry_balanced_labels_when_used_as_near_shift(sets):
    labels = sets["sklearn_digits"].labels
    assert labels is not None and set(np.unique(labels)) == set(range(10))
    assert np.bincount(labels).min() > 170
    assert all(sets[n].labels is None for n in EXPECTED if n != "sklearn_digits")


def test_mnist_frame_centres_the_mass_in_a_20_pixel_box_when_framing_ink():
    ink = np.zeros((50, 30), np.float32)
    ink[5:45, 2:12] = 1.0  # a tall bar in a corner
    frame = ood.mnist_frame(ink)
    rows, cols = np.flatnonzero(frame.max(1) > 0.05), np.flatnonzero(frame.max(0) > 0.05)
    assert rows.size <= 21 and cols.size <= 21
    cy = (frame.sum(1) * np.arange(28)).sum() / frame.sum()
    cx = (frame.sum(0) * np.arange(28)).sum() / frame.sum()
    assert abs(cy - 13.5) <= 0.5 and abs(cx - 13.5) <= 0.5


def test_letters_leave_out_digit_lookalikes_when_rendered():
    assert not set("OoIlSsZzBbgqDQiJjGT") & set(ood.LETTERS)


def test_load_sets_reports_a_missing_package_when_it_is_not_installed(monkeypatch):
    def missing(package: str):
        raise ConfigError(f"package {package!r} is not installed")

    monkeypatch.setattr(ood, "package_dir", missing)
    loaded, why = ood.load_sets(("fashion_mnist", "letters"))
    assert set(loaded) == {"letters"} and "foolbox" in why["fashion_mnist"]


def test_load_sets_refuses_a_name_when_it_is_unknown():
    with pytest.raises(ConfigError, match="unknown image set"):
        ood.load_sets(("cifar",))
