"""The same heatmaps as :mod:`gradtrust.core.heatmaps`, computed with ``torch.autograd``.

Use it for a torch model whose layer of interest does *not* feed global average pooling and
a linear head directly (so no closed form exists); the tests also use it as the reference
for the closed forms. It follows the definitions literally: a forward hook captures the
layer's output ``A``, ``alpha_k`` is the spatial mean of the gradient of the target with
respect to ``A``, and the map is ``sum_k alpha_k A_k``. Targets, per sample:

- ``gradcam``: ``z_P``; ``counterfactual``: the same gradient, weights ``-alpha``;
- ``contrast``: ``CE(z, Q)``, Q the named class or by default the second most probable;
- ``voice``: ``CE(z, Q)`` for every class Q (one backward pass each), then VOICE by its
  literal definition (:func:`literal_voice_maps`): every contrast map Q != P upsampled with
  ``torch.nn.functional.interpolate`` and min-max normalised at full size, ``torch.var``
  over them, min-max. It shares no code with the package's O(C h w + H W) VOICE.

For the other methods, everything after the weighted sum (ReLU, upsampling, min-max) and
the VOICE statistics are the code of :mod:`gradtrust.core.heatmaps`, so the two paths
differ only in how ``alpha`` is obtained. Pass a float64 model for reference-grade
precision.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn
from torch.nn import functional as F

from gradtrust.core.heatmaps import (
    Floats,
    check_method,
    contrast_targets,
    finish_maps,
    voice_statistics,
    weighted_sum,
)
from gradtrust.core.scores import as_logits, predicted_class
from gradtrust.errors import InvalidInputError


def _forward_capturing(
    model: nn.Module, layer: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model(images)`` once, in eval mode, returning ``(logits, A)``.

    The hook swaps the layer's output for a clone of a fresh leaf tensor: gradients with
    respect to that leaf are gradients with respect to ``A``, they exist even when the
    model's parameters are frozen, and later in-place ops (``ReLU(inplace=True)``) touch
    only the clone. The model's train/eval mode is restored afterwards.
    """
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise InvalidInputError(
                "layer must output one (batch, channels, height, width) tensor; "
                f"got {type(output).__name__} {getattr(output, 'shape', '')}"
            )
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(images)
    finally:
        handle.remove()
        model.train(was_training)
    if len(captured) != 1:
        raise InvalidInputError(
            f"layer ran {len(captured)} times in one forward pass; pass a module of the model "
            "that runs exactly once (for example its last conv block)"
        )
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise InvalidInputError(
            "model(images) must return the logits as one (batch, classes) tensor; "
            f"got {type(logits).__name__} {getattr(logits, 'shape', '')}"
        )
    return logits, captured[0]


def finish_literal(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU, torch's bilinear upsampling, min-max of each map (..., h, w) -> (..., H, W).

    A map that is constant, at (h, w) or after upsampling, becomes zeros (the package's
    documented convention: a constant map highlights nothing).
    """
    relu = F.relu(raw)
    up = F.interpolate(relu.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]
    low = up.amin(dim=(-2, -1), keepdim=True)
    high = up.amax(dim=(-2, -1), keepdim=True)
    constant = (relu == relu[..., :1, :1]).flatten(-2).all(-1)[..., None, None]
    flat = constant | (high <= low)
    span = torch.where(flat, torch.ones_like(high), high - low)
    return torch.where(flat, torch.zeros_like(up), (up - low) / span)


def literal_voice_maps(
    raw_contrast: ArrayLike, predicted: ArrayLike, size: tuple[int, int] | None
) -> Floats:
    """VOICE (N, H, W) by its definition, one sample at a time: every contrast map with
    Q != P finished at full size, their unbiased per-pixel variance, min-max; all zeros
    when C = 2. ``raw_contrast`` is (N, C, h, w); ``size`` None keeps (h, w).

    Memory is (C - 1) x H x W per sample: keep C x H x W to a few million in tests.
    """
    r = torch.as_tensor(np.asarray(raw_contrast, dtype=np.float64))
    n, c, h, w = r.shape
    target = (h, w) if size is None else (int(size[0]), int(size[1]))
    pred = np.asarray(predicted).reshape(-1)
    out = []
    for i in range(n):
        if c < 3:
            out.append(torch.zeros(target, dtype=torch.float64))
            continue
        others = [q for q in range(c) if q != int(pred[i])]
        maps = finish_literal(r[i, others], target)
        spread = maps.var(dim=0, unbiased=True)
        out.append(finish_literal(spread.unsqueeze(0), target)[0])
    result: Floats = torch.stack(out).numpy()
    return result


def _alpha(target: torch.Tensor, activation: torch.Tensor) -> Floats:
    """``alpha_k = mean_ij dT/dA_kij`` per sample, (N, K) float64. T sums per-sample terms."""
    (grad,) = torch.autograd.grad(target, activation, retain_graph=True)
    alpha: Floats = grad.mean(dim=(2, 3)).detach().to(torch.float64).numpy()
    return alpha


def autograd_explain(
    model: nn.Module,
    layer: nn.Module,
    images: ArrayLike | torch.Tensor,
    method: str,
    contrast_class: ArrayLike | None = None,
    at_activation: bool = False,
) -> tuple[Floats, Floats | None]:
    """Maps (N, H, W) in [0, 1] for images (N, channels, H, W) and, for ``voice``, stats (N, 2).

    ``model(images)`` must return logits (N, C); ``layer`` is the module whose output is
    ``A``. Same methods, defaults and errors as :func:`gradtrust.core.heatmaps.explain`. The
    images are cast to the dtype of the model's parameters; the model is not modified.
    ``at_activation`` gives the maps at ``A``'s resolution (h, w) instead of the images'.
    """
    check_method(method)
    if contrast_class is not None and method != "contrast":
        raise InvalidInputError(
            f"contrast_class is only used by method 'contrast', not {method!r}: drop it "
            "or ask for method 'contrast'"
        )
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
    x = torch.as_tensor(images).detach().to(dtype)
    if x.ndim != 4:
        raise InvalidInputError(
            f"images must have shape (batch, channels, height, width), got {tuple(x.shape)}"
        )
    logits, a = _forward_capturing(model, layer, x)
    size = (
        (int(a.shape[2]), int(a.shape[3])) if at_activation else (int(x.shape[2]), int(x.shape[3]))
    )
    z = as_logits(logits.detach().to(torch.float64).numpy())
    n, c = z.shape
    pred = predicted_class(z)
    a_np = a.detach().to(torch.float64).numpy()
    rows = torch.arange(n)
    gradcam_alpha = _alpha(logits[rows, torch.as_tensor(pred)].sum(), a)

    if method == "gradcam":
        return finish_maps(weighted_sum(a_np, gradcam_alpha), size), None
    if method == "counterfactual":
        return finish_maps(weighted_sum(a_np, -gradcam_alpha), size), None
    if method == "contrast":
        q = torch.as_tensor(contrast_targets(z, contrast_class))
        alpha = _alpha(F.cross_entropy(logits, q, reduction="sum"), a)
        return finish_maps(weighted_sum(a_np, alpha), size), None
    per_class = [
        _alpha(F.cross_entropy(logits, torch.full((n,), q), reduction="sum"), a) for q in range(c)
    ]
    raw_contrast = weighted_sum(a_np, np.stack(per_class, axis=1))
    maps = literal_voice_maps(raw_contrast, pred, size)
    explanation = finish_maps(weighted_sum(a_np, gradcam_alpha), size)
    return maps, voice_statistics(maps, explanation)
