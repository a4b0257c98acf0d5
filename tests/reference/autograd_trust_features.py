"""The calibration's gradient features from their definitions with ``torch.autograd``, for
tests only.

For each sample: run the head ``z = W h + b`` forward, backpropagate a loss to ``W`` and
measure that gradient directly (its Frobenius norm, its population variance over all C x D
entries). The losses: cross-entropy towards the prediction P, towards each of the k most
probable other classes Q_i, and the cross-entropy summed over every class (the all-ones
"confounding" label). Nothing here uses the closed forms of
:mod:`gradtrust.core.trust_features`; run it in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def gradient_features_by_autograd(
    head: nn.Linear, h: torch.Tensor, k: int = 3
) -> dict[str, np.ndarray]:
    """Every feature of :func:`gradtrust.core.trust_features.feature_names` (with features),
    one value per row of ``h``, each sample run on its own."""
    out: dict[str, list[float]] = {}

    def put(name: str, value: torch.Tensor) -> None:
        out.setdefault(name, []).append(float(value))

    for row in h:

        def gradient(loss_of: object, row: torch.Tensor = row) -> torch.Tensor:
            head.zero_grad()
            z = head(row[None])[0]
            loss = loss_of(z)  # type: ignore[operator]
            (grad,) = torch.autograd.grad(loss, head.weight)
            return grad

        with torch.no_grad():
            z0 = head(row[None])[0]
        order = torch.sort(torch.softmax(z0, 0), descending=True, stable=True).indices.tolist()
        k_eff = min(k, z0.shape[0] - 1)
        towards = [lambda z, q=q: F.cross_entropy(z[None], torch.tensor([q])) for q in order]
        g_pred = gradient(towards[0])
        g_ones = gradient(lambda z: -torch.log_softmax(z, 0).sum())
        var = lambda g: torch.var(g, unbiased=False)  # noqa: E731
        for i in range(1, k_eff + 1):
            g_q = gradient(towards[i])
            put(f"cf_ratio_{i}", torch.log(var(g_q) / var(g_pred)))
            put(f"cf_grad_norm_{i}", torch.log(torch.linalg.norm(g_q)))
        put("ones_ratio", torch.log(var(g_ones) / var(g_pred)))
        put("pred_grad_norm", -torch.log(torch.linalg.norm(g_pred)))
        put("ones_grad_norm", torch.log(torch.linalg.norm(g_ones)))
        put("feature_norm", torch.log(torch.linalg.norm(row)))
    return {name: np.asarray(values) for name, values in out.items()}
