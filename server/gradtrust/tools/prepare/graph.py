"""Find a classifier's final linear layer in an ONNX graph and expose what the server needs.

A trained classifier usually ends ``features -> Gemm (or MatMul + Add) -> [Softmax]``
and names its one output however its exporter liked. The server needs the pre-softmax
logits, the penultimate features and, for closed-form heatmaps, the conv activation that
global average pooling turns into those features (:mod:`gradtrust.serving.classifier`'s convention).
This module locates them by walking the graph backwards from the output, rewrites the head
into one canonical ``Gemm(features, W, b, transB=1) -> logits`` (so the weight the server
reads is exactly the one it multiplies by), and prunes everything the new outputs do not
need. :mod:`gradtrust.tools.prepare.verify` then checks the result numerically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gradtrust.errors import ConfigError
from gradtrust.serving.contract import ACTIVATION, FEATURES, LOGITS

#: Ops allowed between the logits and the graph output; they change nothing the scores need
#: (Softmax/LogSoftmax are recomputed from the logits; Dropout is the identity at inference;
#: a reshape of (N, C) to (N, C) is a no-op, and any other reshape fails verification).
TAIL_OPS = frozenset(
    {"Softmax", "LogSoftmax", "Identity", "Dropout", "Flatten", "Reshape", "Squeeze"}
)
#: Ops allowed between global average pooling and the head's input: they only drop the
#: 1x1 spatial dimensions (or do nothing at inference).
SHAPE_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Identity", "Dropout"})
FLOAT_TYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.DOUBLE: "float64",
}
#: Operator domains onnxruntime implements.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

Dim = int | str | None
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Head:
    """Where the classifier's answer comes from, in the (renamed) graph."""

    output: str  # the graph output that was followed back
    logits: str  # pre-softmax logits (N, C)
    features: str  # the final linear layer's input (N, D)
    weight: np.ndarray  # W (C, D), as z = features @ W.T + bias
    bias: np.ndarray | None  # (C,)
    tail: tuple[str, ...]  # ops between the logits and the output, output side first
    activation: str | None  # (N, K, h, w) feeding global average pooling, if any
    activation_layout: str | None  # "NCHW", or "NHWC" (transposed when exposed)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file; a missing, unreadable or empty one is a :class:`ConfigError`.

    A graph the ONNX checker finds fault with but that parses is let through: exporters
    produce such files that onnxruntime runs, and onnxruntime (the server's runtime) has
    the last word when the model is verified.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"ONNX file {path} not found: pass the path of your exported model")
    problem: Exception | None = None
    try:
        model = onnx.load(os.fspath(path))
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        problem = err
    except Exception as err:  # protobuf's decoder raises several unrelated types
        problem = err
        model = onnx.ModelProto()
    if not model.graph.node:
        raise ConfigError(
            f"{path} is not a valid ONNX model ({type(problem).__name__}: {problem}); "
            "re-export it, e.g. with torch.onnx.export(..., opset_version=17)"
        )
    if problem is not None:
        log.info("the ONNX checker reports %s; onnxruntime will decide", problem)
    return model


def walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those of subgraphs (If, Loop, Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from walk_nodes(sub)


def check_operators(model: onnx.ModelProto) -> None:
    """Refuse custom or unknown operators before onnxruntime gives a less readable error."""
    bad = sorted(
        {
            f"{node.domain or 'ai.onnx'}::{node.op_type}"
            for node in walk_nodes(model.graph)
            if node.domain not in KNOWN_DOMAINS
            or (node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type))
        }
    )
    if bad:
        raise ConfigError(
            f"unsupported operator(s) {bad}: onnxruntime in the server cannot run them; "
            "re-export the model with standard ONNX operators (opset 17) only"
        )


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The graph's one real input (initializers listed as inputs do not count)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConfigError(
            f"the model has {len(inputs)} inputs {[i.name for i in inputs]}; a servable "
            "classifier takes exactly one image tensor: export it with a single input"
        )
    elem = inputs[0].type.tensor_type.elem_type
    if elem not in FLOAT_TYPES:
        raise ConfigError(
            f"input {inputs[0].name!r} has element type {TensorProto.DataType.Name(elem)}; "
            "the server feeds float tensors (float32, float16 or float64): export the model "
            "with a float input and do the conversion inside it"
        )
    return inputs[0]


def dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    """A tensor's dimensions: ints, names of symbolic dims, or None where unknown."""
    shape = value.type.tensor_type.shape
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim
    )


# ---------------------------------------------------------------------------------------
# Renaming, so that the convention's names are free for the new outputs
# ---------------------------------------------------------------------------------------
def tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names |= {i.name for i in graph.initializer}
    for node in walk_nodes(graph):
        names.update(node.input)
        names.update(node.output)
    return names


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... whichever is not in ``taken`` (then taken)."""
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if value.name == old:
            value.name = new
    for node in walk_nodes(graph):
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name == old:
                    seq[i] = new


def free_reserved_names(model: onnx.ModelProto) -> dict[str, str]:
    """Rename tensors called logits/features/activation (in place); returns old -> new."""
    taken = tensor_names(model.graph)
    renamed = {}
    for name in (LOGITS, FEATURES, ACTIVATION):
        if name in taken:
            renamed[name] = fresh_name(f"{name}_original", taken)
            _rename(model.graph, name, renamed[name])
    return renamed


# ---------------------------------------------------------------------------------------
# Finding the head
# ---------------------------------------------------------------------------------------
class _Graph:
    """Look-ups over one graph: producers, constants and inferred ranks."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.producer = {out: node for node in model.graph.node for out in node.output if out}
        self.constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output:
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.to_array(value.t)
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
            values = (*inferred.input, *inferred.value_info, *inferred.output)
        except Exception:  # shape inference is a hint only; the ORT check is authoritative
            values = (*model.graph.input, *model.graph.value_info, *model.graph.output)
        self.shapes = {v.name: dims(v) for v in values if v.type.tensor_type.HasField("shape")}

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    attr = next((a for a in node.attribute if a.name == name), None)
    return default if attr is None else helper.get_attribute_value(attr)


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return int(_attr(node, name, default))


