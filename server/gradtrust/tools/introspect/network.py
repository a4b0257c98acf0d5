"""The introspective network: a three-layer MLP on the introspective feature, whose first
layer is rank-R separable so that it never forms the C*D vectorised gradient.

Layer 1 computes ``sum_r (a_kr . g)(b_kr . h) + c_k`` for k = 1..hidden, with ``g`` and
``h`` the unit factors of the feature (:func:`gradtrust.core.introspection.introspective_factors`):
exactly :func:`gradtrust.core.introspection.separable_first_layer`, which equals a dense
layer on ``vec(g h^T)`` whose rows have rank R (any dense layer when R = min(C, D)). Layers
2 and 3 are ordinary: ReLU, Linear(hidden, hidden), ReLU, Linear(hidden, C).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradtrust.serving.contract import (
    INTROSPECTION_FEATURES,
    INTROSPECTION_GRADIENT,
    INTROSPECTION_LOGITS,
)

ONNX_OPSET = 17
DEFAULT_HIDDEN = 128
MAX_DEFAULT_RANK = 16


def default_rank(num_classes: int, num_features: int) -> int:
    """min(C, D, 16): as expressive as a dense first layer for small heads (C = 10),
    k * 16 * (C + D) weights for large ones (C = 1000, D = 1280: 4.7 M at k = 128,
    instead of 164 M for the dense layer)."""
    return max(1, min(num_classes, num_features, MAX_DEFAULT_RANK))


class IntrospectiveMLP(nn.Module):
    """(g_unit (N, C), h_unit (N, D)) -> introspective logits (N, C)."""

    def __init__(
        self, num_classes: int, num_features: int, hidden: int = DEFAULT_HIDDEN, rank: int = 0
    ) -> None:
        super().__init__()
        self.num_classes, self.num_features = num_classes, num_features
        self.hidden = hidden
        self.rank = rank or default_rank(num_classes, num_features)
        # a: (hidden*R, C) and b: (hidden*R, D), rows ordered (k, r); their product summed
        # over r is layer 1. Scaled so each unit starts with unit variance on unit inputs.
        self.a = nn.Linear(num_classes, hidden * self.rank, bias=False)
        self.b = nn.Linear(num_features, hidden * self.rank, bias=False)
        with torch.no_grad():
            self.a.weight.normal_(0.0, 1.0)
            self.b.weight.normal_(0.0, 1.0 / self.rank**0.5)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.rest = nn.Sequential(
            nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def first_layer(self, g_unit: torch.Tensor, h_unit: torch.Tensor) -> torch.Tensor:
        n = g_unit.shape[0]
        left = self.a(g_unit).reshape(n, self.hidden, self.rank)
        right = self.b(h_unit).reshape(n, self.hidden, self.rank)
        return (left * right).sum(dim=2) + self.bias

    def forward(self, g_unit: torch.Tensor, h_unit: torch.Tensor) -> torch.Tensor:
        return self.rest(self.first_layer(g_unit, h_unit))

    def separable_factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a (hidden, R, C), b (hidden, R, D), bias) as numpy float64, in the layout of
        :func:`gradtrust.core.introspection.separable_first_layer`."""
        a = self.a.weight.detach().double().numpy().reshape(self.hidden, self.rank, -1)
        b = self.b.weight.detach().double().numpy().reshape(self.hidden, self.rank, -1)
        return a, b, self.bias.detach().double().numpy()


def export_onnx(model: IntrospectiveMLP, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` (eval mode, float32) as an ONNX file with a dynamic batch axis and
    check that onnxruntime reproduces torch on a few random inputs."""
    path = Path(path)
    model = model.float().eval()
    g = torch.nn.functional.normalize(torch.randn(4, model.num_classes), dim=1)
    h = torch.nn.functional.normalize(torch.randn(4, model.num_features), dim=1)
    tmp = path.with_suffix(".onnx.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notices
        torch.onnx.export(
            model,
            (g, h),
            str(tmp),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INTROSPECTION_GRADIENT, INTROSPECTION_FEATURES],
            output_names=[INTROSPECTION_LOGITS],
            dynamic_axes={
                INTROSPECTION_GRADIENT: {0: "batch"},
                INTROSPECTION_FEATURES: {0: "batch"},
                INTROSPECTION_LOGITS: {0: "batch"},
            },
            do_constant_folding=True,
        )
        expected = model(g, h).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    (got,) = session.run(
        [INTROSPECTION_LOGITS],
        {INTROSPECTION_GRADIENT: g.numpy(), INTROSPECTION_FEATURES: h.numpy()},
    )
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
        tmp.unlink(missing_ok=True)
        raise RuntimeError("the exported introspective network does not reproduce torch")
    os.replace(tmp, path)
    return path
