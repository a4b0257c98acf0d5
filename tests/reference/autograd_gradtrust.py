"""The headline GradTrust computed from its definition with ``torch.autograd``, for tests only.

Definition (the tutorial's counterfactual GradTrust): run the model forward on one sample,
backpropagate the cross-entropy loss towards a class q to the last linear layer's weight
``W``, and take the population variance of that gradient over all its C x D entries. The
score is the log of the mean of that variance over the k most probable classes after the
prediction P, divided by the variance for P itself. Nothing here uses the closed form of
:mod:`gradtrust.core.scores`; run it in float64 for reference-grade precision.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def gradtrust_by_autograd(
    forward: Callable[[torch.Tensor], torch.Tensor],
    head: nn.Linear,
    inputs: torch.Tensor,
    k: int = 3,
) -> np.ndarray:
    """log(mean_k Var(dCE(z, Q_k)/dW) / Var(dCE(z, P)/dW)) per sample, W = ``head.weight``.

    ``forward`` maps a batch of inputs to logits through ``head`` (the whole model, or the
    head alone on penultimate features); each sample is run on its own, so nothing in the
    batch can leak into another sample's value.
    """
    out = []
    for x in inputs:
        z = forward(x[None])[0]
        order = torch.sort(torch.softmax(z, dim=0), descending=True, stable=True).indices
        k_eff = min(k, z.shape[0] - 1)

        def variance(q: int, z: torch.Tensor = z) -> torch.Tensor:
            loss = F.cross_entropy(z[None], torch.tensor([q]))
            (grad,) = torch.autograd.grad(loss, head.weight, retain_graph=True)
            return grad.var(unbiased=False)

        contrast = torch.stack([variance(int(q)) for q in order[1 : k_eff + 1]]).mean()
        out.append(torch.log(contrast / variance(int(order[0]))).item())
    return np.array(out)
