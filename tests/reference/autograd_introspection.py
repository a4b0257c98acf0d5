"""Introspective features from their definition with ``torch.autograd``, for tests only.

Definition: run the model forward on one sample, take the cross-entropy between its
logits and the all-ones (confounding) label as torch writes a soft-target cross-entropy
(``F.cross_entropy(z, ones)`` = ``-sum_c log softmax(z)_c``), backpropagate it to the last
linear layer's weight ``W`` (C x D), flatten the gradient row-major and divide it by its
L2 norm. Nothing here uses the closed form of :mod:`gradtrust.core.introspection`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def introspective_features_by_autograd(
    forward: Callable[[torch.Tensor], torch.Tensor],
    head: nn.Linear,
    inputs: torch.Tensor,
) -> np.ndarray:
    """(N, C*D): per sample, ``vec(dL/dW) / ||vec(dL/dW)||`` with L the cross-entropy of the
    logits against the all-ones label, W = ``head.weight``; 0 where the gradient is 0.

    ``forward`` maps a batch of inputs to logits through ``head``; each sample runs alone.
    """
    out = []
    for x in inputs:
        z = forward(x[None])
        loss = F.cross_entropy(z, torch.ones_like(z))
        (grad,) = torch.autograd.grad(loss, head.weight)
        flat = grad.reshape(-1)
        norm = torch.linalg.vector_norm(flat)
        out.append((flat / norm if norm > 0 else torch.zeros_like(flat)).detach().numpy())
    return np.stack(out).astype(np.float64)
