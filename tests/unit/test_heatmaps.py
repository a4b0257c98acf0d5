"""Specification of gradtrust.core.heatmaps (closed forms) and of the autograd reference
in tests/reference/autograd_heatmaps.py.

Three layers of evidence:

1. A pure-torch reference written in this file from the *definitions* of ``scores.md``
   (a forward hook, ``torch.autograd.grad`` one sample and one class at a time,
   ``F.interpolate``, ``torch.var``) agrees with :func:`autograd_explain` on GAP and
   non-GAP models. It shares no code with the package beyond the model.
2. The closed forms (no backward pass) agree with :func:`autograd_explain` on random
   conv -> ReLU -> GAP -> Linear models and on the trained demo model.
3. Hand-derived small cases pin the conventions: signs, ReLU/upsampling/min-max order,
   the VOICE statistics and their degenerate values, and the error messages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradtrust import InvalidInputError
from gradtrust.core import heatmaps as H
from gradtrust.tools.demo.cnn import load_demo_model
from tests.reference.autograd_heatmaps import autograd_explain

ATOL = 1e-5  # the contract; observed agreement on random models is ~1e-15
REPO = Path(__file__).resolve().parents[2]
DEMO_ONNX = REPO / "model_repository" / "gradtrust_mnist" / "1" / "model.onnx"
DEMO_STATE = REPO / "model_repository" / "gradtrust_mnist" / "demo_cnn.pt"


# --------------------------------------------------------------------------- models


class GapNet(nn.Module):
    """conv -> ReLU (the explained block) -> global average pooling -> linear head."""

    def __init__(self, classes: int, seed: int, channels: int = 6) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.block = nn.Sequential(nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(channels, classes)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=gen))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean(dim=(2, 3)))


class FlattenNet(nn.Module):
    """A head that is *not* GAP + linear (flatten + linear): only autograd can explain it."""

    def __init__(self, classes: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.block = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 4, classes))
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def _images(n: int, seed: int, size: tuple[int, int] = (9, 7)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.rand(n, 1, *size, generator=gen, dtype=torch.float64)


def _closed_form_inputs(model: GapNet, x: torch.Tensor) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        activation = model.block(x).numpy()
        logits = model(x).numpy()
    return activation, model.head.weight.detach().numpy(), logits


# --------------------------------------------------------------------------- pure-torch reference


def _finish(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    up = F.interpolate(F.relu(raw)[None, None], size=size, mode="bilinear", align_corners=False)[
        0, 0
    ]
    low, high = up.min(), up.max()
    return (up - low) / (high - low) if high > low else torch.zeros_like(up)


def _reference(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, method: str, q: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Each definition of scores.md, literally, one sample and one target at a time."""
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    z = model(x)
    handle.remove()
    a = store["a"]
    size = (x.shape[2], x.shape[3])
    maps, stats = [], []
    for n in range(x.shape[0]):
        ranked = torch.argsort(z[n], descending=True)
        pred = int(ranked[0])

        def cam(target: torch.Tensor, n: int = n) -> torch.Tensor:
            (grad,) = torch.autograd.grad(target, a, retain_graph=True)
            return (grad[n].mean(dim=(1, 2))[:, None, None] * a[n]).sum(0).detach()

        def ce(cls: int, n: int = n) -> torch.Tensor:
            return F.cross_entropy(z[n : n + 1], torch.tensor([cls]))

        explanation = _finish(cam(z[n, pred]), size)
        if method == "gradcam":
            maps.append(explanation)
        elif method == "counterfactual":
            maps.append(_finish(-cam(z[n, pred]), size))
        elif method == "contrast":
            maps.append(_finish(cam(ce(int(ranked[1]) if q is None else q)), size))
        else:
            others = [_finish(cam(ce(c)), size) for c in range(z.shape[1]) if c != pred]
            if len(others) < 2:
                uncertainty = torch.zeros(size, dtype=torch.float64)
            else:
                uncertainty = _finish(torch.stack(others).var(dim=0, unbiased=True), size)
            std = uncertainty.std(unbiased=False)
            snr = float(uncertainty.mean() / std) if std > 0 else 0.0
            on_u, on_e = uncertainty >= 0.1, explanation >= 0.1
            union = int((on_u | on_e).sum())
            iou = int((on_u & on_e).sum()) / union if union else 0.0
            maps.append(uncertainty)
            stats.append([snr, iou])
    return torch.stack(maps).numpy(), (np.array(stats) if method == "voice" else None)


