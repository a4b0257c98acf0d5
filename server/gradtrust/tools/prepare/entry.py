"""Write a complete model-repository entry, all at once or not at all.

An entry is ``NAME/config.pbtxt``, ``NAME/labels.txt``, ``NAME/1/model.onnx`` and
``NAME/1/model.py`` (one import line: the logic lives in the installed package). Every file
is first written into a staging folder next to the repository, and the folder is renamed
into place last, so a failure at any step leaves the repository exactly as it was.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from gradtrust.core import scores
from gradtrust.errors import ConfigError
from gradtrust.serving.contract import IMAGE, IMAGE_BYTES, OUTPUT_SPECS
from gradtrust.serving.decoding import PreprocessSpec
from gradtrust.serving.settings import DEFAULT_SCORES
from gradtrust.tools.prepare.classifier import PreparedModel
from gradtrust.tools.prepare.graph import Dim

ONNX_FILE = "model.onnx"
VERSION = "1"
MODEL_PY = '"""Triton entry point: all logic lives in the installed ``gradtrust`` package."""\n\n'
MODEL_PY += "from gradtrust.triton.model import TritonPythonModel\n\n"
MODEL_PY += '__all__ = ["TritonPythonModel"]\n'
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64"}
_OUTPUTS = OUTPUT_SPECS


def check_name(name: str) -> str:
    """A Triton model name that is also a safe folder name."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"model name {name!r} is not usable: use letters, digits, '_', '-' and '.', "
            "not starting with '.' or '-'"
        )
    return name


def read_labels(path: str | os.PathLike[str], num_classes: int | None) -> tuple[str, ...]:
    """One label per line, exactly ``num_classes`` of them (None: at least 2), unique and
    non-empty."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"labels file {file} not found: pass a text file with one class name per line, "
            "or leave --labels out to name the classes 0..C-1"
        )
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read labels file {file} as UTF-8 text: {err}") from None
    labels = [line.strip() for line in lines]
    while labels and not labels[-1]:
        labels.pop()
    empty = [i + 1 for i, label in enumerate(labels) if not label]
    if empty:
        raise ConfigError(f"labels file {file} has empty line(s) {empty}: one label per line")
    if num_classes is None and len(labels) < 2:
        raise ConfigError(f"labels file {file} lists {len(labels)} labels; a classifier has >= 2")
    if num_classes is not None and len(labels) != num_classes:
        raise ConfigError(
            f"labels file {file} lists {len(labels)} labels but the model has {num_classes} "
            f"classes: give exactly {num_classes} labels, in the order of the model's outputs"
        )
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"labels file {file} repeats {repeated}: labels must be unique")
    return tuple(labels)


def default_threshold(num_classes: int) -> float:
    """A starting low-trust threshold until ``gradtrust calibrate`` fits one on data: the
    GradTrust of a prediction with probability 0.9 against a single runner-up (about 4.4;
    GradTrust depends only on the softmax, so the value means the same for any model)."""
    logits = np.full((1, num_classes), -60.0)  # the other classes: probability ~1e-26
    logits[0, :2] = (math.log(9.0), 0.0)
    return round(float(scores.gradtrust(logits)[0]), 3)


def _quote(text: str) -> str:
    return json.dumps(text)


@dataclass(frozen=True)
class EntryModel:
    """What config.pbtxt says about the classifier behind an entry."""

    input_dims: tuple[Dim, ...]  # per sample; str or None: dynamic
    input_dtype: str  # numpy name
    num_classes: int
    max_batch_size: int | None  # a limit the model imposes, or None
    parameters: dict[str, str]  # how the backend reaches the model (onnx_file, wrapped_*)
    comments: tuple[str, ...]  # for the human reading config.pbtxt


def onnx_entry_model(prepared: PreparedModel) -> EntryModel:
    """An entry running its own rewritten ONNX graph."""
    tail = prepared.head.tail
    return EntryModel(
        input_dims=prepared.input_dims,
        input_dtype=prepared.input_dtype,
        num_classes=prepared.num_classes,
        max_batch_size=prepared.max_batch_size,
        parameters={"onnx_file": ONNX_FILE},
        comments=(
            f"Head: {prepared.feature_dim} features -> {prepared.num_classes} classes"
            + (f" (removed after it: {', '.join(tail)})" if tail else ""),
            "Heatmaps: "
            + (
                "closed form at the activation before global average pooling"
                if prepared.heatmaps
                else "unavailable (no conv activation feeding global average pooling)"
            ),
        ),
    )


def _block(name: str, fields: Sequence[str]) -> str:
    body = "".join(f"\n    {f}" for f in fields)
    return f'  {{\n    name: "{name}"{body}\n  }}'


def config_text(
    name: str,
    model: EntryModel,
    spec: PreprocessSpec,
    max_batch_size: int = 64,
    scores: Sequence[str] = DEFAULT_SCORES,
    low_trust_threshold: float | None = None,
    source: str = "",
) -> str:
    """The entry's config.pbtxt."""
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in model.input_dims)
    batch = min(max_batch_size, model.max_batch_size or max_batch_size)
    decodable = spec.channels in (1, 3)
    optional = ["optional: true"] if decodable else []
    dtype = _TRITON_TYPES[model.input_dtype]
    inputs = [_block(IMAGE, [f"data_type: {dtype}", f"dims: [ {dims} ]", *optional])]
    if decodable:
        inputs.append(_block(IMAGE_BYTES, ["data_type: TYPE_STRING", "dims: [ 1 ]", *optional]))
    outputs = [_block(n, [f"data_type: {t}", f"dims: {d}"]) for n, t, d in _OUTPUTS]
    threshold = (
        default_threshold(model.num_classes) if low_trust_threshold is None else low_trust_threshold
    )
    params: dict[str, str] = {
        **model.parameters,
        "scores": ",".join(scores),
        "contrast_k": "3",
        "low_trust_threshold": repr(float(threshold)),
    }
    comments = [f"Written by `gradtrust prepare`{' from ' + source if source else ''}."]
    comments += model.comments
    if decodable:
        comments += [
            "IMAGE is the network's input tensor as it is; IMAGE_BYTES takes PNG/JPEG files,",
            "decoded, resized to image_resize and normalised as "
            "(pixel * image_scale - image_mean) / image_std.",
        ]
        params.update(spec.to_parameters())
    else:
        comments.append("IMAGE is the network's input tensor as it is.")
    entries = ",\n".join(
        f"  {{ key: {_quote(k)}, value: {{ string_value: {_quote(v)} }} }}"
        for k, v in params.items()
    )
    lines = [
        *(f"# {c}" for c in comments),
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {batch}",
        "",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "",
        "output [\n" + ",\n".join(outputs) + "\n]",
        "",
        "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}",
        "",
        "instance_group [ { count: 1 } ]",
        "",
        "parameters [\n" + entries + "\n]",
    ]
    return "\n".join(lines) + "\n"


