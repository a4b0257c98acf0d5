"""``gradtrust evaluate`` and ``gradtrust calibrate``: thin commands over the evaluation library.

:func:`register` adds both to the ``gradtrust`` command's sub-parsers; ``python -m
gradtrust.tools.evaluate.cli`` runs them on their own.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gradtrust.core.calibration import ThresholdTarget
from gradtrust.errors import ConfigError
from gradtrust.tools.evaluate.runner import LabelledData, Plan, demo_data, npz_data
from gradtrust.tools.evaluate.shifts import CORRUPTIONS, SEVERITIES

PROBE_SAMPLES = 3
"""Calibration samples stored in the file to detect changed score definitions on load."""


def _entry(args: argparse.Namespace) -> Path:
    return Path(args.model_repository) / args.model


def _onnx(args: argparse.Namespace) -> Path:
    return Path(args.onnx) if args.onnx else _entry(args) / "1" / "model.onnx"


def _data(
    args: argparse.Namespace, input_shape: Any = None, dtype: str = "float32"
) -> LabelledData:
    """The demo splits, an .npz, or a folder of class sub-folders (read through the entry's
    own preprocessing, split per class into calibration and held-out parts)."""
    # The demo split is always the model's training split (seed 0); --seed only varies
    # the corruption noise, the sweep subset and the random OOD crops.
    if args.data == "demo":
        return demo_data()
    if Path(args.data).is_dir():
        from gradtrust.tools.evaluate.folder import folder_data

        if input_shape is None:
            from gradtrust.serving.classifier import OnnxClassifier

            classifier = OnnxClassifier(_onnx(args), intra_op_threads=1)
            input_shape, dtype = classifier.input_shape, np.dtype(classifier.input_dtype).name
        return folder_data(
            args.data, _entry(args), input_shape, dtype, args.heldout_fraction, args.seed
        )
    return npz_data(args.data)


def _names(text: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    """A comma list of names ('' = none), each checked against ``known``."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return names


def _severities(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as exc:
        raise ConfigError(f"severities must be a comma list of 1..5, got {text!r}") from exc
    if not values or any(v not in SEVERITIES for v in values):
        raise ConfigError(f"severities must be a comma list of 1..5, got {text!r}")
    return values


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--model", default="gradtrust_mnist", help="model entry name")
    parser.add_argument("--onnx", help="ONNX file (default: <repository>/<model>/1/model.onnx)")
    parser.add_argument(
        "--data",
        default="demo",
        help="'demo' (the demo's MNIST test and calibration splits); a folder with one "
        "sub-folder of PNG/JPEG files per class, named as in the entry's labels.txt (read "
        "through the entry's preprocessing, split per class into calibration and held-out "
        "parts, see --heldout-fraction); or an .npz with arrays images, labels, "
        "calibration_images, calibration_labels (network input as it is)",
    )
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.4,
        help="share of a --data folder held out from fitting, per class (default 0.4)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of corruptions, sweep subset and OOD crops"
    )


def _torch_model(args: argparse.Namespace) -> Any:
    if args.no_torch or args.server:
        return None
    weights = Path(args.torch_weights) if args.torch_weights else _entry(args) / "demo_cnn.pt"
    if not weights.is_file():
        if args.torch_weights:
            raise ConfigError(f"torch weights {weights} not found")
        return None
    import torch

    from gradtrust.tools.demo.cnn import load_demo_model

    torch.set_num_threads(max(1, args.threads))
    return load_demo_model(weights)


