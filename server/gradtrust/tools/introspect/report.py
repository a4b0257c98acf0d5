"""Feed-forward against introspective prediction on clean and corrupted held-out data:
accuracy, ECE of each stage's confidence, misprediction AUROC of each stage's confidence,
and how often the stages agree. Both stages are run exactly as the server runs them (the
classifier's ONNX file, then ``introspection.onnx`` through
:class:`gradtrust.serving.introspector.Introspector`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gradtrust.serving.classifier import Classifier
from gradtrust.serving.introspector import Introspector
from gradtrust.tools.evaluate import metrics as M
from gradtrust.tools.evaluate.shifts import corrupt
from gradtrust.tools.introspect.train import network_outputs

Images = NDArray[np.float32]


@dataclass(frozen=True)
class StageRow:
    setting: str
    samples: int
    ff_accuracy: float
    ff_ece: float
    ff_auroc: float
    in_accuracy: float
    in_ece: float
    in_auroc: float
    agreement: float


def _safe_auroc(scores: np.ndarray, correct: np.ndarray) -> float:
    return float(M.auroc(scores, correct)) if 0 < correct.sum() < correct.size else float("nan")


def compare(
    classifier: Classifier,
    introspector: Introspector,
    images: np.ndarray,
    labels: NDArray[np.int64],
    setting: str,
    to_input: Callable[[np.ndarray], np.ndarray] | None = None,
) -> StageRow:
    logits, features = network_outputs(classifier, images, to_input)
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    ff, ff_conf = p.argmax(axis=1), p.max(axis=1)
    second = introspector.predict(logits, features)
    ff_ok, in_ok = ff == labels, second.class_id == labels
    return StageRow(
        setting,
        int(labels.size),
        float(ff_ok.mean()),
        float(M.ece(ff_conf, ff_ok)),
        _safe_auroc(ff_conf, ff_ok),
        float(in_ok.mean()),
        float(M.ece(second.confidence, in_ok)),
        _safe_auroc(second.confidence, in_ok),
        float((ff == second.class_id).mean()),
    )


def sweep(
    classifier: Classifier,
    introspector: Introspector,
    images: Images,
    labels: NDArray[np.int64],
    corruptions: Sequence[str],
    severities: Sequence[int],
    seed: int = 0,
    to_input: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[StageRow]:
    """The clean row, one row per corruption (its severities pooled), and one row with
    every corrupted image pooled."""
    rows = [compare(classifier, introspector, images, labels, "clean", to_input)]
    pooled_images, pooled_labels = [], []
    for name in corruptions:
        shifted = np.concatenate([corrupt(images, name, s, seed) for s in severities])
        tiled = np.tile(labels, len(severities))
        rows.append(compare(classifier, introspector, shifted, tiled, name, to_input))
        pooled_images.append(shifted)
        pooled_labels.append(tiled)
    if corruptions:
        rows.append(
            compare(
                classifier,
                introspector,
                np.concatenate(pooled_images),
                np.concatenate(pooled_labels),
                "corruptions pooled",
                to_input,
            )
        )
    return rows


def markdown(rows: Sequence[StageRow], title: str) -> str:
    """A table: both stages side by side, the better of each pair in bold."""

    def pair(a: float, b: float, higher: bool) -> tuple[str, str]:
        fa, fb = f"{a:.3f}", f"{b:.3f}"
        if np.isnan(a) or np.isnan(b) or fa == fb:
            return fa, fb
        if (a > b) == higher:
            return f"**{fa}**", fb
        return fa, f"**{fb}**"

    lines = [
        f"{title}",
        "",
        "| setting | n | accuracy FF | accuracy intro | ECE FF | ECE intro "
        "| AUROC FF | AUROC intro | agree |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = pair(r.ff_accuracy, r.in_accuracy, True)
        ece = pair(r.ff_ece, r.in_ece, False)
        auroc = pair(r.ff_auroc, r.in_auroc, True)
        lines.append(
            f"| {r.setting} | {r.samples} | {acc[0]} | {acc[1]} | {ece[0]} | {ece[1]} "
            f"| {auroc[0]} | {auroc[1]} | {r.agreement:.3f} |"
        )
    return "\n".join(lines) + "\n"
