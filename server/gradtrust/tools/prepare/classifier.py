"""From any exported ONNX classifier to a verified, servable graph (no files written here).

Steps: read and check the file, refuse unsupported operators, free the convention's output
names, find the head (:mod:`gradtrust.tools.prepare.graph`), rebuild the outputs
(:mod:`gradtrust.tools.prepare.rewrite`) and check the result against the original on a probe
batch (:mod:`gradtrust.tools.prepare.verify`). A graph exported with a fixed batch of 1 is given
a dynamic batch dimension when it still computes the same thing, else it is served one
sample at a time.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import onnx

from gradtrust.errors import ConfigError
from gradtrust.serving.decoding import LAYOUTS
from gradtrust.tools.prepare.graph import (
    FLOAT_TYPES,
    Dim,
    Head,
    check_operators,
    choose_output,
    dims,
    find_head,
    free_reserved_names,
    image_input,
    load_model,
)
from gradtrust.tools.prepare.rewrite import BATCH, expose
from gradtrust.tools.prepare.verify import probe_batch, session, verify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedModel:
    """A rewritten classifier and what its model-repository entry must say about it."""

    model: onnx.ModelProto
    head: Head
    input_dims: tuple[Dim, ...]  # per sample, as declared (str or None: dynamic)
    input_dtype: str  # numpy name: float32, float16 or float64
    max_batch_size: int | None  # 1: the graph runs one sample at a time; None: no limit
    heatmaps: bool  # an activation output that pools into the features is exposed
    notes: tuple[str, ...]  # what a user should know (printed by the CLI)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def feature_dim(self) -> int:
        return int(self.head.weight.shape[1])


def probe_shape(
    input_dims: Sequence[Dim], layout: str, input_size: tuple[int, int] | None
) -> tuple[int, ...]:
    """Concrete per-sample dims for the probe batch: dynamic H, W come from ``input_size``."""
    filled = list(input_dims)
    if input_size is not None:
        if len(filled) != 3:
            raise ConfigError(
                f"--input-size applies to image inputs (C, H, W) or (H, W, C); this model's "
                f"input has per-sample shape {list(input_dims)}: drop --input-size"
            )
        spatial = (1, 2) if layout == "NCHW" else (0, 1)
        for axis, size in zip(spatial, input_size, strict=True):
            if isinstance(filled[axis], int) and filled[axis] != size:
                raise ConfigError(
                    f"--input-size {input_size[0]} {input_size[1]} disagrees with the model's "
                    f"fixed input shape {list(input_dims)} ({layout}): drop it or fix --layout"
                )
            filled[axis] = size
    dynamic = [i for i, d in enumerate(filled) if not isinstance(d, int) or d < 1]
    if dynamic:
        raise ConfigError(
            f"the model's input shape {list(input_dims)} has dynamic dimensions besides the "
            "batch: pass --input-size H W (and --layout) so that the model can be checked "
            "and encoded images resized"
        )
    return tuple(d for d in filled if isinstance(d, int))  # all ints: checked above


def _layout_note(input_dims: Sequence[Dim], layout: str) -> str | None:
    """A hint when the declared layout makes an odd channel count and the other would not."""
    if len(input_dims) != 3:
        return None
    first, last = input_dims[0], input_dims[2]
    channels, other = (first, last) if layout == "NCHW" else (last, first)
    if isinstance(channels, int) and channels not in (1, 3, 4) and other in (1, 3):
        flipped = "NHWC" if layout == "NCHW" else "NCHW"
        return (
            f"the input {list(input_dims)} has {channels} channels as {layout}; if the model "
            f"takes {other}-channel images, prepare it again with --layout {flipped}"
        )
    return None


def prepare_onnx(
    source: str | os.PathLike[str] | onnx.ModelProto,
    output: str | None = None,
    layout: str = "NCHW",
    input_size: tuple[int, int] | None = None,
) -> PreparedModel:
    """Rewrite an ONNX classifier into the serving convention and verify it.

    The convention is :mod:`gradtrust.serving.classifier`'s.

        Raises :class:`ConfigError` with what to do when the model cannot be served.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    original = source if isinstance(source, onnx.ModelProto) else load_model(source)
    check_operators(original)
    source_input = image_input(original)
    full = dims(source_input)
    if len(full) < 2:
        raise ConfigError(
            f"input {source_input.name!r} has shape {list(full)}; a classifier's input needs "
            "a batch dimension followed by the sample's dimensions"
        )
    batch_dim, input_dims = full[0], full[1:]
    if isinstance(batch_dim, int) and batch_dim > 1:
        raise ConfigError(
            f"the model's batch dimension is fixed at {batch_dim}; re-export it with a dynamic "
            "batch axis (torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}))"
        )
    original_output = choose_output(original, output)
    session(original, "the model")  # unsupported operators or opsets fail here, clearly
    renamed = copy.deepcopy(original)
    names = free_reserved_names(renamed)
    head = find_head(renamed, names.get(original_output, original_output))
    probe = probe_batch(
        probe_shape(input_dims, layout, input_size),
        FLOAT_TYPES[source_input.type.tensor_type.elem_type],
    )
    fixed_batch = isinstance(batch_dim, int)
    notes: list[str] = []
    max_batch: int | None = None

    def build(batch: Dim, with_activation: bool) -> tuple[onnx.ModelProto, bool]:
        model = expose(renamed, head, batch, with_activation)
        pools = verify(original, original_output, model, head, probe, fixed_batch, batch == 1)
        return model, pools

    batch_name = batch_dim if isinstance(batch_dim, str) else BATCH
    try:
        model, pools = build(batch_name, True)
    except ConfigError:
        if not fixed_batch:
            raise
        model, pools = build(1, True)
        max_batch = 1
        notes.append(
            "the model was exported with a fixed batch size of 1 and does not run on larger "
            "batches: it is served one sample at a time (max_batch_size 1); re-export it with "
            "dynamic_axes={'input': {0: 'batch'}} to batch requests"
        )
    if head.activation is not None and not pools:
        model, _ = build(1 if max_batch == 1 else batch_name, False)
        head = replace(head, activation=None, activation_layout=None)
        notes.append(
            "the layer before global average pooling does not reproduce the features when "
            "averaged, so closed-form heatmaps are off for this model"
        )
    elif head.activation is None:
        notes.append(
            "no conv activation feeds global average pooling before the last linear layer: "
            "scores are served, HEATMAP requests are refused"
        )
    layout_note = _layout_note(input_dims, layout)
    if layout_note:
        notes.append(layout_note)
    for note in notes:
        log.info(note)
    return PreparedModel(
        model=model,
        head=head,
        input_dims=tuple(input_dims),
        input_dtype=FLOAT_TYPES[source_input.type.tensor_type.elem_type],
        max_batch_size=max_batch,
        heatmaps=head.activation is not None,
        notes=tuple(notes),
    )
