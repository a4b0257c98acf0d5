"""The calibration round trip: fit on the calibration split, judge on held-out data.

``gradtrust calibrate`` and ``gradtrust evaluate`` both use these pieces, and so can a test
of the served ``TRUST_PROB``: take :func:`heldout_set`, send it through the server, and
pass the served GRADTRUST, CONFIDENCE, TRUST_PROB and correctness to
:func:`gradtrust.tools.evaluate.calibration.check_heldout`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from gradtrust.core.calibration import ThresholdTarget
from gradtrust.errors import InvalidInputError
from gradtrust.tools.evaluate.calibration import check_heldout, fit_calibration
from gradtrust.tools.evaluate.runner import Evaluation, LabelledData, Plan, demo_data
from gradtrust.tools.evaluate.scoring import Scorer
from gradtrust.tools.evaluate.shifts import CORRUPTIONS, SEVERITIES, with_corruptions

MIXES = ("clean", "corruptions")
TARGETS = (ThresholdTarget("flag_rate", 0.05), ThresholdTarget("error_recall", 0.8))
"""The targets the evaluation reports (the calibrate command's default is the first)."""


def calibration_set(
    data: LabelledData,
    mix: str,
    seed: int,
    split: str = "calibration",
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS),
    severities: tuple[int, ...] = SEVERITIES,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The images calibrate fits on (``split="calibration"``) or is judged on ("test"): as
    they are (``mix="clean"``) or followed by every corruption x severity copy.

    Held-out copies use corruption seed ``seed + 1``, so no noise draw is shared.
    """
    if mix not in MIXES or split not in ("calibration", "test"):
        raise InvalidInputError(f"mix must be one of {MIXES} and split calibration or test")
    if split == "calibration":
        images, labels = data.calibration_images, data.calibration_labels
    else:
        images, labels = data.test_images, data.test_labels
    if mix == "clean":
        return images, labels
    corruption_seed = seed if split == "calibration" else seed + 1
    return with_corruptions(images, labels, corruption_seed, corruptions, severities)


def heldout_set(mix: str = "clean", seed: int = 0) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The demo's held-out images and labels for judging a calibration made by
    ``gradtrust calibrate --mix MIX --seed SEED`` (the demo's test split)."""
    return calibration_set(demo_data(), mix, seed, split="test")


def round_trip_row(
    fit_on: str,
    checked_on: str,
    cal_scores: dict[str, NDArray[np.float64]],
    cal_correct: NDArray[np.bool_],
    held_scores: dict[str, NDArray[np.float64]],
    held_correct: NDArray[np.bool_],
    target: ThresholdTarget,
) -> dict[str, Any]:
    """Fit on one set, check on another: the numbers the evaluation reports."""
    calibration = fit_calibration(cal_scores, cal_correct, target)
    check = check_heldout(calibration, held_scores["gradtrust"], held_scores["msp"], held_correct)
    return {
        "fit_on": fit_on,
        "checked_on": checked_on,
        "fit_samples": int(cal_correct.size),
        "fit_wrong": int(np.count_nonzero(~cal_correct)),
        "heldout_samples": int(held_correct.size),
        "target": str(target),
        "threshold": calibration.low_trust_threshold,
        "achieved_fit": calibration.achieved_on_calibration,
        "achieved_heldout": check.achieved,
        "tolerance": check.tolerance,
        "target_met": check.target_met,
        "ece_trust_prob": check.ece_trust_prob,
        "ece_softmax": check.ece_confidence,
    }


def shifted_calibration(
    scorer: Scorer,
    data: LabelledData,
    seed: int,
    corruptions: tuple[str, ...],
    severities: tuple[int, ...],
) -> tuple[dict[str, NDArray[np.float64]], NDArray[np.bool_]]:
    """Served scores and correctness of every corruption x severity copy of the calibration
    split (no clean copy), corruption seed ``seed + 1``."""
    parts: list[dict[str, NDArray[np.float64]]] = []
    correct: list[NDArray[np.bool_]] = []
    for name in tqdm(corruptions, desc="calibration mix", unit="corruption"):
        images, labels = with_corruptions(
            data.calibration_images,
            data.calibration_labels,
            seed + 1,
            (name,),
            severities,
            include_clean=False,
        )
        scored = scorer.score(images, served_only=True)
        parts.append(scored.scores)
        correct.append(scored.correct(labels))
    names = parts[0].keys() if parts else ()
    return {n: np.concatenate([p[n] for p in parts]) for n in names}, np.concatenate(correct)


def evaluate_round_trips(
    scorer: Scorer, data: LabelledData, evaluation: Evaluation, plan: Plan
) -> list[dict[str, Any]]:
    """Round trips for every target in :data:`TARGETS`: fitted on the clean calibration split
    and judged on the clean test split; and, when the plan has corruptions, fitted on every
    corruption x severity copy of the calibration split and judged on the sweeps."""
    rows = []
    cal, cal_ok = evaluation.scored["calibration"]
    clean, clean_ok = evaluation.scored["clean"]
    for target in TARGETS:
        rows.append(
            round_trip_row(
                "calibration split, clean",
                "test split, clean",
                cal.scores,
                cal_ok,
                clean.scores,
                clean_ok,
                target,
            )
        )
    sweep_keys = [k for k in evaluation.scored if "@" in k]
    if not sweep_keys:
        return rows
    fit_scores, fit_ok = shifted_calibration(
        scorer, data, plan.seed, plan.corruptions, plan.severities
    )
    held_scores = {
        n: np.concatenate([evaluation.scored[k][0].scores[n] for k in sweep_keys])
        for n in ("gradtrust", "msp")
    }
    held_ok = np.concatenate([evaluation.scored[k][1] for k in sweep_keys])
    for target in TARGETS:
        rows.append(
            round_trip_row(
                f"calibration split x {len(plan.corruptions)} corruptions x "
                f"{len(plan.severities)} severities",
                "test sweeps (same corruptions)",
                fit_scores,
                fit_ok,
                held_scores,
                held_ok,
                target,
            )
        )
    return rows