def _opset(model: onnx.ModelProto) -> int:
    """The default-domain opset version the graph was exported with."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _no_head(output: str, node: onnx.NodeProto | None, tail: list[str]) -> ConfigError:
    where = "the graph input" if node is None else f"a {node.op_type} node ({node.name or '?'})"
    after = f" (after stepping back over {', '.join(tail)})" if tail else ""
    return ConfigError(
        f"no final linear layer: output {output!r} comes from {where}{after}. gradtrust serves "
        "classifiers whose logits come from a linear layer (Gemm, or MatMul + Add) with "
        "constant weights, optionally followed by Softmax or LogSoftmax; export the model "
        "so that it ends that way (e.g. torch.nn.Linear as the last layer)"
    )


def _dynamic_classes(node: onnx.NodeProto) -> ConfigError:
    return ConfigError(
        f"dynamic class count: the final {node.op_type} ({node.name or '?'}) multiplies by a "
        "tensor computed at run time, not by a constant weight, so the number of classes is "
        "not fixed by the model; export a classifier whose last linear layer has constant "
        "weights (torch.nn.Linear with its trained weights)"
    )


def _linear(g: _Graph, name: str) -> tuple[str, np.ndarray, np.ndarray | None] | None:
    """(features, W (C, D), bias (C,) or None) if ``name`` is produced by a linear layer."""
    node = g.producer.get(name)
    if node is None:
        return None
    if node.op_type == "Gemm":
        if _int_attr(node, "transA", 0):
            raise ConfigError(f"unsupported head: Gemm {node.name!r} has transA=1; export without")
        b = g.constants.get(node.input[1])
        if b is None:
            raise _dynamic_classes(node)
        alpha = float(_attr(node, "alpha", 1.0))
        beta = float(_attr(node, "beta", 1.0))
        weight = alpha * (b if _int_attr(node, "transB", 0) else b.T)
        bias = g.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and bias is None:
            return None  # a run-time "bias": not a linear layer
        return node.input[0], weight, None if bias is None else beta * bias
    if node.op_type == "MatMul":
        w = g.constants.get(node.input[1])
        if w is None:
            raise _dynamic_classes(node)
        if w.ndim != 2 or g.rank(node.input[0]) not in (None, 2):
            raise ConfigError(
                f"unsupported head: MatMul {node.name!r} is not applied to (batch, features) "
                f"vectors (weight shape {w.shape}, input rank {g.rank(node.input[0])}); "
                "flatten or pool the features before the last linear layer"
            )
        return node.input[0], w.T, None
    if node.op_type == "Add":
        for i in (0, 1):
            bias = g.constants.get(node.input[1 - i])
            inner = g.producer.get(node.input[i])
            if bias is not None and inner is not None and inner.op_type == "MatMul":
                found = _linear(g, node.input[i])
                if found is not None:
                    return found[0], found[1], bias
    return None


def _as_bias(bias: np.ndarray | None, classes: int, node_name: str) -> np.ndarray | None:
    if bias is None:
        return None
    if bias.size not in (1, classes) or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
        raise ConfigError(
            f"unsupported head: the bias of {node_name!r} has shape {bias.shape}; "
            f"expected ({classes},) or (1, {classes})"
        )
    return np.broadcast_to(bias.reshape(-1), (classes,)).copy()


def _pooled_activation(g: _Graph, features: str) -> tuple[str | None, str | None]:
    """The activation that global average pooling turns into ``features``, and its layout."""
    name = features
    node = g.producer.get(name)
    while node is not None and node.op_type in SHAPE_OPS:
        name = node.input[0]
        node = g.producer.get(name)
    if node is None or g.rank(node.input[0]) not in (None, 4):
        return None, None
    if node.op_type == "GlobalAveragePool":
        return node.input[0], "NCHW"
    if node.op_type == "ReduceMean" and g.rank(node.input[0]) == 4:
        axes = _attr(node, "axes", None)
        if axes is None and len(node.input) > 1:
            axes = g.constants.get(node.input[1])
        spatial = {int(a) % 4 for a in np.asarray(axes).reshape(-1)} if axes is not None else None
        if spatial == {2, 3}:
            return node.input[0], "NCHW"
        if spatial == {1, 2}:
            return node.input[0], "NHWC"
    return None, None


def choose_output(model: onnx.ModelProto, output: str | None) -> str:
    """The graph output to follow back: the one named, the only one, or one named logits."""
    names = [o.name for o in model.graph.output]
    if output is not None:
        if output not in names:
            raise ConfigError(f"the model has no output {output!r}; its outputs are {names}")
        return output
    if len(names) == 1:
        return names[0]
    if LOGITS in names:
        return LOGITS
    raise ConfigError(
        f"several candidate outputs {names}: pass --output NAME to say which one holds the "
        "class scores (logits or probabilities)"
    )


def find_head(model: onnx.ModelProto, output: str) -> Head:
    """Walk back from ``output`` over Softmax/LogSoftmax/Identity/Dropout to the linear layer."""
    g = _Graph(model)
    name, tail = output, []
    node = g.producer.get(name)
    while node is not None and node.op_type in TAIL_OPS:
        if node.op_type in ("Softmax", "LogSoftmax"):
            axis = _int_attr(node, "axis", -1 if _opset(model) >= 13 else 1)
            if axis not in (-1, 1):
                raise ConfigError(
                    f"unsupported output: {node.op_type} over axis {axis}; the class scores "
                    "must be (batch, classes) with the softmax over the classes"
                )
        tail.append(node.op_type)
        name = node.input[0]
        node = g.producer.get(name)
    found = _linear(g, name)
    if found is None:
        raise _no_head(output, node, tail)
    features, weight, bias = found
    head_node = node.name if node is not None else "?"
    if weight.shape[0] < 2:
        raise ConfigError(
            f"the final linear layer ({head_node}) has {weight.shape[0]} output; GradTrust "
            "needs a classifier with at least 2 classes"
        )
    activation, layout = _pooled_activation(g, features)
    return Head(
        output=output,
        logits=name,
        features=features,
        weight=weight,
        bias=_as_bias(bias, weight.shape[0], head_node),
        tail=tuple(tail),
        activation=activation,
        activation_layout=layout,
    )
