"""The classifier's forward pass, with onnxruntime.

A servable ONNX classifier follows one naming convention (``gradtrust prepare`` rewrites
other models into it):

- one image input (any name), batch first;
- output ``logits`` (N, C): the pre-softmax scores;
- output ``features`` (N, D): the input of the final linear layer (needed by gradnorm);
- optional output ``activation`` (N, K, h, w): the last conv activation feeding global
  average pooling (needed for closed-form heatmaps).

The final linear layer's weight is read from the graph itself, so the closed forms use
exactly the numbers the forward pass uses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from gradtrust.errors import ConfigError
from gradtrust.serving.contract import ACTIVATION, FEATURES, LOGITS


class Classifier(Protocol):
    """What the service needs of a network: an ONNX file run in process
    (:class:`OnnxClassifier`) or a model deployed beside us and called through Triton's
    BLS (:class:`gradtrust.serving.bls.BlsClassifier`)."""

    @property
    def num_classes(self) -> int: ...

    @property
    def input_shape(self) -> tuple[int | str | None, ...]:
        """Input dims after the batch (None or a name where dynamic)."""
        ...

    @property
    def providers(self) -> list[str]: ...

    @property
    def has_features(self) -> bool:
        """Whether ``run`` can return the penultimate ``features`` (gradnorm needs them)."""
        ...

    @property
    def has_activation(self) -> bool:
        """Whether ``run`` can return the conv ``activation`` (closed-form heatmaps)."""
        ...

    def run(self, images: np.ndarray, outputs: Sequence[str] = (LOGITS,)) -> dict[str, np.ndarray]:
        """Forward pass of one batch; returns the named outputs."""
        ...

    def head_weight(self) -> np.ndarray:
        """The final linear layer's weight W (C, D), float64."""
        ...


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def providers_for(device: str, device_id: int = 0) -> list[str | tuple[str, dict[str, str]]]:
    """onnxruntime execution providers for a Triton instance kind (``cpu`` or ``gpu``)."""
    import onnxruntime as ort

    if device.lower() == "gpu":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError(
                "the model instance is on a GPU but onnxruntime has no CUDA provider: "
                "install onnxruntime-gpu (not onnxruntime) with CUDA 12 libraries, "
                "or set instance_group kind: KIND_CPU"
            )
        return [("CUDAExecutionProvider", {"device_id": str(device_id)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxClassifier:
    """An onnxruntime session over a classifier that follows the naming convention above."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "cpu",
        device_id: int = 0,
        intra_op_threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(
                f"model file {self.path} not found: run `make train-demo` or `gradtrust prepare`"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting pool threads after each run: they took the cores from the scores,
        # the heatmaps' BLAS calls, Triton's frontends and other instances (2-3x lower
        # throughput on a shared 2-core machine, plain model included; docs/BENCHMARKS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=providers_for(device, device_id)
            )
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ConfigError(f"onnxruntime cannot load {self.path}: {err}") from err
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(
                f"{self.path} has {len(inputs)} inputs; "
                "a servable classifier has exactly one image input"
            )
        self.input_name: str = inputs[0].name
        self.input_dtype = _ORT_DTYPES.get(inputs[0].type, np.float32)
        self.input_shape: tuple[int | str | None, ...] = tuple(inputs[0].shape[1:])
        self.output_names = [o.name for o in self.session.get_outputs()]
        if LOGITS not in self.output_names:
            raise ConfigError(
                f"{self.path} has no output named '{LOGITS}' (outputs: {self.output_names}); "
                "run `gradtrust prepare` to expose logits and features"
            )
        self.num_classes = int(self.session.get_outputs()[self.output_names.index(LOGITS)].shape[1])
        self.providers = self.session.get_providers()

    @property
    def has_features(self) -> bool:
        return FEATURES in self.output_names

    @property
    def has_activation(self) -> bool:
        return ACTIVATION in self.output_names

    def run(self, images: np.ndarray, outputs: Sequence[str] = (LOGITS,)) -> dict[str, np.ndarray]:
        """Forward pass of one batch; returns the named outputs."""
        result = self.session.run(
            list(outputs), {self.input_name: images.astype(self.input_dtype, copy=False)}
        )
        return dict(zip(outputs, result, strict=True))

    def head_weight(self) -> np.ndarray:
        """The final linear layer's weight W (C, D), read from the graph's initializers."""
        return head_weight_from_onnx(self.path)


def head_weight_from_onnx(path: str | os.PathLike[str]) -> np.ndarray:
    """W (C, D) of the Gemm or MatMul(+Add) that produces the ``logits`` output."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    name = LOGITS
    # Walk back through pass-through nodes (Identity, Add of the bias) to the matrix product.
    for _ in range(8):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type == "Gemm":
            w = inits.get(node.input[1])
            if w is None:
                break
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return np.asarray(w if trans_b else w.T, dtype=np.float64)
        if node.op_type == "MatMul":
            w = inits.get(node.input[1])
            if w is None:
                break
            return np.asarray(w.T, dtype=np.float64)
        if node.op_type in ("Identity", "Add"):
            name = next((i for i in node.input if i not in inits), node.input[0])
            continue
        break
    raise ConfigError(
        f"cannot find the final linear layer producing '{LOGITS}' in {path}: "
        "heatmaps need a Gemm or MatMul with constant weights; run `gradtrust prepare`"
    )
