"""Graph surgery on hand-built ONNX graphs: each head form, each tail, each refusal."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gradtrust.errors import ConfigError
from gradtrust.serving.classifier import head_weight_from_onnx
from gradtrust.serving.contract import ACTIVATION, FEATURES, LOGITS
from gradtrust.tools.prepare import find_head, prepare_onnx
from tests.conftest import DEMO_ONNX

RNG = np.random.default_rng(7)
F32 = TensorProto.FLOAT


def const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def build(
    nodes: list[onnx.NodeProto],
    outputs: list[str],
    inits: list[onnx.TensorProto],
    input_shape: list[object] = ("n", 6),  # type: ignore[assignment]
    extra_inputs: list[onnx.ValueInfoProto] = (),  # type: ignore[assignment]
    input_type: int = F32,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", input_type, list(input_shape)), *extra_inputs],
        [helper.make_tensor_value_info(o, F32, None) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {session.get_inputs()[0].name: x})


W = RNG.normal(size=(6, 4)).astype(np.float32)  # (D, C) as MatMul takes it
B = RNG.normal(size=4).astype(np.float32)
X = RNG.random((3, 6)).astype(np.float32)


def test_find_head_folds_alpha_beta_and_transposition_when_head_is_a_general_gemm():
    model = build(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=2.0, beta=0.5, transB=0)],
        ["y"],
        [const("w", W), const("b", B)],
    )
    head = find_head(model, "y")
    np.testing.assert_allclose(head.weight, 2.0 * W.T)
    np.testing.assert_allclose(head.bias, 0.5 * B)
    prepared = prepare_onnx(model)
    (logits,) = run(prepared.model, [LOGITS], X)
    np.testing.assert_allclose(logits, X @ (2 * W) + 0.5 * B, rtol=1e-5)


def test_prepare_onnx_writes_a_head_the_runtime_reads_when_head_is_matmul_plus_bias(tmp_path):
    model = build(
        [
            helper.make_node("MatMul", ["x", "w"], ["mm"]),
            helper.make_node("Add", ["b", "mm"], ["y"]),
        ],
        ["y"],
        [const("w", W), const("b", B)],
    )
    prepared = prepare_onnx(model)
    onnx.save(prepared.model, tmp_path / "m.onnx")
    np.testing.assert_allclose(head_weight_from_onnx(tmp_path / "m.onnx"), W.T)
    np.testing.assert_allclose(run(prepared.model, [LOGITS], X)[0], X @ W + B, rtol=1e-5)


def test_find_head_has_no_bias_when_head_is_a_bare_matmul():
    model = build([helper.make_node("MatMul", ["x", "w"], ["y"])], ["y"], [const("w", W)])
    assert find_head(model, "y").bias is None
    np.testing.assert_allclose(run(prepare_onnx(model).model, [LOGITS], X)[0], X @ W, rtol=1e-5)


def test_prepare_onnx_serves_pre_softmax_logits_when_softmax_output_is_named_logits():
    model = build(
        [
            helper.make_node("Relu", ["x"], ["features"]),
            helper.make_node("Gemm", ["features", "w", "b"], ["z"]),
            helper.make_node("Dropout", ["z"], ["d"]),
            helper.make_node("Softmax", ["d"], ["logits"], axis=1),
        ],
        ["logits"],
        [const("w", W.T), const("b", B)],
    )
    model.graph.node[1].attribute.append(helper.make_attribute("transB", 1))
    prepared = prepare_onnx(model)
    assert prepared.head.tail == ("Softmax", "Dropout")
    logits, features = run(prepared.model, [LOGITS, FEATURES], X)
    np.testing.assert_allclose(features, np.maximum(X, 0))
    np.testing.assert_allclose(logits, np.maximum(X, 0) @ W + B, rtol=1e-5)


def test_prepare_onnx_transposes_the_activation_when_pooling_is_a_mean_over_nhwc_axes():
    k = 6
    model = build(
        [
            helper.make_node("Relu", ["x"], ["act"]),
            helper.make_node("ReduceMean", ["act"], ["h"], axes=[1, 2], keepdims=0),
            helper.make_node("Gemm", ["h", "w", "b"], ["y"], transB=1),
        ],
        ["y"],
        [const("w", W.T), const("b", B)],
        input_shape=["n", 5, 7, k],
    )
    prepared = prepare_onnx(model, layout="NHWC")
    assert prepared.heatmaps and prepared.head.activation_layout == "NHWC"
    x = RNG.normal(size=(2, 5, 7, k)).astype(np.float32)
    (activation,) = run(prepared.model, [ACTIVATION], x)
    np.testing.assert_array_equal(activation, np.maximum(x, 0).transpose(0, 3, 1, 2))


def test_prepare_onnx_serves_one_sample_at_a_time_when_graph_hardcodes_batch_one():
    shape = numpy_helper.from_array(np.array([1, 6], dtype=np.int64), "shape")
    model = build(
        [
            helper.make_node("Reshape", ["x", "shape"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["y"], transB=1),
        ],
        ["y"],
        [const("w", W.T), const("b", B), shape],
        input_shape=[1, 2, 3],
    )
    prepared = prepare_onnx(model)
    assert prepared.max_batch_size == 1
    assert any("one sample at a time" in note for note in prepared.notes)


def test_prepare_onnx_prepares_the_demo_model_again_when_it_already_follows_the_convention():
    original = onnx.load(str(DEMO_ONNX))
    prepared = prepare_onnx(DEMO_ONNX)
    assert prepared.heatmaps and prepared.num_classes == 10
    x = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    names = [LOGITS, FEATURES, ACTIVATION]
    for got, want in zip(run(prepared.model, names, x), run(original, names, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_prepare_onnx_uses_the_named_output_when_graph_has_several():
    model = build(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1),
            helper.make_node("Relu", ["x"], ["other"]),
        ],
        ["other", "y"],
        [const("w", W.T), const("b", B)],
    )
    with pytest.raises(ConfigError, match="several candidate outputs.*--output"):
        prepare_onnx(model)
    assert prepare_onnx(model, output="y").num_classes == 4


@pytest.mark.parametrize(
    ("nodes", "inits", "words"),
    [
        ([helper.make_node("Relu", ["x"], ["y"])], [], "no final linear layer.*Relu"),
        (
            [
                helper.make_node("Gemm", ["x", "w", "b"], ["z"], transB=1),
                helper.make_node("Mul", ["z", "two"], ["y"]),
            ],
            [const("w", W.T), const("b", B), const("two", np.float32(2))],
            "no final linear layer.*Mul",
        ),
        (
            [
                helper.make_node("Transpose", ["x"], ["xt"]),
                helper.make_node("MatMul", ["x", "xt"], ["y"]),
            ],
            [],
            "dynamic class count",
        ),
        (
            [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
            [const("w", W.T[:1])],
            "at least 2 classes",
        ),
        (
            [helper.make_node("Gemm", ["x", "w"], ["z"], transB=1)]
            + [helper.make_node("Softmax", ["z"], ["y"], axis=0)],
            [const("w", W.T)],
            "Softmax over axis 0",
        ),
    ],
    ids=["no-linear", "scaled-logits", "dynamic-classes", "one-class", "softmax-axis"],
)
def test_prepare_onnx_raises_config_error_when_model_is_not_a_servable_classifier(
    nodes, inits, words
):
    with pytest.raises(ConfigError, match=words):
        prepare_onnx(build(nodes, ["y"], inits))


def test_prepare_onnx_raises_config_error_when_graph_uses_a_custom_operator():
    model = build(
        [helper.make_node("FancyActivation", ["x"], ["h"], domain="acme.ops")]
        + [helper.make_node("Gemm", ["h", "w"], ["y"], transB=1)],
        ["y"],
        [const("w", W.T)],
    )
    model.opset_import.append(helper.make_opsetid("acme.ops", 1))
    with pytest.raises(ConfigError, match="unsupported operator.*acme.ops::FancyActivation"):
        prepare_onnx(model)


def test_prepare_onnx_raises_config_error_when_model_has_two_inputs():
    second = helper.make_tensor_value_info("x2", F32, ["n", 6])
    model = build(
        [
            helper.make_node("Add", ["x", "x2"], ["s"]),
            helper.make_node("Gemm", ["s", "w"], ["y"], transB=1),
        ],
        ["y"],
        [const("w", W.T)],
        extra_inputs=[second],
    )
    with pytest.raises(ConfigError, match="2 inputs"):
        prepare_onnx(model)


def test_prepare_onnx_raises_config_error_when_input_is_not_float():
    model = build(
        [
            helper.make_node("Cast", ["x"], ["xf"], to=F32),
            helper.make_node("Gemm", ["xf", "w"], ["y"], transB=1),
        ],
        ["y"],
        [const("w", W.T)],
        input_type=TensorProto.UINT8,
    )
    with pytest.raises(ConfigError, match="UINT8.*float"):
        prepare_onnx(model)


def test_prepare_onnx_needs_input_size_when_image_size_is_dynamic():
    model = build(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["h"]),
            helper.make_node("Gemm", ["h", "w"], ["y"], transB=1),
        ],
        ["y"],
        [const("w", W.T)],
        input_shape=["n", 6, "height", "width"],
    )
    with pytest.raises(ConfigError, match="--input-size"):
        prepare_onnx(model)
    prepared = prepare_onnx(model, input_size=(9, 5))
    assert prepared.heatmaps and prepared.input_dims == (6, "height", "width")


def test_prepare_onnx_raises_config_error_when_batch_is_fixed_above_one():
    model = build(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        ["y"],
        [const("w", W.T)],
        input_shape=[4, 6],
    )
    with pytest.raises(ConfigError, match="fixed at 4.*dynamic_axes"):
        prepare_onnx(model)


def test_prepare_onnx_prunes_nodes_the_new_outputs_do_not_need():
    model = build(
        [
            helper.make_node("Gemm", ["x", "w"], ["z"], transB=1),
            helper.make_node("Softmax", ["z"], ["y"], axis=1),
        ],
        ["y"],
        [const("w", W.T)],
    )
    ops = [n.op_type for n in prepare_onnx(model).model.graph.node]
    assert "Softmax" not in ops and ops.count("Gemm") == 1


def test_prepare_onnx_suggests_nhwc_when_the_last_dimension_looks_like_channels():
    model = build(
        [
            helper.make_node("Flatten", ["x"], ["h"]),
            helper.make_node("Gemm", ["h", "w"], ["y"], transB=1),
        ],
        ["y"],
        [const("w", RNG.normal(size=(4, 2 * 2 * 3)))],
        input_shape=["n", 2, 2, 3],
    )
    assert any("--layout NHWC" in note for note in prepare_onnx(model).notes)
    assert not any("--layout" in note for note in prepare_onnx(model, layout="NHWC").notes)


def test_prepare_onnx_steps_over_a_reshape_when_it_keeps_batch_by_classes():
    shape = numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "shape")
    model = build(
        [
            helper.make_node("Gemm", ["x", "w"], ["z"], transB=1),
            helper.make_node("Reshape", ["z", "shape"], ["y"]),
        ],
        ["y"],
        [const("w", W.T), shape],
    )
    assert prepare_onnx(model).head.tail == ("Reshape",)


def test_prepare_onnx_refuses_the_model_when_a_tail_reshape_changes_the_scores_layout():
    shape = numpy_helper.from_array(np.array([-1, 2, 2], dtype=np.int64), "shape")
    model = build(
        [
            helper.make_node("Gemm", ["x", "w"], ["z"], transB=1),
            helper.make_node("Reshape", ["z", "shape"], ["y"]),
        ],
        ["y"],
        [const("w", W.T), shape],
    )
    with pytest.raises(ConfigError, match="not a function of the final linear layer alone"):
        prepare_onnx(model)
