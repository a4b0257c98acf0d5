"""The demo classifier: a small CNN whose last layer sees globally average-pooled features.

The shape ``conv blocks -> ReLU activation A (N, K, h, w) -> mean over (h, w) = h (N, K)
-> Linear head -> logits`` is what makes every heatmap of ``scores.md`` a closed form:
``dz_c/dA_kij = W_ck / (h w)``, so the server needs A, W and the softmax, not a backward pass.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from gradtrust.errors import ConfigError

#: Channels of the four conv blocks; the last one is K, the feature size.
CHANNELS = (16, 32, 64, 64)


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (same padding), BatchNorm, ReLU: BatchNorm lets 3500 digits train in seconds."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=False),
    )


class DemoCNN(nn.Module):
    """MNIST classifier: four conv blocks (28x28 -> 14x14 -> 7x7), global average pooling, ``head``.

    ``forward_all`` returns the activation of the last block (N, K, 7, 7), its spatial mean
    (N, K) and the logits (N, num_classes); ``logits == features @ head.weight.T + head.bias``.
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.body = nn.Sequential(
            _block(1, c1),
            _block(c1, c2),
            nn.MaxPool2d(2),
            _block(c2, c3),
            nn.MaxPool2d(2),
            _block(c3, c4),
        )
        self.head = nn.Linear(c4, num_classes)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(logits, features, activation)`` from one forward pass."""
        activation = self.body(x)
        features = activation.mean(dim=(2, 3))
        logits = self.head(features)
        return logits, features, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits (N, num_classes) of images (N, 1, 28, 28) in [0, 1]."""
        return self.forward_all(x)[0]


class _AllOutputs(nn.Module):
    """Adapter so the ONNX exporter traces ``forward_all`` (three named outputs)."""

    def __init__(self, model: DemoCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.forward_all(x)


def all_outputs_module(model: DemoCNN) -> nn.Module:
    """Wrap ``model`` so that calling it returns ``forward_all``'s tuple (used for ONNX export).

    The wrapper takes the model's train/eval mode: the exporter restores the wrapper's mode
    afterwards, and a wrapper left in train mode would switch the model back to training.
    """
    return _AllOutputs(model).train(model.training)


def load_demo_model(path: str | Path, num_classes: int = 10) -> DemoCNN:
    """Load a :class:`DemoCNN` state dict saved by ``gradtrust.tools.demo.train``, in eval mode.

    ``weights_only=True`` so that loading a file never runs pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"demo model weights {path} not found: run `make train-demo` to create them"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = DemoCNN(num_classes=num_classes)
        model.load_state_dict(state)
    except (RuntimeError, OSError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        raise ConfigError(
            f"{path} is not a DemoCNN state dict ({exc}): "
            "re-create it with `python -m gradtrust.tools.demo.train --repository model_repository`"
        ) from exc
    return model.eval()