# --------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("method", H.METHODS)
@pytest.mark.parametrize("classes", [2, 3, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_autograd_explain_matches_torch_definition_when_random_gap_model(
    method: str, classes: int, seed: int
) -> None:
    model, x = GapNet(classes, seed), _images(4, seed)
    maps, stats = autograd_explain(model, model.block, x, method)
    ref_maps, ref_stats = _reference(model, model.block, x, method)
    np.testing.assert_allclose(maps, ref_maps, atol=ATOL, rtol=0)
    if method == "voice":
        assert stats is not None and ref_stats is not None
        np.testing.assert_allclose(stats, ref_stats, atol=ATOL, rtol=0)
    else:
        assert stats is None


@pytest.mark.parametrize("method", H.METHODS)
def test_autograd_explain_matches_torch_definition_when_head_is_not_gap(method: str) -> None:
    model, x = FlattenNet(5, seed=3), _images(3, 3)
    maps, stats = autograd_explain(model, model.block, x, method)
    ref_maps, ref_stats = _reference(model, model.block, x, method)
    np.testing.assert_allclose(maps, ref_maps, atol=ATOL, rtol=0)
    if method == "voice":
        np.testing.assert_allclose(stats, ref_stats, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", H.METHODS)
@pytest.mark.parametrize("classes", [2, 3, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_explain_closed_form_matches_autograd_when_random_gap_model(
    method: str, classes: int, seed: int
) -> None:
    model, x = GapNet(classes, seed), _images(5, seed)
    activation, weight, logits = _closed_form_inputs(model, x)
    maps, stats = H.explain(method, activation, weight, logits, (9, 7))
    ref_maps, ref_stats = autograd_explain(model, model.block, x, method)
    np.testing.assert_allclose(maps, ref_maps, atol=ATOL, rtol=0)
    if method == "voice":
        assert stats is not None and ref_stats is not None
        np.testing.assert_allclose(stats, ref_stats, atol=ATOL, rtol=0)
    else:
        assert stats is None


@pytest.mark.parametrize("q", [0, 4, 9])
def test_explain_contrast_matches_autograd_when_contrast_class_named(q: int) -> None:
    model, x = GapNet(10, seed=7), _images(4, 7)
    activation, weight, logits = _closed_form_inputs(model, x)
    maps, _ = H.explain("contrast", activation, weight, logits, (9, 7), contrast_class=q)
    np.testing.assert_allclose(maps, _reference(model, model.block, x, "contrast", q)[0], atol=ATOL)
    np.testing.assert_allclose(
        maps, autograd_explain(model, model.block, x, "contrast", contrast_class=q)[0], atol=ATOL
    )


def test_explain_contrast_uses_one_class_per_sample_when_contrast_class_is_an_array() -> None:
    model, x = GapNet(6, seed=8), _images(3, 8)
    activation, weight, logits = _closed_form_inputs(model, x)
    targets = np.array([5, 0, 2])
    maps, _ = H.explain("contrast", activation, weight, logits, (9, 7), contrast_class=targets)
    for n, q in enumerate(targets):
        alone, _ = H.explain("contrast", activation, weight, logits, (9, 7), contrast_class=int(q))
        np.testing.assert_allclose(maps[n], alone[n], atol=1e-12)


def test_explain_contrast_defaults_to_second_most_probable_class_when_no_class_named() -> None:
    model, x = GapNet(10, seed=9), _images(4, 9)
    activation, weight, logits = _closed_form_inputs(model, x)
    second = np.argsort(-logits, axis=1)[:, 1]
    default, _ = H.explain("contrast", activation, weight, logits, (9, 7))
    named, _ = H.explain("contrast", activation, weight, logits, (9, 7), contrast_class=second)
    np.testing.assert_array_equal(default, named)
    np.testing.assert_array_equal(H.contrast_targets(logits), second)


# --------------------------------------------------------------------------- hand-derived cases


def test_gradcam_equals_hand_computed_map_when_one_channel_and_no_resizing() -> None:
    # K = 1, h x w = 2 x 2: raw = W_P / 4 * A; with W_P = 2 the ReLU keeps [1, 0.5, 0, 0].
    activation = np.array([[[[2.0, 1.0], [-3.0, 0.0]]]])
    weight = np.array([[-1.0], [2.0]])
    logits = np.array([[0.0, 1.0]])  # P = 1
    maps, _ = H.explain("gradcam", activation, weight, logits, (2, 2))
    np.testing.assert_allclose(maps[0], [[1.0, 0.5], [0.0, 0.0]])
    counter, _ = H.explain("counterfactual", activation, weight, logits, (2, 2))
    np.testing.assert_allclose(counter[0], [[0.0, 0.0], [1.0, 0.0]])


def test_contrast_highlights_evidence_for_prediction_against_contrast_class() -> None:
    # Channel 0 fires on the left and supports class 0 (= P); channel 1 fires on the right
    # and supports class 1 (= Q). "Why 0 rather than 1?" must point left, not right.
    activation = np.zeros((1, 2, 2, 2))
    activation[0, 0, :, 0] = 1.0
    activation[0, 1, :, 1] = 1.0
    weight = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    logits = np.array([[3.0, 2.0, -5.0]])
    maps, _ = H.explain("contrast", activation, weight, logits, (2, 2), contrast_class=1)
    np.testing.assert_allclose(maps[0], [[1.0, 0.0], [1.0, 0.0]])


def test_finish_maps_applies_relu_before_upsampling_when_map_has_negative_values() -> None:
    raw = np.array([[[1.0, -1.0]]])
    up = H.finish_maps(raw, (1, 4))
    # ReLU first: [1, 0] -> [1, 0.75, 0.25, 0] (half-pixel centres), already spanning [0, 1].
    np.testing.assert_allclose(up[0, 0], [1.0, 0.75, 0.25, 0.0])


@pytest.mark.parametrize(
    ("in_size", "out_size"),
    [((7, 7), (28, 28)), ((3, 5), (10, 4)), ((6, 6), (4, 9)), ((1, 1), (3, 2))],
)
def test_upsample_bilinear_equals_torch_interpolate_when_sizes_vary(
    in_size: tuple[int, int], out_size: tuple[int, int]
) -> None:
    maps = np.random.default_rng(0).normal(size=(2, 3, *in_size))
    expected = F.interpolate(
        torch.from_numpy(maps), size=out_size, mode="bilinear", align_corners=False
    ).numpy()
    np.testing.assert_allclose(H.upsample_bilinear(maps, out_size), expected, atol=1e-12)


def test_minmax_normalize_scales_each_map_alone_and_zeroes_constant_maps() -> None:
    maps = np.array([[[2.0, 4.0], [3.0, 6.0]], [[5.0, 5.0], [5.0, 5.0]]])
    out = H.minmax_normalize(maps)
    np.testing.assert_allclose(out[0], [[0.0, 0.5], [0.25, 1.0]])
    np.testing.assert_array_equal(out[1], np.zeros((2, 2)))


def test_voice_statistics_equal_hand_computed_values_when_small_maps() -> None:
    voice = np.array([[[0.0, 1.0], [0.5, 0.05]]])
    explanation = np.array([[[1.0, 1.0], [0.0, 0.2]]])
    stats = H.voice_statistics(voice, explanation)
    values = np.array([0.0, 1.0, 0.5, 0.05])
    # on(voice) = {1, 2}, on(explanation) = {0, 1, 3}: intersection 1, union 4.
    np.testing.assert_allclose(stats, [[values.mean() / values.std(), 0.25]])


def test_voice_statistics_are_zero_when_maps_are_empty() -> None:
    zeros = np.zeros((1, 3, 3))
    np.testing.assert_array_equal(H.voice_statistics(zeros, zeros), [[0.0, 0.0]])


def test_voice_is_all_zero_when_only_two_classes() -> None:
    model, x = GapNet(2, seed=4), _images(3, 4)
    activation, weight, logits = _closed_form_inputs(model, x)
    maps, stats = H.explain("voice", activation, weight, logits, (9, 7))
    assert stats is not None
    np.testing.assert_array_equal(maps, 0.0)
    np.testing.assert_array_equal(stats[:, 0], 0.0)


def test_voice_maps_equal_variance_of_finished_maps_when_computed_by_hand() -> None:
    raw = np.random.default_rng(5).normal(size=(3, 12, 4, 4))
    predicted = np.array([0, 5, 11])
    finished = H.finish_maps(raw, (8, 8))
    expected = np.stack(
        [
            H.minmax_normalize(np.var(np.delete(finished[n], p, axis=0), axis=0, ddof=1))
            for n, p in enumerate(predicted)
        ]
    )
    np.testing.assert_allclose(H.voice_maps(raw, predicted, (8, 8)), expected, atol=1e-12)


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("method", H.METHODS)
def test_explain_maps_lie_in_unit_interval_and_span_it_when_maps_are_not_empty(
    method: str,
) -> None:
    model, x = GapNet(10, seed=11), _images(6, 11, size=(16, 16))
    maps, _ = H.explain(method, *_closed_form_inputs(model, x), (16, 16))
    assert maps.shape == (6, 16, 16) and maps.dtype == np.float64
    assert np.all(maps >= 0.0) and np.all(maps <= 1.0)
    for sample in maps:
        assert sample.max() in (0.0, 1.0) and sample.min() == 0.0


@pytest.mark.parametrize("method", H.METHODS)
def test_explain_does_not_mutate_inputs_when_called(method: str) -> None:
    model, x = GapNet(4, seed=12), _images(3, 12)
    inputs = _closed_form_inputs(model, x)
    copies = [a.copy() for a in inputs]
    H.explain(method, *inputs, (9, 7))
    for before, after in zip(copies, inputs, strict=True):
        np.testing.assert_array_equal(before, after)
    x_before = x.clone()
    autograd_explain(model, model.block, x, method)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("method", H.METHODS)
def test_explain_is_per_sample_when_other_samples_join_the_batch(method: str) -> None:
    model = GapNet(10, seed=13)
    x = _images(5, 13)
    activation, weight, logits = _closed_form_inputs(model, x)
    batch_maps, batch_stats = H.explain(method, activation, weight, logits, (9, 7))
    for n in range(5):
        maps, stats = H.explain(method, activation[n : n + 1], weight, logits[n : n + 1], (9, 7))
        np.testing.assert_allclose(maps[0], batch_maps[n], atol=1e-12)
        if stats is not None and batch_stats is not None:
            np.testing.assert_allclose(stats[0], batch_stats[n], atol=1e-12)


def test_autograd_explain_restores_train_mode_when_model_was_training() -> None:
    model = GapNet(3, seed=14).train()
    autograd_explain(model, model.block, _images(2, 14), "gradcam")
    assert model.training


# --------------------------------------------------------------------------- errors


def _small_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model, x = GapNet(10, seed=15), _images(2, 15)
    return _closed_form_inputs(model, x)


def test_explain_raises_listing_valid_methods_when_method_unknown() -> None:
    with pytest.raises(InvalidInputError, match="gradcam, counterfactual, contrast, voice"):
        H.explain("saliency", *_small_inputs(), (9, 7))
    model = GapNet(3, seed=0)
    with pytest.raises(InvalidInputError, match="unknown heatmap method 'saliency'"):
        autograd_explain(model, model.block, _images(1, 0), "saliency")


@pytest.mark.parametrize("bad", [10, -1, np.array([3, 12])])
def test_explain_raises_saying_valid_range_when_contrast_class_out_of_range(bad: object) -> None:
    with pytest.raises(InvalidInputError, match=r"out of range: valid classes are 0\.\.9"):
        H.explain("contrast", *_small_inputs(), (9, 7), contrast_class=bad)
    model = GapNet(10, seed=0)
    with pytest.raises(InvalidInputError, match=r"valid classes are 0\.\.9"):
        autograd_explain(model, model.block, _images(2, 0), "contrast", contrast_class=bad)


def test_explain_raises_when_contrast_class_given_to_another_method() -> None:
    with pytest.raises(InvalidInputError, match="only used by method 'contrast'"):
        H.explain("gradcam", *_small_inputs(), (9, 7), contrast_class=1)


def test_explain_raises_when_shapes_disagree() -> None:
    activation, weight, logits = _small_inputs()
    with pytest.raises(InvalidInputError, match="samples"):
        H.explain("gradcam", activation, weight, logits[:1], (9, 7))
    with pytest.raises(InvalidInputError, match="input channels"):
        H.explain("gradcam", activation, weight[:, :-1], logits, (9, 7))
    with pytest.raises(InvalidInputError, match="size must be two positive integers"):
        H.explain("gradcam", activation, weight, logits, (0, 7))
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        H.explain("gradcam", np.full_like(activation, np.nan), weight, logits, (9, 7))


# --------------------------------------------------------------------------- trained demo model


@pytest.fixture(scope="module")
def demo_outputs(digits: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """The served ONNX model's logits and activation (float32) on the 128 fixture digits."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(DEMO_ONNX), options, providers=["CPUExecutionProvider"])
    logits, activation = session.run(["logits", "activation"], {"image": digits[0]})
    return {"logits": logits, "activation": activation}


@pytest.mark.parametrize("method", H.METHODS)
def test_explain_closed_form_matches_autograd_when_trained_demo_model(
    method: str, digits: tuple[np.ndarray, np.ndarray], demo_outputs: dict[str, np.ndarray]
) -> None:
    model = load_demo_model(DEMO_STATE).double()
    weight = model.head.weight.detach().numpy()
    maps, stats = H.explain(
        method, demo_outputs["activation"], weight, demo_outputs["logits"], (28, 28)
    )
    # Reference: float64 autograd through the whole torch model, layer = last conv block.
    # The closed form starts from onnxruntime's float32 activation: observed gap <= 7e-6.
    images = digits[0].astype(np.float64)
    ref_maps, ref_stats = autograd_explain(model, model.body[-1], images, method)
    assert maps.shape == (128, 28, 28)
    np.testing.assert_allclose(maps, ref_maps, atol=ATOL, rtol=0)
    if method == "voice":
        assert stats is not None and ref_stats is not None
        np.testing.assert_allclose(stats, ref_stats, atol=ATOL, rtol=0)
    # From torch's own float64 activation the closed form is exact: the gap above is float32.
    with torch.no_grad():
        logits, _, activation = model.forward_all(torch.from_numpy(images))
    exact, exact_stats = H.explain(method, activation.numpy(), weight, logits.numpy(), (28, 28))
    np.testing.assert_allclose(exact, ref_maps, atol=1e-10, rtol=0)
    if method == "voice":
        np.testing.assert_allclose(exact_stats, ref_stats, atol=1e-10, rtol=0)
