"""Baselines that need the whole differentiable network, not just its logits (torch autograd).

These cannot be served from the ONNX forward pass, so the evaluation computes them on the
torch twin of the served model. Every score here is per sample (the model is in eval
mode, so BatchNorm uses its running statistics and samples never mix) and higher = more
trust, as everywhere in :mod:`gradtrust.core.scores`:

============== ============================================================= =============
score          definition (``scores.md``)                                    range
============== ============================================================= =============
odin           ``max softmax(z(x') / T)``, ``x' = x - eps sign(grad_x          [1/C, 1]
               CE(z(x)/T, P))``, T = 1000, eps = 0.0014 (no clipping of x')
purview_initial minus the mean, over the first half of the parameter tensors, (-inf, 0]
               of the squared gradient norm of ``mean_c BCEWithLogits(z_c, 1)``
purview_final  the same over the second half of the parameter tensors       (-inf, 0]
mc_dropout     ``sum_c m_c log m_c``, m the mean softmax of 10 passes with   [-log C, 0]
               dropout active (only for models that have dropout layers)
============== ============================================================= =============

The PurView halves follow the released GradTrust code: with P parameter tensors in
``named_parameters()`` order and ``j = P - 1``, "first" is ``[:floor(j/2)]`` and "final"
is ``[ceil(j/2):]`` (for even P the middle tensor belongs to neither).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn
from torch.func import functional_call, grad, vmap

from gradtrust.errors import InvalidInputError

Floats = NDArray[np.float64]

ODIN_TEMPERATURE = 1000.0
ODIN_EPSILON = 0.0014
MC_DROPOUT_PASSES = 10
TORCH_SCORE_NAMES = ("odin", "purview_initial", "purview_final", "mc_dropout")


def _batches(images: NDArray[np.floating], batch_size: int) -> list[torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return list(torch.split(x, batch_size)) if x.shape[0] else []


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise InvalidInputError(
            "torch scores need the model in eval mode (call model.eval()): in training mode "
            "BatchNorm mixes the samples of a batch"
        )


def odin(
    model: nn.Module,
    images: NDArray[np.floating],
    temperature: float = ODIN_TEMPERATURE,
    epsilon: float = ODIN_EPSILON,
    batch_size: int = 256,
) -> Floats:
    """ODIN (Liang et al. 2018): temperature-scaled softmax after a small input step that
    raises the predicted class's score. Range [1/C, 1]; higher = more trust."""
    _check_eval(model)
    out: list[Floats] = []
    for xb in _batches(images, batch_size):
        x = xb.clone().requires_grad_(True)
        logits = model(x)
        pred = logits.argmax(dim=1)
        # Sum, not mean, so each sample's input gradient is its own loss's gradient.
        loss = F.cross_entropy(logits / temperature, pred, reduction="sum")
        (grad_x,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            shifted = x - epsilon * torch.sign(grad_x)
            probs = torch.softmax(model(shifted).double() / temperature, dim=1)
        out.append(probs.max(dim=1).values.numpy())
    return np.concatenate(out) if out else np.empty(0)


def purview_split(num_tensors: int) -> tuple[slice, slice]:
    """The (initial, final) parameter-tensor slices of the released PurView code."""
    if num_tensors < 2:
        raise InvalidInputError("PurView needs a model with at least two parameter tensors")
    j = num_tensors - 1
    return slice(0, max(1, j // 2)), slice(math.ceil(j / 2), num_tensors)


def purview(
    model: nn.Module, images: NDArray[np.floating], batch_size: int = 128
) -> tuple[Floats, Floats]:
    """PurView (Prabhushankar & AlRegib): per-sample squared gradient norms of every
    parameter tensor under ``mean_c BCEWithLogits(z_c, 1)``, averaged over the first and the
    second half of the tensors and negated. Returns ``(initial, final)``, each (N,),
    range (-inf, 0]; higher (a smaller gradient) = more trust."""
    _check_eval(model)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    first, second = purview_split(len(params))

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x[None],))
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    per_sample_grad: Callable[..., dict[str, torch.Tensor]] = vmap(grad(loss), in_dims=(None, 0))
    initial: list[Floats] = []
    final: list[Floats] = []
    for xb in _batches(images, batch_size):
        grads = per_sample_grad(params, xb)
        sq = torch.stack([g.double().pow(2).flatten(1).sum(1) for g in grads.values()], dim=1)
        initial.append(-sq[:, first].mean(dim=1).numpy())
        final.append(-sq[:, second].mean(dim=1).numpy())
    if not initial:
        return np.empty(0), np.empty(0)
    return np.concatenate(initial), np.concatenate(final)


def has_dropout(model: nn.Module) -> bool:
    """Whether MC dropout is possible: the model has at least one dropout layer."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


def mc_dropout(
    model: nn.Module,
    images: NDArray[np.floating],
    passes: int = MC_DROPOUT_PASSES,
    seed: int = 0,
    batch_size: int = 256,
) -> Floats:
    """Monte-Carlo dropout (Gal & Ghahramani 2016): negative entropy of the mean softmax of
    ``passes`` forward passes with only the dropout layers in train mode. Range
    [-log C, 0]; higher = more trust. Raises :class:`InvalidInputError` for a model
    without dropout layers (the score would silently equal the plain entropy)."""
    if not has_dropout(model):
        raise InvalidInputError(
            "mc_dropout is not available: the model has no dropout layers, so every pass "
            "would be identical; use entropy instead"
        )
    _check_eval(model)
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out: list[Floats] = []
    try:
        for m in dropouts:
            m.train()
        with torch.no_grad():
            for xb in _batches(images, batch_size):
                mean = torch.softmax(model(xb).double(), dim=1)
                for _ in range(passes - 1):
                    mean = mean + torch.softmax(model(xb).double(), dim=1)
                mean = mean / passes
                terms = torch.where(mean > 0, mean * torch.log(mean), torch.zeros_like(mean))
                out.append(terms.sum(dim=1).numpy())
    finally:
        for m in dropouts:
            m.eval()
        torch.random.set_rng_state(generator_state)
    return np.concatenate(out) if out else np.empty(0)


def torch_scores(
    model: nn.Module, images: NDArray[np.floating], batch_size: int = 128
) -> tuple[dict[str, Floats], dict[str, str]]:
    """Every torch score this model supports, plus ``{name: reason}`` for those it does not."""
    scores: dict[str, Floats] = {"odin": odin(model, images, batch_size=batch_size)}
    scores["purview_initial"], scores["purview_final"] = purview(model, images, batch_size)
    missing: dict[str, str] = {}
    if has_dropout(model):
        scores["mc_dropout"] = mc_dropout(model, images, batch_size=batch_size)
    else:
        missing["mc_dropout"] = "the model has no dropout layers"
    return scores, missing
