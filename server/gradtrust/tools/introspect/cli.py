"""``gradtrust introspect``: train an entry's introspective network and write it into the
entry as ``1/introspection.onnx`` (served on request as the INTROSPECTIVE_* outputs);
``--report`` then compares both stages on the held-out part, clean and corrupted."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from gradtrust.errors import ConfigError
from gradtrust.serving.contract import INTROSPECTION_ONNX


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "introspect",
        help="train the introspective (second-stage) network of an entry on labelled images",
        description=__doc__,
    )
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--model", default="gradtrust_mnist", help="model entry name")
    parser.add_argument("--onnx", help="classifier ONNX file (default: <entry>/1/model.onnx)")
    parser.add_argument(
        "--data",
        default="demo",
        help="'demo' (trains on the demo's calibration split, reports on its test split); a "
        "folder with one sub-folder of PNG/JPEG files per class, named as in the entry's "
        "labels.txt (read through the entry's preprocessing, split per class into a training "
        "part and a held-out part, see --heldout-fraction); or an .npz with arrays "
        "calibration_images, calibration_labels (trained on) and images, labels (held out)",
    )
    parser.add_argument(
        "--test-data",
        metavar="FOLDER",
        help="a second labelled image folder: train on all of --data (a folder) and report "
        "on all of this one",
    )
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.4,
        help="share of a --data folder held out from training, per class (default 0.4)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of splits, weights, batches and corruptions"
    )
    parser.add_argument("--hidden", type=int, default=128, help="units per hidden layer")
    parser.add_argument(
        "--rank", type=int, default=0, help="rank of the first layer (0: min(C, D, 16))"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="validation share for early stopping"
    )
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=15, help="epochs without improvement")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument(
        "--report",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE.md",
        help="after training, compare both stages on the held-out data, clean and under the "
        "corruption sweeps; print the table (or write it to FILE.md)",
    )
    parser.add_argument(
        "--severities", default="1,2,3,4,5", help="corruption severities in the report"
    )
    parser.set_defaults(func=run)


def _training_data(args: argparse.Namespace, classifier: Any) -> Any:
    from gradtrust.tools.evaluate.runner import demo_data, npz_data

    if args.data == "demo":
        return demo_data()
    if Path(args.data).is_dir():
        from gradtrust.tools.evaluate.folder import folder_data

        entry = Path(args.model_repository) / args.model
        return folder_data(
            args.data,
            entry,
            classifier.input_shape,
            np.dtype(classifier.input_dtype).name,
            args.heldout_fraction,
            args.seed,
        )
    return npz_data(args.data)


def _with_data(args: argparse.Namespace, data: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "data": data})


def _whole_folders(train: Any, test: Any) -> Any:
    """Every image of ``train`` to train on, every image of ``test`` held out."""
    from gradtrust.tools.evaluate.runner import LabelledData

    if train.to_input is None or test.to_input is None:
        raise ConfigError("--test-data needs --data to be an image folder too")
    return LabelledData(
        f"{train.name.split(' (')[0]} (train) / {test.name.split(' (')[0]} (test)",
        np.concatenate([test.calibration_images, test.test_images]),
        np.concatenate([test.calibration_labels, test.test_labels]),
        np.concatenate([train.calibration_images, train.test_images]),
        np.concatenate([train.calibration_labels, train.test_labels]),
        to_input=train.to_input,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from gradtrust.serving.classifier import OnnxClassifier
    from gradtrust.serving.introspector import Introspector
    from gradtrust.tools.introspect.network import export_onnx
    from gradtrust.tools.introspect.train import (
        TrainingConfig,
        network_outputs,
        train_introspective,
    )

    torch.set_num_threads(max(1, args.threads))
    entry = Path(args.model_repository) / args.model
    onnx_path = Path(args.onnx) if args.onnx else entry / "1" / "model.onnx"
    if not entry.is_dir():
        raise ConfigError(f"no model entry {entry}: give --model-repository and --model")
    classifier = OnnxClassifier(onnx_path, intra_op_threads=args.threads)
    data = _training_data(args, classifier)
    if args.test_data:
        data = _whole_folders(data, _training_data(_with_data(args, args.test_data), classifier))
    start = time.perf_counter()
    logits, features = network_outputs(
        classifier, data.calibration_images, data.to_input, desc="features"
    )
    config = TrainingConfig(
        hidden=args.hidden,
        rank=args.rank,
        seed=args.seed,
        val_fraction=args.val_fraction,
        max_epochs=args.max_epochs,
        patience=args.patience,
        lr=args.lr,
    )
    model, log = train_introspective(logits, features, data.calibration_labels, config)
    out = export_onnx(model, entry / "1" / INTROSPECTION_ONNX)
    summary = {
        "data": f"{data.name}; training part",
        "seed": args.seed,
        "hidden": model.hidden,
        "rank": model.rank,
        "classes": model.num_classes,
        "features": model.num_features,
        "train_size": log.train_size,
        "validation_size": log.val_size,
        "epochs": log.epochs,
        "best_epoch": log.best_epoch,
        "validation_loss": round(log.best_val_loss, 6),
        "validation_accuracy": round(log.val_accuracy, 6),
        "torch_version": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (entry / "introspection_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"wrote {out} ({model.num_classes} classes, {model.num_features} features, rank "
        f"{model.rank}): best epoch {log.best_epoch} of {log.epochs}, validation accuracy "
        f"{log.val_accuracy:.3f} on {log.val_size} images; reload the model to serve it"
    )
    if args.report is not None:
        from gradtrust.tools.evaluate.shifts import CORRUPTIONS
        from gradtrust.tools.introspect import report

        introspector = Introspector(out, model.num_classes, model.num_features)
        grey = data.test_images.ndim == 4 and data.test_images.shape[1] == 1
        severities = tuple(int(s) for s in args.severities.split(",") if s.strip())
        rows = report.sweep(
            classifier,
            introspector,
            data.test_images,
            data.test_labels,
            tuple(CORRUPTIONS) if grey else (),
            severities,
            args.seed,
            data.to_input,
        )
        text = report.markdown(
            rows,
            f"Feed-forward (FF) vs introspective (intro) on the held-out images of {data.name}; "
            f"corruptions at severities {args.severities}"
            + ("" if grey else " (not run: the corruptions need grayscale images)"),
        )
        if args.report == "-":
            print(text)
        else:
            Path(args.report).write_text(text, encoding="utf-8")
            print(f"wrote {args.report}")
    return 0
