"""``gradtrust prepare`` as a function: a model file in, a servable repository entry out.

Everything that can fail is checked before the first byte is written: the entry name, an
existing entry, the labels file, the model itself (rewritten and verified in memory), the
labels against the class count and the preprocessing against the input shape. Only then is
the entry written, atomically (:func:`gradtrust.tools.prepare.entry.write_entry`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gradtrust.errors import ConfigError, InvalidInputError
from gradtrust.serving.bls import WrapSpec
from gradtrust.serving.decoding import DEFAULT_SCALE, PreprocessSpec, image_geometry
from gradtrust.serving.settings import DEFAULT_SCORES, parse_score_names
from gradtrust.tools.prepare.classifier import PreparedModel, prepare_onnx
from gradtrust.tools.prepare.entry import (
    EntryModel,
    check_name,
    config_text,
    entry_files,
    onnx_entry_model,
    read_labels,
    write_entry,
)


@dataclass(frozen=True)
class PreparedEntry:
    """What was written, for the caller to report."""

    path: Path
    model: EntryModel  # what the config says about the classifier
    prepared: PreparedModel | None  # the rewritten graph; None for a wrapped deployed model
    spec: PreprocessSpec
    labels: tuple[str, ...]


def _source_model(
    onnx_file: str | os.PathLike[str] | None,
    torch_model: str | None,
    weights: str | os.PathLike[str] | None,
    input_shape: Sequence[int] | None,
    output: str | None,
    layout: str,
    input_size: tuple[int, int] | None,
) -> PreparedModel:
    if (onnx_file is None) == (torch_model is None):
        raise ConfigError("pass exactly one of --onnx, --torch and --wrap")
    if onnx_file is not None:
        if weights is not None or input_shape is not None:
            raise ConfigError("--weights and --input-shape are for --torch models only")
        return prepare_onnx(onnx_file, output=output, layout=layout, input_size=input_size)
    if not input_shape or min(input_shape) < 1:
        raise ConfigError(
            "--torch needs --input-shape: the per-sample input dims in the model's layout, "
            "e.g. --input-shape 3 224 224 (NCHW) or 224 224 3 (NHWC)"
        )
    from gradtrust.tools.prepare.torch_import import export_onnx, load_torch_model

    model = load_torch_model(str(torch_model), weights)
    with tempfile.TemporaryDirectory(prefix="gradtrust-prepare-") as tmp:
        path = Path(tmp) / "exported.onnx"
        export_onnx(model, input_shape, path)
        return prepare_onnx(path, output=output, layout=layout, input_size=input_size)


def _wrapped_model(
    wrap: WrapSpec, input_shape: Sequence[int] | None, labels: str | os.PathLike[str] | None
) -> tuple[EntryModel, tuple[str, ...]]:
    if labels is None:
        raise ConfigError("--wrap needs --labels: the class names also give the class count")
    if not input_shape or min(input_shape) < 1:
        raise ConfigError(
            "--wrap needs --input-shape: the deployed model's per-sample input dims, "
            "e.g. --input-shape 3 224 224"
        )
    names = read_labels(labels, None)
    model = EntryModel(
        input_dims=tuple(input_shape),
        input_dtype="float32",
        num_classes=len(names),
        max_batch_size=None,
        parameters=wrap.to_parameters(),
        comments=(
            f"Scores the deployed model {wrap.model!r} through BLS (it must be loaded in the "
            "same server).",
            "Heatmaps: unavailable (a deployed model exposes no activation)",
        ),
    )
    return model, names


def prepare_entry(
    repository: str | os.PathLike[str],
    name: str,
    *,
    onnx_file: str | os.PathLike[str] | None = None,
    torch_model: str | None = None,
    wrap: WrapSpec | None = None,
    weights: str | os.PathLike[str] | None = None,
    input_shape: Sequence[int] | None = None,
    labels: str | os.PathLike[str] | None = None,
    output: str | None = None,
    layout: str = "NCHW",
    input_size: tuple[int, int] | None = None,
    scale: float = DEFAULT_SCALE,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    max_batch_size: int = 64,
    scores: str | Sequence[str] | None = None,
    low_trust_threshold: float | None = None,
    force: bool = False,
) -> PreparedEntry:
    """Prepare ``onnx_file``, ``torch_model`` or a deployed model (``wrap``) as entry
    ``name`` of ``repository``.

    Raises :class:`ConfigError` (nothing written) when the model or an option cannot be used.
    """
    check_name(name)
    target = Path(repository) / name
    if (target.exists() or target.is_symlink()) and not force:
        raise ConfigError(
            f"{target} already exists: choose another --name, or pass --force to replace it"
        )
    if labels is not None and not Path(labels).is_file():
        raise ConfigError(
            f"labels file {labels} not found: pass a text file with one class name per line, "
            "or leave --labels out to name the classes 0..C-1"
        )
    if max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    try:
        score_names = DEFAULT_SCORES if scores is None else parse_score_names(scores, "--scores")
    except InvalidInputError as err:
        raise ConfigError(str(err)) from None
    layout = layout.upper()
    prepared: PreparedModel | None = None
    if wrap is not None:
        if onnx_file is not None or torch_model is not None:
            raise ConfigError("pass exactly one of --onnx, --torch and --wrap")
        model, names = _wrapped_model(wrap, input_shape, labels)
        if wrap.features is None:
            if scores is not None and "gradnorm" in score_names:
                raise ConfigError("--scores gradnorm needs the features: pass --wrap-features")
            score_names = tuple(n for n in score_names if n != "gradnorm")
        source = f"deployed model {wrap.model}"
    else:
        prepared = _source_model(
            onnx_file, torch_model, weights, input_shape, output, layout, input_size
        )
        model = onnx_entry_model(prepared)
        names = (
            read_labels(labels, prepared.num_classes)
            if labels is not None
            else tuple(str(i) for i in range(prepared.num_classes))
        )
        source = Path(os.fspath(onnx_file or torch_model or "")).name
    if low_trust_threshold is not None and not 0.0 <= low_trust_threshold < float("inf"):
        raise ConfigError(
            f"--low-trust-threshold must be a finite number >= 0 (GradTrust's range), "
            f"got {low_trust_threshold}"
        )
    channels, fixed = image_geometry(model.input_dims, layout)
    spec = PreprocessSpec(
        channels=channels,
        layout=layout,
        size=input_size or fixed,
        scale=float(scale),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        dtype=model.input_dtype,
    )
    config = config_text(
        name, model, spec, max_batch_size, score_names, low_trust_threshold, source
    )
    files = entry_files(config, names, prepared.model if prepared is not None else None)
    path = write_entry(repository, name, files, force)
    return PreparedEntry(path=path, model=model, prepared=prepared, spec=spec, labels=names)
