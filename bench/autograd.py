"""GradTrust the autograd way, one image at a time, as the authors' released code computes it:
the baseline the closed forms are timed against (and checked against, on the same images)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.models import ModelSpec
from gradtrust.core import scores
from gradtrust.serving.contract import FEATURES, LOGITS

Forward = Callable[[np.ndarray, list[str]], dict[str, np.ndarray]]


def autograd_head(
    weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor
) -> tuple[np.ndarray, float]:
    """GradTrust per sample by backpropagating the MSE-to-1/C loss into the head weight only."""
    w = weight.detach().clone().requires_grad_(True)
    c = w.shape[0]
    target = torch.full((1, c), 1.0 / c, device=w.device)
    out = np.empty(len(features))
    start = time.perf_counter()
    for i in range(len(features)):
        w.grad = None
        loss = F.mse_loss(F.linear(features[i : i + 1], w, bias), target)
        loss.backward()
        energy = torch.var(w.grad.pow(2), dim=1)  # type: ignore[union-attr]
        out[i] = (energy.max() / energy.mean()).item()
    return out, time.perf_counter() - start


def autograd_full(model: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, float]:
    """The released code's recipe: per image, forward, MSE-to-1/C, backward through every
    parameter, then the head weight's gradient statistics."""
    head = model.head  # type: ignore[union-attr]
    c = head.weight.shape[0]
    target = torch.full((1, c), 1.0 / c, device=images.device)
    out = np.empty(len(images))
    start = time.perf_counter()
    for i in range(len(images)):
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(images[i : i + 1]), target).backward()
        energy = torch.var(head.weight.grad.pow(2), dim=1)
        out[i] = (energy.max() / energy.mean()).item()
    return out, time.perf_counter() - start


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def _best_threads(run: Callable[[], tuple[np.ndarray, float]], device: str) -> dict[str, Any]:
    """Run an autograd loop with torch's default thread count and with one thread, and keep
    the faster: on a small or busy CPU, multi-threaded torch can stall badly, and the
    comparison should give the autograd way its best case. (On a GPU: default only.)"""
    default = torch.get_num_threads()
    counts = [default] if device != "cpu" or default == 1 else [default, 1]
    best: dict[str, Any] = {}
    tried: dict[str, float] = {}
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            values, seconds = run()
            tried[str(threads)] = seconds
            if not best or seconds < best["seconds"]:
                best = {"values": values, "seconds": seconds, "threads": threads}
    finally:
        torch.set_num_threads(default)
    return {**best, "tried": tried}


def bench_autograd(
    spec: ModelSpec,
    forward: Forward,
    device: str,
    rng: np.random.Generator,
    n_head: int,
    max_full: int,
    seconds: float,
) -> dict[str, Any]:
    """Per-sample autograd cost (it does not depend on the batch size), checked against the
    closed form on the same samples."""
    model = spec.torch_model.to(device).eval()
    images = rng.random((n_head, *spec.input_shape), dtype=np.float32)
    net = forward(images, [LOGITS, FEATURES])
    closed = scores.gradtrust_released(net[LOGITS])  # the released code's definition
    feats = torch.from_numpy(net[FEATURES]).to(device)
    weight, bias = model.head.weight, model.head.bias  # type: ignore[union-attr]
    # Probe one sample (also the warm-up) to size the whole-network loop to the time budget.
    _, t1 = autograd_full(model, torch.from_numpy(images[:1]).to(device))
    n_full = max(2, min(max_full, int(seconds / max(t1, 1e-9))))
    batch = torch.from_numpy(images[:n_full]).to(device)
    full = _best_threads(lambda: autograd_full(model, batch), device)
    model.zero_grad(set_to_none=True)
    autograd_head(weight, bias, feats[:2])  # warm-up
    head = _best_threads(lambda: autograd_head(weight, bias, feats), device)
    return {
        "torch_threads_head": head["threads"],
        "torch_threads_full": full["threads"],
        "head_seconds_by_threads": head["tried"],
        "full_seconds_by_threads": full["tried"],
        "head_samples": n_head,
        "head_per_sample_s": head["seconds"] / n_head,
        "head_max_rel_diff_vs_closed_form": _max_rel(head["values"], closed),
        "full_samples": n_full,
        "full_per_sample_s": full["seconds"] / n_full,
        "full_max_rel_diff_vs_closed_form": _max_rel(full["values"], closed[:n_full]),
    }
