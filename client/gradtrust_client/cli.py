"""gradtrust-client: classify or explain image files through a running GradTrust server.

A thin layer over :class:`gradtrust_client.TrustClient`. Exit codes: 0 success, 2 bad
input (arguments, files, or a request the server rejected), 3 server or model not
available, 1 any other server error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from gradtrust_client._transport import DEFAULT_URLS
from gradtrust_client.client import DEFAULT_MODEL, METHODS, ModelInfo, Prediction, TrustClient
from gradtrust_client.errors import (
    InvalidRequestError,
    ModelNotReadyError,
    ServerUnavailableError,
    TrustClientError,
)
from gradtrust_client.images import load_images_with_names, overlay_png

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_UNAVAILABLE = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used as the process status)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "explain" and args.contrast is not None and args.method != "contrast":
        parser.error(f"--contrast only applies to --method contrast, not {args.method}")
    paths = args.images if args.command == "predict" else [args.image]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        return _fail(f"no such image file: {', '.join(missing)}", EXIT_BAD_INPUT)
    try:
        with TrustClient(
            args.url,
            args.protocol,
            args.model,
            args.timeout,
            compress_responses=args.compress_responses,
        ) as client:
            if args.command == "predict":
                return _predict(client, args)
            return _explain(client, args)
    except InvalidRequestError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except (ServerUnavailableError, ModelNotReadyError) as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)
    except TrustClientError as exc:
        return _fail(str(exc), EXIT_ERROR)


def _sends_files(info: ModelInfo, paths: Sequence[str]) -> bool:
    """Models that decode PNG/JPEG themselves (IMAGE_BYTES) get the files as they are, so
    the server applies the entry's own resize and normalisation; arrays are sent as arrays."""
    return info.encoded_input is not None and not any(
        Path(p).suffix.lower() in (".npy", ".npz") for p in paths
    )


def _predict(client: TrustClient, args: argparse.Namespace) -> int:
    info = client.model_info()
    images: np.ndarray | list[str]
    if _sends_files(info, args.images):
        images, names = list(args.images), list(args.images)
    else:
        images, names = load_images_with_names(args.images, _fixed_shape(info.input_shape))
    scores: bool | list[str] = False
    if args.scores is not None:
        scores = [s for s in args.scores.split(",") if s.strip()] or True
    predictions = client.predict(
        images,
        scores=scores,
        contrast_k=args.contrast_k,
        trust_prob=args.trust_prob,
        introspect=args.introspect,
    )
    if args.json:
        rows = [{"file": name, **asdict(p)} for name, p in zip(names, predictions, strict=True)]
        print(json.dumps(rows, indent=2))
    else:
        print(_table(names, predictions))
    return EXIT_OK


def _explain(client: TrustClient, args: argparse.Namespace) -> int:
    info = client.model_info()
    images, names = load_images_with_names([args.image], _fixed_shape(info.input_shape))
    if len(images) != 1:
        raise InvalidRequestError(
            f"{args.image} holds {len(images)} images; explain takes one image per call"
        )
    contrast: int | str | None = args.contrast
    if isinstance(contrast, str) and contrast.strip().isdigit():
        contrast = int(contrast)
    sent = [args.image] if _sends_files(info, [args.image]) else images
    (explanation,) = client.explain(sent, method=args.method, contrast=contrast)
    question = explanation.question(info.labels)
    summary = {
        "file": names[0],
        "question": question,
        "label": explanation.label,
        "class_id": explanation.class_id,
        "confidence": explanation.confidence,
        "gradtrust": explanation.gradtrust,
        "method": explanation.method,
        "contrast_class": explanation.contrast_class,
        "stats": explanation.stats,
        "out": None,
    }
    if args.out is not None:
        summary["out"] = str(overlay_png(images[0], explanation.heatmap, question, args.out))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(question)
        print(
            f"{names[0]}: {explanation.label} (confidence {explanation.confidence:.4f}, "
            f"gradtrust {explanation.gradtrust:.3f})"
        )
        if explanation.stats:
            print("  " + ", ".join(f"{k} {v:.4f}" for k, v in explanation.stats.items()))
        if summary["out"]:
            print(f"overlay written to {summary['out']}")
    return EXIT_OK


