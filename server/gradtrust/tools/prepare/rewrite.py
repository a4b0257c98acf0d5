"""Build the servable graph: a canonical head, the convention's outputs, nothing else.

The head is re-emitted as ``Gemm(features, W, b, transB=1) -> logits`` whatever form it
had (Gemm with alpha/beta/transB, MatMul + Add, MatMul alone), with the effective weight
``W`` (C, D) as an initializer:
:func:`gradtrust.serving.classifier.head_weight_from_onnx` then reads
the very numbers the forward pass multiplies by. Softmax/LogSoftmax tails and every node
the new outputs do not need are pruned.
"""

from __future__ import annotations

import copy

import onnx
from onnx import helper, numpy_helper

from gradtrust.serving.contract import ACTIVATION, FEATURES, LOGITS
from gradtrust.tools.prepare.graph import Dim, Head, dims, fresh_name, tensor_names, walk_nodes

#: The name given to the batch dimension when the exported graph had none.
BATCH = "batch"


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read (outer-scope values must stay alive)."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in walk_nodes(sub):
                names.update(inner.input)
    return names


def prune(graph: onnx.GraphProto) -> None:
    """Drop (in place) the nodes, initializers and value infos no graph output depends on."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            needed |= _subgraph_inputs(node)
    kept.reverse()
    produced = {out for node in kept for out in node.output}
    inits = [i for i in graph.initializer if i.name in needed]
    init_names = {i.name for i in inits}
    inputs = [i for i in graph.input if i.name not in init_names or i.name in needed]
    infos = [v for v in graph.value_info if v.name in produced]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _activation_dims(model: onnx.ModelProto, head: Head) -> list[Dim]:
    """(K, h, w) of the exposed activation where shape inference knows them."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        values = {v.name: v for v in (*inferred.value_info, *inferred.output, *inferred.input)}
    except Exception:  # unknown sizes are fine: the output is declared with free dims
        values = {}
    found = values.get(head.activation or "")
    shape = list(dims(found)[1:]) if found is not None else [None, None, None]
    if len(shape) != 3:
        shape = [None, None, None]
    if head.activation_layout == "NHWC":
        shape = [shape[2], shape[0], shape[1]]
    return [d if isinstance(d, int) else None for d in shape]


def expose(
    model: onnx.ModelProto, head: Head, batch: Dim, with_activation: bool
) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are logits, features and (optionally) activation.

    ``batch`` is the batch dimension of the input and of every output: a name (dynamic
    batching) or 1 (a graph that only runs one sample at a time).
    """
    m = copy.deepcopy(model)
    g = m.graph
    source = g.input[[i.name for i in g.input].index(_input_name(m))]
    elem = source.type.tensor_type.elem_type
    taken = tensor_names(g)
    weight_name = fresh_name("gradtrust_head_weight", taken)
    g.initializer.append(numpy_helper.from_array(head.weight, weight_name))
    gemm_inputs = [head.features, weight_name]
    if head.bias is not None:
        bias_name = fresh_name("gradtrust_head_bias", taken)
        g.initializer.append(
            numpy_helper.from_array(head.bias.astype(head.weight.dtype), bias_name)
        )
        gemm_inputs.append(bias_name)
    classes, width = head.weight.shape
    nodes = [
        helper.make_node(
            "Gemm", gemm_inputs, [LOGITS], name=fresh_name("gradtrust_head", taken), transB=1
        ),
        helper.make_node(
            "Identity", [head.features], [FEATURES], name=fresh_name("gradtrust_features", taken)
        ),
    ]
    outputs = [
        helper.make_tensor_value_info(LOGITS, elem, [batch, classes]),
        helper.make_tensor_value_info(FEATURES, elem, [batch, width]),
    ]
    if with_activation and head.activation is not None:
        name = fresh_name("gradtrust_activation", taken)
        if head.activation_layout == "NHWC":
            nodes.append(
                helper.make_node(
                    "Transpose", [head.activation], [ACTIVATION], name=name, perm=[0, 3, 1, 2]
                )
            )
        else:
            nodes.append(helper.make_node("Identity", [head.activation], [ACTIVATION], name=name))
        shape = _activation_dims(model, head)
        outputs.append(helper.make_tensor_value_info(ACTIVATION, elem, [batch, *shape]))
    g.node.extend(nodes)
    del g.output[:]
    g.output.extend(outputs)
    if isinstance(batch, str):
        # A graph exported with a fixed batch of 1 declares it everywhere: free the input's
        # batch dimension and drop the stale intermediate shapes.
        dim0 = source.type.tensor_type.shape.dim[0]
        if dim0.HasField("dim_value"):
            dim0.dim_param = batch
            del g.value_info[:]
    prune(g)
    return m


def _input_name(model: onnx.ModelProto) -> str:
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)
