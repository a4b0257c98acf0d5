"""``gradtrust prepare``: the command line over
:func:`gradtrust.tools.prepare.pipeline.prepare_entry`.

``register(subparsers)`` adds the subcommand to the ``gradtrust`` parser; ``main`` runs it
alone (``python -m gradtrust.tools.prepare.cli``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from gradtrust.errors import GradTrustError
from gradtrust.serving.bls import WrapSpec
from gradtrust.serving.decoding import DEFAULT_SCALE, LAYOUTS
from gradtrust.tools.prepare.pipeline import prepare_entry

DESCRIPTION = (
    "Turn an image classifier (ONNX, TorchScript, an nn.Module factory + state dict, or a "
    "model already deployed in the same Triton) into a GradTrust model-repository entry. "
    "Nothing is written unless every check passes."
)
EXAMPLE = """\
examples:
  gradtrust prepare --onnx resnet.onnx --name resnet --repository model_repository \\
      --labels classes.txt --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225
  gradtrust prepare --torch mypkg.models:build --weights best.pt --input-shape 3 32 32 \\
      --name cifar --repository model_repository
  gradtrust prepare --wrap resnet_trt --wrap-input input --wrap-logits logits \\
      --input-shape 3 224 224 --labels classes.txt --name resnet_trust
"""


def _number(text: str) -> float:
    """A float, also written as a fraction such as 1/255."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _numbers(values: Sequence[str]) -> tuple[float, ...]:
    """``0.5 0.5 0.5`` or ``0.5,0.5,0.5``."""
    parts = [p for v in values for p in v.split(",") if p.strip()]
    return tuple(_number(p) for p in parts)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--onnx", metavar="FILE", help="an exported ONNX image classifier")
    source.add_argument(
        "--torch",
        metavar="FILE|MODULE:FACTORY",
        help="a TorchScript file, or module:factory building the nn.Module (see --weights)",
    )
    source.add_argument(
        "--wrap",
        metavar="MODEL",
        help="a classifier already deployed in the same Triton, scored through BLS",
    )
    parser.add_argument("--name", required=True, help="model name (the entry's folder)")
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        metavar="DIR",
        help="model repository to write into (default: model_repository)",
    )
    parser.add_argument("--labels", metavar="FILE", help="class names, one per line, in order")
    parser.add_argument(
        "--output", metavar="NAME", help="the graph output holding the class scores, if several"
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="NCHW",
        type=str.upper,
        help="layout of the model's input tensor (default NCHW)",
    )
    parser.add_argument(
        "--input-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="size images are resized to (required when the model's H, W are dynamic)",
    )
    parser.add_argument(
        "--scale",
        type=_number,
        default=DEFAULT_SCALE,
        help="pixel multiplier before mean/std (default 1/255: 8-bit pixels to [0, 1])",
    )
    parser.add_argument("--mean", nargs="+", default=["0"], help="per-channel mean (default 0)")
    parser.add_argument("--std", nargs="+", default=["1"], help="per-channel std (default 1)")
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="state dict for --torch module:factory, loaded with weights_only=True",
    )
    parser.add_argument(
        "--input-shape",
        nargs="+",
        type=int,
        metavar="D",
        help="--torch only: per-sample input dims in the model's layout, e.g. 3 224 224",
    )
    wrap = parser.add_argument_group("--wrap: the deployed model's tensors")
    wrap.add_argument("--wrap-input", metavar="NAME", help="its image input")
    wrap.add_argument("--wrap-logits", metavar="NAME", help="its pre-softmax logits output")
    wrap.add_argument("--wrap-features", metavar="NAME", help="its penultimate features output")
    wrap.add_argument("--wrap-version", type=int, default=-1, help="its version (default: latest)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--scores", help="scores served by default, comma-separated")
    parser.add_argument(
        "--low-trust-threshold",
        type=float,
        help="GradTrust below this counts as low trust in the metrics (default: 4.4, a 0.9 "
        "probability against one runner-up; `gradtrust calibrate` fits one from data)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing entry")
    parser.set_defaults(func=run)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``prepare`` to the ``gradtrust`` command's subparsers."""
    parser = subparsers.add_parser(
        "prepare",
        help="turn an ONNX or PyTorch classifier into a GradTrust model-repository entry",
        description=DESCRIPTION,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Prepare the entry and tell the user what was written and what to run next."""
    try:
        mean, std = _numbers(args.mean), _numbers(args.std)
    except argparse.ArgumentTypeError as err:
        raise GradTrustError(f"--mean/--std: {err}") from None
    wrap = None
    if args.wrap is not None:
        if not (args.wrap_input and args.wrap_logits):
            raise GradTrustError("--wrap needs --wrap-input NAME and --wrap-logits NAME")
        wrap = WrapSpec(
            args.wrap, args.wrap_input, args.wrap_logits, args.wrap_features, args.wrap_version
        )
    entry = prepare_entry(
        args.repository,
        args.name,
        onnx_file=args.onnx,
        torch_model=args.torch,
        wrap=wrap,
        weights=args.weights,
        input_shape=args.input_shape,
        labels=args.labels,
        output=args.output,
        layout=args.layout,
        input_size=tuple(args.input_size) if args.input_size else None,
        scale=args.scale,
        mean=mean,
        std=std,
        max_batch_size=args.max_batch_size,
        scores=args.scores,
        low_trust_threshold=args.low_trust_threshold,
        force=args.force,
    )
    prepared = entry.prepared
    if prepared is None:
        print(f"wrote {entry.path}: {entry.model.num_classes} classes, scored through BLS")
    else:
        print(
            f"wrote {entry.path}: {prepared.num_classes} classes, {prepared.feature_dim} "
            f"features, heatmaps {'on' if prepared.heatmaps else 'off'}"
        )
        for note in prepared.notes:
            print(f"note: {note}")
    print(
        f"{args.name} is uncalibrated: it serves no TRUST_PROB, and low trust is judged on raw "
        "GRADTRUST. Calibrate it on labelled images (one sub-folder per class, named as in "
        "labels.txt):\n"
        f"  gradtrust calibrate --model-repository {args.repository} --model {args.name} "
        "--data FOLDER\n"
        "  (add --mix corruptions for a grayscale model, so that calibration also covers shift)"
    )
    print(
        "next:\n"
        f"  gradtrust serve --model-repository {args.repository}\n"
        f"  gradtrust-client predict --model {args.name} IMAGE.png"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``gradtrust prepare ...`` (the ``gradtrust`` entry point's own parser)."""
    from gradtrust.cli import main as gradtrust_main

    return gradtrust_main(["prepare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