def _evaluate(args: argparse.Namespace) -> int:
    from gradtrust.tools.evaluate import plots, report
    from gradtrust.tools.evaluate.ood import OOD_BUILDERS
    from gradtrust.tools.evaluate.roundtrip import evaluate_round_trips
    from gradtrust.tools.evaluate.runner import run_evaluation
    from gradtrust.tools.evaluate.scoring import (
        InProcessScorer,
        PreprocessingScorer,
        Scorer,
        ServerScorer,
    )

    plan = Plan(
        seed=args.seed,
        sweep_per_class=args.sweep_per_class,
        corruptions=_names(args.corruptions, tuple(CORRUPTIONS), "corruption"),
        severities=_severities(args.severities),
        ood_sets=None if args.sets is None else _names(args.sets, tuple(OOD_BUILDERS), "set"),
    )
    data = _data(args)
    scorer: Scorer
    if args.server:
        scorer = ServerScorer(args.server, args.model, args.protocol)
    else:
        in_process = InProcessScorer(_onnx(args), _torch_model(args), intra_op_threads=args.threads)
        if data.to_input is None:
            gap = in_process.check_twin(data.test_images[:256])
            if in_process.torch_model is not None:
                print(f"torch twin matches the ONNX model (max logit gap {gap:.2g})", flush=True)
        scorer = in_process
    if data.to_input is not None:
        scorer = PreprocessingScorer(scorer, data.to_input)
    try:
        evaluation = run_evaluation(scorer, data, plan)
        if not args.no_round_trip:
            evaluation.round_trips = evaluate_round_trips(scorer, data, evaluation, plan)
    finally:
        inner = scorer.inner if isinstance(scorer, PreprocessingScorer) else scorer
        if isinstance(inner, ServerScorer):
            inner.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(evaluation, out / "results.csv")
    images = plots.write_all(evaluation, out)
    if args.docs:
        relative = os.path.relpath(out.resolve(), Path(args.docs).resolve().parent)
        report.update_document(args.docs, report.markdown(evaluation, Path(relative).as_posix()))
    else:
        (out / "results.md").write_text(report.markdown(evaluation, "."), encoding="utf-8")
    print(
        f"wrote {out / 'results.csv'}, {len(images)} plots"
        + (f", {args.docs}" if args.docs else "")
    )
    print(f"evaluation took {evaluation.seconds:.0f} s")
    return 0


def _score_all(scorer: Any, images: np.ndarray, desc: str, chunk: int = 2000) -> Any:
    """Score ``images`` in chunks under a progress bar; one merged :class:`Scored`."""
    from tqdm import tqdm

    from gradtrust.tools.evaluate.scoring import Scored

    parts = []
    with tqdm(total=len(images), desc=desc, unit="img") as bar:
        for start in range(0, len(images), chunk):
            parts.append(scorer.score(images[start : start + chunk], served_only=True))
            bar.update(min(chunk, len(images) - start))

    def joined(values: list[Any]) -> Any:
        return None if values[0] is None else np.concatenate(values)

    return Scored(
        np.concatenate([p.pred for p in parts]),
        {n: np.concatenate([p.scores[n] for p in parts]) for n in parts[0].scores},
        joined([p.logits for p in parts]),
        joined([p.features for p in parts]),
    )


