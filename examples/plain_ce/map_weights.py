"""Can one probability map serve clean and shifted traffic? Two checks on the plain
cross-entropy models of ``zoo.py`` (run ``zoo.py all`` first), reported in docs/EVALUATION.md.

1. *Fixed clean weights*: the map of each model's calibrated signal refitted with the
   clean part at a fixed share of the weight, judged by ECE on the zoo's test sets against
   softmax confidence. Shows whether any single weight would have met both parts.
2. *A population-aware mixture*: two maps (clean part, shifted part) mixed by a logistic
   estimate of P(shifted | the calibration inputs). Shows whether the inputs tell the two
   populations apart well enough for that to help.
3. *Blending toward softmax confidence*: ``(1 - lam) * CONFIDENCE + lam * map``. Shows how
   clean and shifted calibration trade against each other as the map's correction is
   scaled down (lam = 0 is softmax confidence itself).
4. *The clean digits themselves*: accuracy, mean softmax confidence and its ECE on the
   clean calibration images (the fitting part and calibrate's held-out part) and on the
   clean test digits. A map can only learn the relation between confidence and accuracy
   that the calibration images show.

Everything is computed in process from the entries' own ONNX files, with the calibration
data ``gradtrust calibrate --mix corruptions`` uses (same split, same corruption seed).

    .venv/bin/python examples/plain_ce/map_weights.py    # about 2 minutes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from zoo import MODELS, TEST_SETS, read_folder  # the sibling script (run from this folder)

from gradtrust.core.calibration import load_model_calibration
from gradtrust.tools.evaluate import metrics as M
from gradtrust.tools.evaluate.calibration import (
    MapBalance,
    balanced_weights,
    fit_part_weighted_map,
    fit_probability_map,
)
from gradtrust.tools.evaluate.folder import folder_data
from gradtrust.tools.evaluate.roundtrip import calibration_set
from gradtrust.tools.evaluate.scoring import InProcessScorer, PreprocessingScorer, Scorer
from gradtrust.tools.evaluate.signals import fit_candidate, fit_combination, part_weights

WEIGHTS = (0.5, 0.7, 0.85, 0.9, 0.95, 1.0)
BLENDS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
HELDOUT_FRACTION = 0.4  # calibrate's default: the same calibration part
SEED = 0


def _model(out: Path, name: str) -> None:
    entry = out / "model_repository" / name
    calibration = load_model_calibration(entry)
    if calibration is None:
        raise SystemExit(f"{entry} is not calibrated: run `zoo.py all` first")
    in_process = InProcessScorer(entry / "1" / "model.onnx", intra_op_threads=1)
    classifier = in_process.classifier
    data = folder_data(
        out / "data" / name / "calibration",
        entry,
        classifier.input_shape,
        np.dtype(classifier.input_dtype).name,
        HELDOUT_FRACTION,
        SEED,
    )
    scorer: Scorer = in_process
    if data.to_input is not None:
        scorer = PreprocessingScorer(in_process, data.to_input)
    images, labels, groups = calibration_set(data, "corruptions", SEED)
    parts = (np.arange(len(labels)) >= len(data.calibration_labels)).astype(np.int64)
    scored = scorer.score(images, served_only=True)
    correct = scored.correct(labels)
    inputs = scored.calibration_inputs(calibration.contrast_k)
    equal = part_weights(parts, correct.size)
    name_of_signal = calibration.signal.name  # refitted the way calibrate fitted it
    signal = fit_candidate(name_of_signal, inputs, correct, groups, SEED, equal)
    values = signal(inputs)
    tests = {}
    for split in TEST_SETS:
        x, y, _ = read_folder(out / "data" / name / split)
        result = in_process.score(x, served_only=True)
        test_inputs = result.calibration_inputs(calibration.contrast_k)
        tests[split] = (signal(test_inputs), test_inputs, result.correct(y))

    print(f"\n{name} (signal {name_of_signal}): ECE of TRUST_PROB / of softmax confidence")
    print("| clean weight | " + " | ".join(TEST_SETS) + " |")
    print("|---:|" + "---|" * len(TEST_SETS))
    for weight in WEIGHTS:
        prob_map = fit_part_weighted_map(values, correct, balanced_weights(parts, weight))
        cells = [
            f"{M.ece(prob_map(s), c):.3f} / {M.ece(inp['msp'], c):.3f}"
            for s, inp, c in tests.values()
        ]
        print(f"| {weight:g} | " + " | ".join(cells) + " |")

    recorded = MapBalance.from_selection(calibration.selection)
    chosen = 0.5 if recorded is None else recorded.clean_weight
    blend_map = fit_part_weighted_map(values, correct, balanced_weights(parts, chosen))
    print(
        f"\nblend (1 - lam) CONFIDENCE + lam map (clean weight {chosen:g}): ECE of the blend "
        "minus ECE of softmax confidence, " + " / ".join(TEST_SETS)
    )
    print("| lam | " + " | ".join(TEST_SETS) + " |")
    print("|---:|" + "---:|" * len(TEST_SETS))
    for lam in BLENDS:
        cells = [
            f"{M.ece((1 - lam) * inp['msp'] + lam * blend_map(s), c) - M.ece(inp['msp'], c):+.3f}"
            for s, inp, c in tests.values()
        ]
        print(f"| {lam:g} | " + " | ".join(cells) + " |")

    held_images, held_labels, _ = calibration_set(data, "clean", SEED, split="test")
    held = scorer.score(held_images, served_only=True)
    clean_sets = {
        "calibration, fitting part": (inputs["msp"][parts == 0], correct[parts == 0]),
        "calibration, held-out part": (
            held.calibration_inputs(calibration.contrast_k)["msp"],
            held.correct(held_labels),
        ),
        "test_clean": (tests["test_clean"][1]["msp"], tests["test_clean"][2]),
    }
    print("\n| clean digits | images | errors | accuracy | mean CONFIDENCE | ECE CONFIDENCE |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, (msp, c) in clean_sets.items():
        print(
            f"| {label} | {c.size} | {np.count_nonzero(~c)} | {c.mean():.3f} | {msp.mean():.3f} "
            f"| {M.ece(msp, c):.3f} |"
        )

    shifted = fit_combination(inputs, parts == 1, groups, SEED, equal)
    clean_map = fit_probability_map(values[parts == 0], correct[parts == 0])
    shifted_map = fit_probability_map(values[parts == 1], correct[parts == 1])
    equal_map = fit_probability_map(values, correct, weights=equal)
    print(
        f"\npopulation estimate P(shifted | inputs): AUROC clean vs shifted on the calibration "
        f"data (in sample) {M.auroc(shifted(inputs), parts == 1):.3f}"
    )
    print(
        "| test set | mean P(shifted) | ECE mixture | ECE one map (equal weights) | ECE softmax |"
    )
    print("|---|---:|---:|---:|---:|")
    for split, (s, inp, c) in tests.items():
        q = 1.0 / (1.0 + np.exp(-shifted(inp)))
        mixture = (1.0 - q) * clean_map(s) + q * shifted_map(s)
        print(
            f"| {split} | {q.mean():.2f} | {M.ece(mixture, c):.3f} | {M.ece(equal_map(s), c):.3f} "
            f"| {M.ece(inp['msp'], c):.3f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/plain_ce"))
    args = parser.parse_args()
    for name in MODELS:
        _model(args.out, name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
