"""``gradtrust evaluate`` and ``gradtrust calibrate``: thin commands over the evaluation library.

:func:`register` adds both to the ``gradtrust`` command's sub-parsers; ``python -m
gradtrust.tools.evaluate.cli`` runs them on their own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradtrust.core.calibration import ThresholdTarget
from gradtrust.errors import ConfigError
from gradtrust.tools.evaluate.calibration import check_heldout, fit_calibration
from gradtrust.tools.evaluate.runner import LabelledData, Plan, demo_data, npz_data
from gradtrust.tools.evaluate.shifts import CORRUPTIONS, SEVERITIES


def _entry(args: argparse.Namespace) -> Path:
    return Path(args.model_repository) / args.model


def _onnx(args: argparse.Namespace) -> Path:
    return Path(args.onnx) if args.onnx else _entry(args) / "1" / "model.onnx"


def _data(args: argparse.Namespace) -> LabelledData:
    # The demo split is always the model's training split (seed 0); --seed only varies
    # the corruption noise, the sweep subset and the random OOD crops.
    return demo_data() if args.data == "demo" else npz_data(args.data)


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
        help="'demo' (the demo's MNIST test and calibration splits) or an .npz with arrays "
        "images, labels, calibration_images, calibration_labels",
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
    from gradtrust.tools.evaluate.scoring import InProcessScorer, Scorer, ServerScorer

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
        gap = in_process.check_twin(data.test_images[:256])
        if in_process.torch_model is not None:
            print(f"torch twin matches the ONNX model (max logit gap {gap:.2g})", flush=True)
        scorer = in_process
    try:
        evaluation = run_evaluation(scorer, data, plan)
        if not args.no_round_trip:
            evaluation.round_trips = evaluate_round_trips(scorer, data, evaluation, plan)
    finally:
        if isinstance(scorer, ServerScorer):
            scorer.close()
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


def _calibrate(args: argparse.Namespace) -> int:
    from gradtrust.tools.evaluate.repository import write_calibration
    from gradtrust.tools.evaluate.roundtrip import calibration_set
    from gradtrust.tools.evaluate.scoring import InProcessScorer

    target = ThresholdTarget.parse(args.target)
    data = _data(args)
    scorer = InProcessScorer(_onnx(args), intra_op_threads=args.threads)
    images, labels = calibration_set(data, args.mix, args.seed)
    scored = scorer.score(images)
    correct = scored.correct(labels)
    calibration = fit_calibration(
        scored.scores,
        correct,
        target,
        data=f"{data.name}; calibration split, mix={args.mix}, seed={args.seed}",
    )
    print(
        f"fitted on {correct.size} samples ({np.count_nonzero(~correct)} wrong): "
        f"low_trust_threshold = {calibration.low_trust_threshold:.6g} to {target} "
        f"(achieved {100 * calibration.achieved_on_calibration:.1f} % on calibration)"
    )
    held_images, held_labels = calibration_set(data, args.mix, args.seed, split="test")
    held = scorer.score(held_images)
    check = check_heldout(
        calibration, held.scores["gradtrust"], held.scores["msp"], held.correct(held_labels)
    )
    print(
        f"held-out ({held_images.shape[0]} samples): ECE of TRUST_PROB {check.ece_trust_prob:.4f} "
        f"vs raw softmax {check.ece_confidence:.4f}; achieved {100 * check.achieved:.1f} % "
        f"(target {100 * target.value:g} % +- {100 * check.tolerance:.1f} %): "
        + ("OK" if check.passed else "NOT MET")
    )
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    json_path, config_path = write_calibration(_entry(args), calibration)
    print(f"wrote {json_path} and set {config_path} low_trust_threshold")
    return 0 if check.passed or not args.strict else 1


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
        help="fit GradTrust -> P(correct) and the low-trust threshold into a model entry",
        description="Fit isotonic maps score -> P(correct) on the calibration split, choose "
        "the low-trust threshold for a target, check both on held-out data, and write "
        "trust_calibration.json plus config.pbtxt's low_trust_threshold.",
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
        help="calibrate on the split as is, or plus every corruption x severity copy",
    )
    cal.add_argument("--threads", type=int, default=2)
    cal.add_argument("--dry-run", action="store_true", help="fit and check, write nothing")
    cal.add_argument("--strict", action="store_true", help="exit 1 if the held-out check fails")
    cal.set_defaults(func=_calibrate)


def main(argv: Sequence[str] | None = None) -> int:
    """``gradtrust evaluate|calibrate ...`` (the ``gradtrust`` entry point's own parser)."""
    from gradtrust.cli import main as gradtrust_main

    return gradtrust_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