def _calibrate(args: argparse.Namespace) -> int:
    from gradtrust.tools.evaluate import calibration_report
    from gradtrust.tools.evaluate.assessment import (
        assess,
        calibration_warnings,
        heldout_ece,
        verdict,
    )
    from gradtrust.tools.evaluate.calibration import (
        MapBalance,
        check_heldout,
        fit_trust_calibration,
    )
    from gradtrust.tools.evaluate.repository import write_calibration
    from gradtrust.tools.evaluate.roundtrip import calibration_set
    from gradtrust.tools.evaluate.runner import stratified_subset
    from gradtrust.tools.evaluate.scoring import InProcessScorer, PreprocessingScorer, Scorer
    from gradtrust.tools.evaluate.signals import CalibrationRefused

    target = ThresholdTarget.parse(args.target)
    entry = _entry(args)
    in_process = InProcessScorer(
        _onnx(args), intra_op_threads=args.threads, contrast_k=args.contrast_k
    )
    classifier = in_process.classifier
    data = _data(args, classifier.input_shape, np.dtype(classifier.input_dtype).name)
    scorer: Scorer = in_process
    if data.to_input is not None:
        scorer = PreprocessingScorer(in_process, data.to_input)
    stored = (data.calibration_images, data.test_images)
    # The corruptions take grayscale pixels in [0, 1]: an image folder's pixels always are in
    # that range, an .npz's network input only for some models.
    grey = all(x.ndim == 4 and x.shape[1] == 1 and (x.size == 0 or (x.min() >= 0 and x.max() <= 1))
               for x in stored)  # fmt: skip
    if args.clean_share is not None and args.mix != "corruptions":
        raise ConfigError(
            "--clean-share weighs clean images against their corrupted copies: it needs "
            "--mix corruptions"
        )
    if args.mix == "corruptions" and not grey:
        raise ConfigError(
            "--mix corruptions needs grayscale images with pixels in [0, 1] (what the product's "
            f"corruptions take); these have shape {data.calibration_images.shape[1:]} and range "
            f"[{data.calibration_images.min():g}, {data.calibration_images.max():g}]: use --mix "
            "clean, or pass an image folder"
        )
    images, labels, groups = calibration_set(data, args.mix, args.seed)
    # The clean images come first; their corrupted copies form a second part.
    mix_parts = (np.arange(len(labels)) >= len(data.calibration_labels)).astype(np.int64)
    scored = _score_all(scorer, images, "calibration data")
    correct = scored.correct(labels)
    inputs = scored.calibration_inputs(args.contrast_k)
    print(
        f"calibration data: {correct.size} samples from {len(data.calibration_labels)} images "
        f"(mix={args.mix}), {np.count_nonzero(~correct)} wrong; {len(inputs)} candidate inputs"
    )
    try:
        calibration, selection, fitted = fit_trust_calibration(
            inputs,
            correct,
            groups,
            target,
            contrast_k=args.contrast_k,
            seed=args.seed,
            force=args.signal,
            data=f"{data.name}; calibration part, mix={args.mix}, seed={args.seed}",
            parts=mix_parts if args.mix == "corruptions" else None,
            clean_share=args.clean_share,
            probe=(
                scored.logits[:PROBE_SAMPLES],
                None if scored.features is None else scored.features[:PROBE_SAMPLES],
            ),
        )
    except CalibrationRefused as err:
        print(f"gradtrust calibrate: refused: {err}", file=sys.stderr)
        return 2
    balance = MapBalance.from_selection(calibration.selection)
    if balance is not None:
        print(
            f"probability map: clean part weighs {100 * balance.clean_weight:g} %; out-of-fold "
            "ECE minus softmax confidence's: "
            + ", ".join(f"{p} {v:+.4f}" for p, v in balance.chosen_excess.items())
            + (
                " (the clean share you stated)"
                if balance.stated
                else ("" if balance.no_worse else " (no weight kept it no worse on both parts)")
            )
        )
    ranked = sorted(
        ((n, v) for n, v in selection.auroc.items() if selection.eligible[n]), key=lambda kv: -kv[1]
    )[:5]
    print(
        f"signal: {calibration.signal.name}"
        + (" (forced)" if selection.forced else "")
        + "; out-of-fold AUROC minus softmax's: "
        + ", ".join(f"{p} {v:+.3f}" for p, v in selection.gain[calibration.signal.name].items())
        + "; best eligible candidates by mean out-of-fold AUROC: "
        + ", ".join(f"{n} {v:.3f}" for n, v in ranked)
    )
    parts = []
    held: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]] = [
        ("clean", data.test_images, data.test_labels, None)
    ]
    if grey:
        subset = stratified_subset(data.test_labels, args.shifted_per_class, args.seed)
        shifted, shifted_labels, shifted_groups = calibration_set(
            LabelledData("", data.test_images[subset], data.test_labels[subset],
                         data.test_images[:0], data.test_labels[:0]),
            "corruptions", args.seed, split="test",
        )  # fmt: skip
        keep = shifted_groups >= 0
        keep[: subset.size] = False  # the clean copies are the clean part already
        held.append(("shifted", shifted[keep], shifted_labels[keep], shifted_groups[keep]))
    else:
        print("shifted held-out data: skipped (the corruptions need grayscale pixels in [0, 1])")
    for part, x, y, g in held:
        held_scored = _score_all(scorer, x, f"held-out {part}")
        parts.append(
            assess(
                part,
                fitted,
                held_scored.calibration_inputs(args.contrast_k),
                held_scored.correct(y),
                g,
                resamples=args.bootstrap,
                seed=args.seed,
            )
        )
    problems = verdict(calibration.signal.name, parts)
    warnings = [] if problems else calibration_warnings(calibration.signal.name, parts)
    calibration = replace(calibration, heldout_ece=heldout_ece(calibration.signal.name, parts))
    for a in parts:
        gain = a.auroc_gain[calibration.signal.name]
        row = a.rows[calibration.signal.name]
        soft = a.rows[calibration_report.RAW_CONFIDENCE]
        print(
            f"held-out {a.part} ({a.samples} samples, {a.wrong} wrong): AUROC "
            f"{row['auroc']} vs softmax {soft['auroc']}; "
            f"difference {gain.value:+.3f} [{gain.low:+.3f}, {gain.high:+.3f}]; ECE TRUST_PROB "
            f"{row['ece'].value:.4f} vs softmax {soft['ece'].value:.4f}"
        )
    clean = parts[0]
    check = check_heldout(
        calibration,
        clean.probabilities[calibration.signal.name],
        clean.probabilities[calibration_report.RAW_CONFIDENCE],
        clean.correct,
    )
    print(
        f"low_trust_threshold (on TRUST_PROB) = {calibration.low_trust_threshold:.4g} to {target}: "
        f"{100 * calibration.achieved_on_calibration:.1f} % on calibration data, "
        f"{100 * check.achieved:.1f} % on clean held-out (+-{100 * check.tolerance:.1f} %)"
    )
    written = not problems and not args.dry_run
    out = Path(args.out) if args.out else entry
    command = (
        f"gradtrust calibrate --model-repository {args.model_repository} --model {args.model} "
        f"--data {args.data} --mix {args.mix} --target {args.target} --seed {args.seed}"
        + (f" --signal {args.signal}" if args.signal else "")
        + (f" --clean-share {args.clean_share:g}" if args.clean_share is not None else "")
    )
    reports = calibration_report.write_report(
        out, args.model, calibration, selection, parts, problems, command, written, warnings
    )
    print(f"wrote {', '.join(str(p) for p in reports)}")
    for warning in warnings:
        print(f"gradtrust calibrate: warning: {warning}", file=sys.stderr)
    if problems:
        for problem in problems:
            print(f"gradtrust calibrate: refused: {problem}", file=sys.stderr)
        print(
            "nothing was written to the entry: this model's TRUST_PROB would rank errors worse "
            "than its softmax confidence. Try more (or harder, --mix corruptions) labelled "
            "data; or add `--signal msp` to serve calibrated softmax confidence as TRUST_PROB "
            "(it ranks errors exactly as CONFIDENCE does: on this model's held-out data no "
            "gradient signal was shown to rank them better)",
            file=sys.stderr,
        )
        return 1
    if args.dry_run:
        print("dry run: trust_calibration.json not written")
        return 0
    path = write_calibration(entry, calibration)
    print(f"wrote {path}: the server serves TRUST_PROB after the model is reloaded")
    return 0 if (check.passed and not warnings) or not args.strict else 1