def entry_files(
    config: str, labels: Sequence[str], onnx_model: onnx.ModelProto | None
) -> dict[str, bytes]:
    """Relative path -> content of every file of the entry (no ONNX file for wrapped models)."""
    files = {
        "config.pbtxt": config.encode(),
        "labels.txt": ("\n".join(labels) + "\n").encode(),
        f"{VERSION}/model.py": MODEL_PY.encode(),
    }
    if onnx_model is not None:
        files[f"{VERSION}/{ONNX_FILE}"] = onnx_model.SerializeToString()
    return files


def _staging_parent(repository: Path) -> Path:
    """Stage next to the repository (never inside, where a polling Triton could see it)."""
    parent = repository.parent
    return parent if os.access(parent, os.W_OK) else repository


def write_entry(
    repository: str | os.PathLike[str], name: str, files: Mapping[str, bytes], force: bool
) -> Path:
    """Put ``files`` at ``repository/name`` atomically; an existing entry needs ``force``."""
    repo = Path(repository)
    target = repo / check_name(name)
    if (target.exists() or target.is_symlink()) and not force:
        raise ConfigError(
            f"{target} already exists: choose another --name, or pass --force to replace it"
        )
    if repo.exists() and not repo.is_dir():
        raise ConfigError(f"--repository {repo} is a file, not a folder")
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=_staging_parent(repo))
    )
    backup: Path | None = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; an entry is a normal folder
        for relative, content in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        if target.exists() or target.is_symlink():
            backup = staging.with_name(staging.name + ".old")
            target.rename(backup)
        staging.rename(target)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if backup is not None and not target.exists():
            backup.rename(target)
        if isinstance(err, OSError):
            raise ConfigError(f"cannot write {target} ({err}); nothing was changed") from err
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return target
