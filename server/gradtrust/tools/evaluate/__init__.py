"""Evaluation of trust scores against the baselines, and calibrated trust thresholds.

Importing this package is cheap and needs numpy only: it re-exports the metrics and the
calibration (which the server may load). The heavier parts (corruptions, OOD sets, torch
baselines, the runner, plots and the CLI) are submodules imported on use.
"""

from gradtrust.core.calibration import (
    FILENAME,
    ProbabilityMap,
    ThresholdTarget,
    TrustCalibration,
    load_model_calibration,
)
from gradtrust.tools.evaluate.calibration import (
    HeldOutCheck,
    check_heldout,
    choose_threshold,
    fit_probability_map,
    fit_trust_calibration,
)
from gradtrust.tools.evaluate.metrics import (
    accuracy_curve,
    auac,
    aufc,
    aurc,
    auroc,
    ece,
    f1_curve,
    fpr_at_tpr,
    misprediction_metrics,
    ood_metrics,
)

__all__ = [
    "FILENAME",
    "HeldOutCheck",
    "ProbabilityMap",
    "ThresholdTarget",
    "TrustCalibration",
    "accuracy_curve",
    "auac",
    "aufc",
    "auroc",
    "aurc",
    "check_heldout",
    "choose_threshold",
    "ece",
    "f1_curve",
    "fpr_at_tpr",
    "fit_probability_map",
    "fit_trust_calibration",
    "load_model_calibration",
    "misprediction_metrics",
    "ood_metrics",
]