def _table(names: Sequence[str], predictions: Sequence[Prediction]) -> str:
    score_names = list(predictions[0].scores or {}) if predictions else []
    with_prob = bool(predictions) and predictions[0].trust_prob is not None
    header = ["file", "label", "confidence", "gradtrust", *(["trust_prob"] if with_prob else [])]
    second = bool(predictions) and predictions[0].introspection is not None
    header += ["introspective", "intro_conf", "agrees"] if second else []
    header += score_names
    rows = [header]
    for name, p in zip(names, predictions, strict=True):
        scores = p.scores or {}
        rows.append(
            [name, p.label, f"{p.confidence:.4f}", f"{p.gradtrust:.3f}"]
            + ([f"{p.trust_prob:.4f}"] if with_prob else [])
            + (
                [p.introspection.label, f"{p.introspection.confidence:.4f}"]
                + ["yes" if p.introspection.agrees else "NO"]
                if p.introspection is not None
                else []
            )
            + [f"{scores[s]:.4g}" for s in score_names]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _fixed_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape) <= 0:
        raise InvalidRequestError(
            f"the model takes inputs of shape {tuple(shape)}; the CLI reads files only for "
            "fixed (C, H, W) inputs"
        )
    return shape[0], shape[1], shape[2]


def _fail(message: str, code: int) -> int:
    print(f"gradtrust-client: error: {message}", file=sys.stderr)
    return code


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=None,
        help=f"server host:port (default {DEFAULT_URLS['http']} for http, "
        f"{DEFAULT_URLS['grpc']} for grpc)",
    )
    common.add_argument("--protocol", choices=("http", "grpc"), default="http")
    common.add_argument("--model", default=DEFAULT_MODEL, help="model name (default %(default)s)")
    common.add_argument(
        "--timeout", type=_positive_float, default=60.0, help="seconds per request (default 60)"
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument(
        "--compress-responses",
        action="store_true",
        help="HTTP: let the server gzip its answers (off by default: gzipping a full-size "
        "heatmap costs the server more CPU than the map; useful on slow links only)",
    )

    parser = argparse.ArgumentParser(
        prog="gradtrust-client",
        description="Classify images with a trust score, or explain a prediction, through a "
        "running GradTrust server (start one with `gradtrust serve`).",
        epilog="exit codes: 0 ok, 1 server error, 2 bad input, 3 server or model unavailable",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict", parents=[common], help="label, confidence and trust score of each image"
    )
    predict.add_argument(
        "images", nargs="+", metavar="IMAGE", help="PNG/JPEG files, or .npy/.npz arrays"
    )
    predict.add_argument(
        "--scores",
        nargs="?",
        const="",
        default=None,
        metavar="NAMES",
        help="also return trust scores: the model's default list, or comma-separated NAMES",
    )
    predict.add_argument(
        "--trust-prob",
        action="store_true",
        help="also return TRUST_PROB, the calibrated P(correct) (after gradtrust calibrate)",
    )
    predict.add_argument(
        "--introspect",
        action="store_true",
        help="also return the introspective (second-stage) prediction and whether it agrees "
        "(after gradtrust introspect)",
    )
    predict.add_argument(
        "--contrast-k",
        type=_positive_int,
        default=None,
        help="runner-up classes contrast_trust compares against",
    )

    explain = commands.add_parser(
        "explain", parents=[common], help="heatmap answering a question about one prediction"
    )
    explain.add_argument("image", metavar="IMAGE", help="one PNG/JPEG file or .npy array")
    explain.add_argument("--method", choices=METHODS, default="gradcam")
    explain.add_argument(
        "--contrast",
        default=None,
        metavar="CLASS",
        help="class index or label Q for --method contrast (default: the runner-up)",
    )
    explain.add_argument("--out", type=Path, default=None, help="write the overlay PNG here")
    return parser


if __name__ == "__main__":
    sys.exit(main())
