"""A zoo of small torch classifiers, exported to ONNX and prepared in process.

The zoo covers the shapes of head ``gradtrust prepare`` must find: an MLP, CNNs with global
average pooling or with Flatten before the linear head, a trailing Softmax or LogSoftmax,
NHWC input, Dropout, a residual block, a hand-written MatMul + Add head, a graph exported
with a fixed batch of 1, and class counts from 2 to 12. The serving test
(tests/integration/test_prepare_serving.py) serves the same zoo from a real tritonserver.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from gradtrust.serving.classifier import head_weight_from_onnx
from gradtrust.serving.contract import ACTIVATION, FEATURES, LOGITS
from gradtrust.tools.prepare import prepare_onnx


class ToNCHW(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class SpatialMean(nn.Module):
    """Global average pooling written as a mean (exports as ReduceMean, not GlobalAveragePool)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class MatMulHead(nn.Module):
    """``features @ W + b`` by hand: exports as MatMul + Add instead of Gemm."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, classes) * 0.5)
        self.bias = nn.Parameter(torch.randn(classes) * 0.1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight + self.bias


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


@dataclass(frozen=True)
class ZooModel:
    """One classifier of the zoo and how to prepare and check it."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]  # per-sample input shape in the model's layout
    classes: int
    layout: str = "NCHW"
    heatmap_layer: str | None = None  # dotted module path of the activation A, if GAP head
    tail: tuple[str, ...] = ()
    dynamic_batch: bool = True

    def model(self) -> nn.Module:
        torch.manual_seed(sum(map(ord, self.name)))
        model = self.build()
        for module in model.modules():  # non-trivial BatchNorm statistics, then inference
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        return model.eval()

    def images(self, n: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).random((n, *self.shape)).astype(np.float32)


ZOO: tuple[ZooModel, ...] = (
    ZooModel(
        "mlp",
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3)),
        (1, 8, 8),
        3,
    ),
    ZooModel(
        "gap_cnn",
        lambda: nn.Sequential(
            _conv(1, 8), _conv(8, 12), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10)
        ),
        (1, 12, 12),
        10,
        heatmap_layer="1",
    ),
    ZooModel(
        "flatten_cnn",
        lambda: nn.Sequential(_conv(3, 4), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 25, 4)),
        (3, 10, 10),
        4,
        dynamic_batch=False,
    ),
    ZooModel(
        "softmax_cnn",
        lambda: nn.Sequential(
            _conv(3, 6),
            nn.MaxPool2d(2),
            _conv(6, 8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 5),
            nn.Softmax(dim=1),
        ),
        (3, 10, 12),
        5,
        heatmap_layer="2",
        tail=("Softmax",),
    ),
    ZooModel(
        "nhwc_cnn",
        lambda: nn.Sequential(
            ToNCHW(), _conv(3, 8), SpatialMean(), nn.Linear(8, 6), nn.LogSoftmax(dim=1)
        ),
        (10, 8, 3),
        6,
        layout="NHWC",
        heatmap_layer="1",
        tail=("LogSoftmax",),
    ),
    ZooModel(
        "dropout_cnn",
        lambda: nn.Sequential(
            _conv(1, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 7)
        ),
        (1, 9, 9),
        7,
        heatmap_layer="0",
    ),
    ZooModel(
        "residual_cnn",
        lambda: nn.Sequential(
            _conv(3, 8), Residual(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
        ),
        (3, 8, 8),
        2,
        heatmap_layer="1",
    ),
    ZooModel(
        "matmul_head",
        lambda: nn.Sequential(_conv(1, 6), SpatialMean(), MatMulHead(6, 12)),
        (1, 8, 8),
        12,
        heatmap_layer="0",
    ),
)
ZOO_BY_NAME = {z.name: z for z in ZOO}


def export(entry: ZooModel, model: nn.Module, path: Path) -> Path:
    """Export with the legacy exporter, opset 17, dynamic batch unless the entry says not."""
    dynamic = {"input": {0: "n"}, "output": {0: "n"}} if entry.dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1 if not entry.dynamic_batch else 2, *entry.shape),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=dynamic,
        )
    return path


def linear_head(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(W (C, D), b) of the zoo model's last linear layer, as z = h @ W.T + b."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear | MatMulHead)][-1]
    if isinstance(last, MatMulHead):
        return last.weight.detach().numpy().T, last.bias.detach().numpy()
    return last.weight.detach().numpy(), last.bias.detach().numpy()


def torch_outputs(entry: ZooModel, model: nn.Module, images: np.ndarray) -> dict[str, np.ndarray]:
    """Logits, features and activation (NCHW) of the torch model, in float64."""
    model64 = model.double()
    captured: dict[str, torch.Tensor] = {}
    layer = model64.get_submodule(entry.heatmap_layer) if entry.heatmap_layer else None
    handles = []
    if layer is not None:
        handles.append(layer.register_forward_hook(lambda m, i, o: captured.update(a=o)))
    head = [m for m in model64.modules() if isinstance(m, nn.Linear | MatMulHead)][-1]
    handles.append(head.register_forward_hook(lambda m, i, o: captured.update(h=i[0], z=o)))
    try:
        with torch.no_grad():
            model64(torch.from_numpy(images.astype(np.float64)))
    finally:
        for handle in handles:
            handle.remove()
        model.float()
    out = {LOGITS: captured["z"].numpy(), FEATURES: captured["h"].numpy()}
    if "a" in captured:
        out[ACTIVATION] = captured["a"].numpy()
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    folder = tmp_path_factory.mktemp("zoo")
    return {z.name: (m := z.model(), export(z, m, folder / f"{z.name}.onnx")) for z in ZOO}


@pytest.mark.parametrize("entry", ZOO, ids=[z.name for z in ZOO])
def test_prepare_onnx_exposes_torch_logits_features_and_activation_when_given_zoo_model(
    entry, exported
):
    model, path = exported[entry.name]
    prepared = prepare_onnx(path, layout=entry.layout)
    assert prepared.num_classes == entry.classes
    assert prepared.head.tail == entry.tail
    assert prepared.heatmaps == (entry.heatmap_layer is not None)
    names = [o.name for o in prepared.model.graph.output]
    assert names == [LOGITS, FEATURES] + ([ACTIVATION] if prepared.heatmaps else [])
    images = entry.images(5)
    session = ort.InferenceSession(
        prepared.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    got = dict(zip(names, session.run(names, {session.get_inputs()[0].name: images}), strict=True))
    want = torch_outputs(entry, model, images)
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("entry", ZOO, ids=[z.name for z in ZOO])
def test_prepare_onnx_stores_the_torch_head_weight_when_given_zoo_model(entry, exported, tmp_path):
    model, path = exported[entry.name]
    prepared = prepare_onnx(path, layout=entry.layout)
    import onnx

    onnx.save(prepared.model, tmp_path / "prepared.onnx")
    weight, bias = linear_head(model)
    np.testing.assert_allclose(head_weight_from_onnx(tmp_path / "prepared.onnx"), weight, rtol=1e-6)
    np.testing.assert_allclose(prepared.head.bias, bias, rtol=1e-6)


def test_prepare_onnx_gives_a_dynamic_batch_when_export_fixed_batch_one(exported):
    _, path = exported["flatten_cnn"]
    prepared = prepare_onnx(path)
    batch = prepared.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")
    assert prepared.max_batch_size is None