def _share(text: str) -> float:
    """A clean share in [0, 1], kept to four decimals (it names a row of the report)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share between 0 and 1, got {text!r}")
    return round(value, 4)


def register(subparsers: Any) -> None:
    """Add ``evaluate`` and ``calibrate`` to an argparse sub-parser collection."""
    ev = subparsers.add_parser(
        "evaluate",
        help="measure every trust score against the baselines (clean, corruptions, OOD)",
        description="Run a labelled image set through the model and compute, per sample, "
        "every available score, then misprediction, calibration and OOD metrics.",
    )
    _common(ev)
    ev.add_argument("--out", default="build/evaluation", help="folder for CSV and plots")
    ev.add_argument("--docs", help="also rewrite the generated section of this markdown file")
    ev.add_argument("--torch-weights", help="DemoCNN state dict (default: <entry>/demo_cnn.pt)")
    ev.add_argument("--no-torch", action="store_true", help="skip odin, purview, mc_dropout")
    ev.add_argument("--server", help="host:port of a running server: score through it instead")
    ev.add_argument("--protocol", default="http", choices=("http", "grpc"))
    ev.add_argument("--sweep-per-class", type=int, default=50, help="test digits per class")
    ev.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma list, or ''")
    ev.add_argument("--severities", default=",".join(map(str, SEVERITIES)))
    ev.add_argument("--sets", default=None, help="comma list of OOD/near-shift sets, or ''")
    ev.add_argument("--threads", type=int, default=2, help="CPU threads for onnxruntime/torch")
    ev.add_argument("--no-round-trip", action="store_true", help="skip the calibration round trips")
    ev.set_defaults(func=_evaluate)

    cal = subparsers.add_parser(
        "calibrate",
        help="fit TRUST_PROB (calibrated P(correct)) and its low-trust threshold into an entry",
        description="Score labelled data with the entry's model, choose the signal that ranks "
        "its errors best by cross-validation, clean and corrupted parts judged separately "
        "against softmax confidence (any score or gradient feature, softmax paired with one, "
        "or an L2 logistic combination of all), fit a smoothed isotonic map signal -> P(correct) "
        "and the low-trust threshold for a target, measure every candidate on held-out clean "
        "and shifted data with bootstrap intervals, write a report, and write "
        "trust_calibration.json into the entry. Exits 1 (writing nothing to the entry) when "
        "the chosen signal ranks errors worse than softmax confidence beyond the noise, 2 "
        "when the data has too few errors to fit.",
    )
    _common(cal)
    cal.add_argument(
        "--target",
        default="flag-rate=0.05",
        help="flag-rate=X (flag at most X of traffic) or error-recall=Y (catch Y of errors)",
    )
    cal.add_argument(
        "--mix",
        default="clean",
        choices=("clean", "corruptions"),
        help="fit on the calibration images as they are, or also on every corruption x "
        "severity copy of them (the product's corruptions: calibration then covers shift)",
    )
    cal.add_argument(
        "--clean-share",
        type=_share,
        help="with --mix corruptions: the share of clean images in your traffic (0 to 1), "
        "when you know it; TRUST_PROB's map and the low-trust threshold are then fitted for "
        "that mix (default: the map's weight is chosen so that TRUST_PROB is, out of fold, no "
        "less calibrated than softmax on either part, and the threshold describes half-clean "
        "traffic)",
    )
    cal.add_argument(
        "--signal",
        help="use this candidate (a score, a gradient feature or 'combination') instead of "
        "the best one; it is still checked against softmax confidence",
    )
    cal.add_argument("--contrast-k", type=int, default=3, help="counterfactual classes (k)")
    cal.add_argument(
        "--shifted-per-class",
        type=int,
        default=50,
        help="held-out images per class whose corrupted copies form the shifted check",
    )
    cal.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples")
    cal.add_argument("--out", help="folder for the report (default: the entry folder)")
    cal.add_argument("--threads", type=int, default=2)
    cal.add_argument(
        "--dry-run", action="store_true", help="fit, check and report; write no calibration"
    )
    cal.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 if TRUST_PROB's ECE on a held-out part is worse than softmax's or the "
        "target is missed",
    )
    cal.set_defaults(func=_calibrate)


def main(argv: Sequence[str] | None = None) -> int:
    """``gradtrust evaluate|calibrate ...`` (the ``gradtrust`` entry point's own parser)."""
    from gradtrust.cli import main as gradtrust_main

    return gradtrust_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
