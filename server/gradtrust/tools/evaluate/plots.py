"""The evaluation's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gradtrust.tools.evaluate import metrics as M
from gradtrust.tools.evaluate.runner import Evaluation, select

_OTHERS = ("C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9", "0.45")
_HIGHLIGHT = {"gradtrust": ("C3", 2.6), "msp": ("k", 2.0), "contrast_trust": ("C0", 2.0)}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _style(method: str, index: int) -> dict[str, object]:
    color, width = _HIGHLIGHT.get(method, (_OTHERS[index % len(_OTHERS)], 1.0))
    return {"color": color, "lw": width, "alpha": 1.0 if method in _HIGHLIGHT else 0.7}


def _pooled(evaluation: Evaluation, prefix_filter: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    keys = [k for k in evaluation.scored if "@" in k] if prefix_filter == "@" else [prefix_filter]
    scores = {
        m: np.concatenate([evaluation.scored[k][0].scores[m] for k in keys])
        for m in evaluation.methods
    }
    return scores, np.concatenate([evaluation.scored[k][1] for k in keys])


def retained_accuracy(evaluation: Evaluation, path: str | os.PathLike[str]) -> None:
    """Accuracy of the kept samples vs the retained fraction, per method, clean and shifted.

    Pooled corruptions rank all (corruption, severity) samples together, as a monitor sees
    a mixed stream."""
    plt = _pyplot()
    panels = [("clean test", "clean")]
    if any("@" in k for k in evaluation.scored):
        panels.append(("all corruptions pooled", "@"))
    panels += [(f"near shift: {k}", k) for k in evaluation.scored if k == "sklearn_digits"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (title, key) in zip(axes[0], panels, strict=True):
        scores, correct = _pooled(evaluation, key)
        grid = M.RETAINED_GRID
        oracle = M.accuracy_curve(correct.astype(float), correct, grid)
        ax.plot(100 * grid, oracle, ":", color="0.5", label="oracle")
        for i, method in enumerate(evaluation.methods):
            ax.plot(
                100 * grid,
                M.accuracy_curve(scores[method], correct, grid),
                label=method,
                **_style(method, i),
            )
        ax.set(title=title, xlabel="retained (% most trusted)", ylabel="accuracy of retained")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gradtrust_vs_confidence(evaluation: Evaluation, path: str | os.PathLike[str]) -> None:
    """GradTrust against softmax confidence, correct in blue, wrong in red."""
    plt = _pyplot()
    panels = [("clean test", "clean")]
    if any("@" in k for k in evaluation.scored):
        panels.append(("all corruptions pooled", "@"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (title, key) in zip(axes[0], panels, strict=True):
        scores, correct = _pooled(evaluation, key)
        keep = rng.permutation(correct.size)[:6000]
        gap = np.clip(1.0 - scores["msp"][keep], 1e-7, 1.0)
        for ok, color, label in ((True, "C0", "correct"), (False, "C3", "wrong")):
            sel = correct[keep] == ok
            ax.scatter(
                gap[sel],
                scores["gradtrust"][keep][sel],
                s=6,
                alpha=0.45,
                c=color,
                label=f"{label} ({int(np.count_nonzero(correct == ok))})",
            )
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set(
            title=title,
            xlabel="1 - softmax confidence (log; right = more confident)",
            ylabel="GradTrust",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def severity_curves(evaluation: Evaluation, path: str | os.PathLike[str]) -> None:
    """Accuracy per corruption, and each method's AUROC and AUAC, against severity."""
    plt = _pyplot()
    rows = select(evaluation.rows, setting="corruption")
    if not rows:
        return
    severities = sorted({r["severity"] for r in rows})
    corruptions = list(dict.fromkeys(r["shift"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    first = evaluation.methods[0]
    for i, name in enumerate(corruptions):
        acc = [
            select(rows, shift=name, severity=s, method=first)[0]["accuracy"] for s in severities
        ]
        axes[0].plot(severities, acc, marker="o", ms=3, color=f"C{i}", label=name)
    axes[0].set(title="classifier accuracy", xlabel="severity", ylabel="accuracy")
    axes[0].legend(fontsize=7)
    for ax, metric, label in (
        (axes[1], "auroc", "AUROC correct vs wrong"),
        (axes[2], "auac", "AUAC"),
    ):
        for i, method in enumerate(evaluation.methods):
            means = [
                _nanmean([r[metric] for r in select(rows, severity=s, method=method)])
                for s in severities
            ]
            ax.plot(severities, means, marker="o", ms=3, label=method, **_style(method, i))
        ax.set(title=f"{label} (mean over corruptions)", xlabel="severity", ylabel=label)
    axes[1].axhline(0.5, color="0.6", ls=":", lw=1)
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(severities)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(evaluation: Evaluation, folder: str | os.PathLike[str]) -> list[Path]:
    """Write every figure into ``folder``; returns their paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        out / "retained_accuracy.png",
        out / "gradtrust_vs_confidence.png",
        out / "severity_curves.png",
    ]
    retained_accuracy(evaluation, paths[0])
    gradtrust_vs_confidence(evaluation, paths[1])
    severity_curves(evaluation, paths[2])
    return paths
