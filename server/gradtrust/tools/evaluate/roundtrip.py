"""The calibration round trip: fit on the calibration split, judge on held-out data.

``gradtrust calibrate`` and ``gradtrust evaluate`` both use these pieces, and so can a test
of the served ``TRUST_PROB``: take :func:`heldout_set`, send it through the server, and
pass the served GRADTRUST, CONFIDENCE, TRUST_PROB and correctness to
:func:`gradtrust.tools.evaluate.calibration.check_heldout`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from gradtrust.core.calibration import ThresholdTarget
from gradtrust.errors import InvalidInputError
from gradtrust.tools.evaluate.calibration import (
    achieved,
    check_heldout,
    choose_threshold,
    fit_trust_calibration,
)
from gradtrust.tools.evaluate.runner import Evaluation, LabelledData, Plan, demo_data
from gradtrust.tools.evaluate.scoring import Scorer
from gradtrust.tools.evaluate.shifts import CORRUPTIONS, SEVERITIES, with_corruptions
from gradtrust.tools.evaluate.signals import CalibrationRefused

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
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]]:
    """The images calibrate fits on (``split="calibration"``) or is judged on ("test"): as
    they are (``mix="clean"``) or followed by every corruption x severity copy; with their
    labels and the index of each one's source image (copies share it).

    Held-out copies use corruption seed ``seed + 1``, so no noise draw is shared.
    """
    if mix not in MIXES or split not in ("calibration", "test"):
        raise InvalidInputError(f"mix must be one of {MIXES} and split calibration or test")
    if split == "calibration":
        images, labels = data.calibration_images, data.calibration_labels
    else:
        images, labels = data.test_images, data.test_labels
    source = np.arange(len(labels), dtype=np.int64)
    if mix == "clean":
        return images, labels, source
    corruption_seed = seed if split == "calibration" else seed + 1
    mixed, mixed_labels = with_corruptions(images, labels, corruption_seed, corruptions, severities)
    return mixed, mixed_labels, np.tile(source, len(mixed_labels) // max(1, len(labels)))


def heldout_set(mix: str = "clean", seed: int = 0) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The demo's held-out images and labels for judging a calibration made by
    ``gradtrust calibrate --mix MIX --seed SEED`` (the demo's test split)."""
    images, labels, _ = calibration_set(demo_data(), mix, seed, split="test")
    return images, labels


def round_trip_rows(
    fit_on: str,
    checked_on: str,
    fit: tuple[dict[str, NDArray[np.float64]], NDArray[np.bool_], NDArray[np.int64]],
    held: tuple[dict[str, NDArray[np.float64]], NDArray[np.bool_]],
    targets: tuple[ThresholdTarget, ...] = TARGETS,
    contrast_k: int = 3,
) -> list[dict[str, Any]]:
    """Fit TRUST_PROB once on one set (inputs, correctness, source image of each sample),
    pick the threshold of each target on it, and check each on another set: one row per
    target, the numbers the evaluation reports."""
    cal_inputs, cal_correct, cal_groups = fit
    held_inputs, held_correct = held
    base: dict[str, Any] = {
        "fit_on": fit_on,
        "checked_on": checked_on,
        "fit_samples": int(cal_correct.size),
        "fit_wrong": int(np.count_nonzero(~cal_correct)),
        "heldout_samples": int(held_correct.size),
    }
    try:
        fitted, _, _ = fit_trust_calibration(
            cal_inputs, cal_correct, cal_groups, targets[0], contrast_k
        )
    except CalibrationRefused as err:
        return [base | {"target": str(t), "refused": str(err)} for t in targets]
    fit_prob = fitted.map(fitted.signal(cal_inputs))
    held_prob = fitted.map(fitted.signal(held_inputs))
    rows = []
    for target in targets:
        threshold = choose_threshold(fit_prob, cal_correct, target)
        calibration = replace(
            fitted,
            target=target,
            low_trust_threshold=threshold,
            achieved_on_calibration=achieved(fit_prob, cal_correct, threshold, target.kind),
        )
        check = check_heldout(calibration, held_prob, held_inputs["msp"], held_correct)
        rows.append(
            base
            | {
                "target": str(target),
                "signal": calibration.signal.name,
                "threshold": threshold,
                "achieved_fit": calibration.achieved_on_calibration,
                "achieved_heldout": check.achieved,
                "tolerance": check.tolerance,
                "target_met": check.target_met,
                "ece_trust_prob": check.ece_trust_prob,
                "ece_softmax": check.ece_confidence,
            }
        )
    return rows


def shifted_calibration(
    scorer: Scorer,
    data: LabelledData,
    seed: int,
    corruptions: tuple[str, ...],
    severities: tuple[int, ...],
) -> tuple[dict[str, NDArray[np.float64]], NDArray[np.bool_], NDArray[np.int64]]:
    """Calibration inputs, correctness and source image of every corruption x severity
    copy of the calibration split (no clean copy), corruption seed ``seed + 1``."""
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
        parts.append(scored.calibration_inputs())
        correct.append(scored.correct(labels))
    names = parts[0].keys() if parts else ()
    groups = np.tile(np.arange(len(data.calibration_labels)), len(parts) * len(severities))
    return (
        {n: np.concatenate([p[n] for p in parts]) for n in names},
        np.concatenate(correct),
        groups.astype(np.int64),
    )


def evaluate_round_trips(
    scorer: Scorer, data: LabelledData, evaluation: Evaluation, plan: Plan
) -> list[dict[str, Any]]:
    """Round trips for every target in :data:`TARGETS`: fitted on the clean calibration split
    and judged on the clean test split; and, when the plan has corruptions, fitted on every
    corruption x severity copy of the calibration split and judged on the sweeps. Needs
    the logits (an in-process scorer); through a server there are none."""
    rows: list[dict[str, Any]] = []
    cal, cal_ok = evaluation.scored["calibration"]
    clean, clean_ok = evaluation.scored["clean"]
    if cal.logits is None:
        return rows
    cal_fit = (cal.calibration_inputs(), cal_ok, np.arange(cal_ok.size, dtype=np.int64))
    rows += round_trip_rows(
        "calibration split, clean",
        "test split, clean",
        cal_fit,
        (clean.calibration_inputs(), clean_ok),
    )
    sweep_keys = [k for k in evaluation.scored if "@" in k]
    if not sweep_keys:
        return rows
    shifted_fit = shifted_calibration(scorer, data, plan.seed, plan.corruptions, plan.severities)
    held_parts = [evaluation.scored[k][0].calibration_inputs() for k in sweep_keys]
    held_inputs = {n: np.concatenate([p[n] for p in held_parts]) for n in held_parts[0]}
    held_ok = np.concatenate([evaluation.scored[k][1] for k in sweep_keys])
    rows += round_trip_rows(
        f"calibration split x {len(plan.corruptions)} corruptions x "
        f"{len(plan.severities)} severities",
        "test sweeps (same corruptions)",
        shifted_fit,
        (held_inputs, held_ok),
    )
    return rows
