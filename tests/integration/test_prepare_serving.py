"""The prepared zoo served by one real tritonserver, checked against the torch models.

Every zoo classifier (tests/test_prepare_zoo.py) is exported to ONNX, run through
``gradtrust prepare`` into one temporary model repository, and served by a single
tritonserver. Served labels, confidences, scores and heatmaps must equal what the torch
model gives in float64 (scores from its logits and features, heatmaps from
``torch.autograd`` via :mod:`tests.reference.autograd_heatmaps`) to 1e-4; PNG and JPEG files sent
as ``IMAGE_BYTES`` must give the same answers as their decoded, normalised arrays.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from torch import nn
from tritonclient.utils import InferenceServerException

from gradtrust.core import scores
from gradtrust.ops.tritonserver import Ports, TritonServer, free_port, start_server
from gradtrust.serving.classifier import OnnxClassifier
from gradtrust.serving.contract import (
    FEATURES,
    INTROSPECTION_ONNX,
    INTROSPECTIVE_CLASS_ID,
    INTROSPECTIVE_CONFIDENCE,
    LOGITS,
)
from gradtrust.serving.introspector import Introspector
from gradtrust.serving.settings import DEFAULT_SCORES
from gradtrust.tools.introspect.network import IntrospectiveMLP, export_onnx
from gradtrust.tools.prepare import cli
from tests.reference.autograd_heatmaps import autograd_explain
from tests.unit.test_prepare_zoo import ZOO, ZOO_BY_NAME, ZooModel, export, torch_outputs

pytestmark = pytest.mark.integration

BASE_OUTPUTS = ("LABEL", "CLASS_ID", "CONFIDENCE", "GRADTRUST", "SCORES")
METHODS = ("gradcam", "counterfactual", "contrast", "voice")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: An extra entry: the RGB Softmax CNN with ImageNet-style normalisation and named labels.
NORMALISED = "softmax_cnn_normalised"
LABELS = ("cat", "dog", "bird", "fish", "frog")
#: A plain Python-backend model standing for a classifier deployed by someone else (its own
#: tensor names, no GradTrust code), and the GradTrust entry that wraps it through BLS.
DEPLOYED, WRAPPED, MISWIRED = "deployed_gap", "gap_cnn_wrapped", "gap_cnn_miswired"
DEPLOYED_MODEL_PY = """
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = Path(__file__).parent / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "pixels").as_numpy()
            z, h = self.session.run(["logits", "features"], {"input": x})
            outputs = [pb_utils.Tensor("class_scores", z), pb_utils.Tensor("embedding", h)]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
"""
DEPLOYED_CONFIG = """
name: "deployed_gap"
backend: "python"
max_batch_size: 64
input [ { name: "pixels", data_type: TYPE_FP32, dims: [ 1, 12, 12 ] } ]
output [
  { name: "class_scores", data_type: TYPE_FP32, dims: [ 10 ] },
  { name: "embedding", data_type: TYPE_FP32, dims: [ 12 ] }
]
"""


def add_deployed_classifier(repo: Path, root: Path) -> None:
    """Deploy the prepared gap_cnn graph as an ordinary model, then wrap it with prepare."""
    folder = repo / DEPLOYED / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes((repo / "gap_cnn" / "1" / "model.onnx").read_bytes())
    (folder / "model.py").write_text(DEPLOYED_MODEL_PY)
    (repo / DEPLOYED / "config.pbtxt").write_text(DEPLOYED_CONFIG)
    labels = root / "labels10.txt"
    labels.write_text("".join(f"{i}\n" for i in range(10)))
    for name, logits in ((WRAPPED, "class_scores"), (MISWIRED, "no_such_output")):
        code = cli.main(
            ["--wrap", DEPLOYED, "--wrap-input", "pixels", "--wrap-logits", logits,
             "--wrap-features", "embedding", "--input-shape", "1", "12", "12", "--labels",
             str(labels), "--name", name, "--repository", str(repo)]
        )  # fmt: skip
        assert code == 0


def add_introspective_network(entry: Path) -> None:
    """An (untrained, seeded) introspective network for gap_cnn's 10 classes and 12
    features, as `gradtrust introspect` would write it into the entry."""
    torch.manual_seed(3)
    export_onnx(IntrospectiveMLP(10, 12, hidden=16), entry / "1" / INTROSPECTION_ONNX)


@dataclass
class Served:
    server: TritonServer
    models: dict[str, nn.Module]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("prepare-serving")
    repo = root / "repo"
    models: dict[str, nn.Module] = {}
    for entry in ZOO:
        models[entry.name] = entry.model()
        path = export(entry, models[entry.name], root / f"{entry.name}.onnx")
        args = ["--onnx", path, "--name", entry.name, "--repository", repo]
        assert cli.main([str(a) for a in [*args, "--layout", entry.layout]]) == 0
    labels = root / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    code = cli.main(
        ["--onnx", str(root / "softmax_cnn.onnx"), "--name", NORMALISED, "--repository",
         str(repo), "--labels", str(labels), "--mean", *map(str, MEAN), "--std", *map(str, STD)]
    )  # fmt: skip
    assert code == 0
    models[NORMALISED] = models["softmax_cnn"]
    add_deployed_classifier(repo, root)
    add_introspective_network(repo / WRAPPED)
    models[WRAPPED] = models[MISWIRED] = models["gap_cnn"]
    server = start_server(
        repo,
        ports=Ports(http=free_port(), grpc=free_port(), metrics=free_port()),
        log_path=root / "tritonserver.log",
        timeout_s=180,
        exit_timeout_s=5,
    )
    try:
        assert server.models == sorted([*models, DEPLOYED]), server.log_tail()
        yield Served(server, models)
    finally:
        server.stop()


def infer(
    served: Served,
    model: str,
    inputs: dict[str, np.ndarray],
    outputs: Sequence[str],
    parameters: dict[str, Any] | None = None,
    protocol: str = "http",
) -> dict[str, np.ndarray]:
    lib: Any = httpclient if protocol == "http" else grpcclient
    url = served.server.http_url if protocol == "http" else served.server.grpc_url
    client = lib.InferenceServerClient(url)
    try:
        tensors = []
        for name, value in inputs.items():
            tensor = lib.InferInput(
                name, list(value.shape), "BYTES" if name.endswith("BYTES") else "FP32"
            )
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        result = client.infer(
            model,
            tensors,
            outputs=[lib.InferRequestedOutput(n) for n in outputs],
            parameters=parameters or {},
        )
        return {name: result.as_numpy(name) for name in outputs}
    finally:
        client.close()


def reference_scores(entry: ZooModel, model: nn.Module, images: np.ndarray) -> dict[str, Any]:
    net = torch_outputs(entry, model, images)
    z, h = net[LOGITS], net[FEATURES]
    table = scores.compute_scores(z, DEFAULT_SCORES, features=h)
    return {
        "CLASS_ID": z.argmax(axis=1),
        "CONFIDENCE": scores.msp(z),
        "GRADTRUST": scores.gradtrust(z),
        "SCORES": np.stack([table[n] for n in DEFAULT_SCORES], axis=1),
    }


class _Logits(nn.Module):
    """The zoo model as autograd_explain wants it: NCHW images in, pre-softmax logits out."""

    def __init__(self, entry: ZooModel, model: nn.Module) -> None:
        super().__init__()
        layers = list(model.children())
        self.net = nn.Sequential(*layers[:-1]) if entry.tail else model
        self.nhwc = entry.layout == "NHWC"

    def forward(self, x: Any) -> Any:
        return self.net(x.permute(0, 2, 3, 1) if self.nhwc else x)


def reference_heatmap(
    entry: ZooModel, model: nn.Module, images: np.ndarray, method: str
) -> tuple[np.ndarray, np.ndarray | None]:
    wrapper = _Logits(entry, model).double()
    try:
        layer = model.get_submodule(str(entry.heatmap_layer))
        nchw = images.transpose(0, 3, 1, 2) if entry.layout == "NHWC" else images
        return autograd_explain(wrapper, layer, nchw.astype(np.float64), method)
    finally:
        model.float()


def _check_base(out: dict[str, np.ndarray], want: dict[str, Any], labels: Sequence[str]) -> None:
    np.testing.assert_array_equal(out["CLASS_ID"][:, 0], want["CLASS_ID"])
    assert [v.decode() for v in out["LABEL"][:, 0]] == [labels[c] for c in want["CLASS_ID"]]
    for name in ("CONFIDENCE", "GRADTRUST"):
        np.testing.assert_allclose(out[name][:, 0], want[name], rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(out["SCORES"], want["SCORES"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("entry", ZOO, ids=[z.name for z in ZOO])
def test_served_scores_equal_the_torch_model_when_zoo_model_is_prepared(served, entry):
    images = entry.images(6, seed=1)
    out = infer(served, entry.name, {"IMAGE": images}, BASE_OUTPUTS)
    want = reference_scores(entry, served.models[entry.name], images)
    _check_base(out, want, [str(c) for c in range(entry.classes)])


HEATMAP_CASES = [(z, m) for z in ZOO if z.heatmap_layer is not None for m in METHODS]


@pytest.mark.parametrize(
    ("entry", "method"), HEATMAP_CASES, ids=[f"{z.name}-{m}" for z, m in HEATMAP_CASES]
)
def test_served_heatmaps_equal_torch_autograd_when_model_pools_before_its_head(
    served, entry, method
):
    images = entry.images(3, seed=2)
    outputs = ("HEATMAP", "HEATMAP_STATS") if method == "voice" else ("HEATMAP",)
    out = infer(served, entry.name, {"IMAGE": images}, outputs, {"heatmap_method": method}, "grpc")
    maps, stats = reference_heatmap(entry, served.models[entry.name], images, method)
    np.testing.assert_allclose(out["HEATMAP"], maps, atol=1e-4)
    if stats is not None:
        np.testing.assert_allclose(out["HEATMAP_STATS"], stats, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mlp", "flatten_cnn"])
def test_served_heatmap_request_fails_clearly_when_head_has_no_pooled_activation(served, name):
    entry = ZOO_BY_NAME[name]
    with pytest.raises(InferenceServerException, match="cannot produce a HEATMAP"):
        infer(served, name, {"IMAGE": entry.images(1)}, ("HEATMAP",), {"heatmap_method": "gradcam"})


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, fmt)
    return buffer.getvalue()


def decoded_array(
    files: Sequence[bytes], size: tuple[int, int], channels: int, layout: str,
    mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
) -> np.ndarray:  # fmt: skip
    """What a caller would send as IMAGE after decoding the files themselves."""
    rows = []
    for data in files:
        image = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float64).reshape(size[0], size[1], channels)
        rows.append((pixels / 255.0 - np.asarray(mean)) / np.asarray(std))
    batch = np.stack(rows)
    return (batch.transpose(0, 3, 1, 2) if layout == "NCHW" else batch).astype(np.float32)


ENCODED_CASES = [
    (NORMALISED, 3, "NCHW", (10, 12), MEAN, STD, "PNG"),
    (NORMALISED, 3, "NCHW", (10, 12), MEAN, STD, "JPEG"),
    ("nhwc_cnn", 3, "NHWC", (10, 8), (0.0,), (1.0,), "PNG"),
    ("gap_cnn", 1, "NCHW", (12, 12), (0.0,), (1.0,), "JPEG"),
]


@pytest.mark.parametrize(
    ("model", "channels", "layout", "size", "mean", "std", "fmt"),
    ENCODED_CASES,
    ids=[f"{c[0]}-{c[-1]}" for c in ENCODED_CASES],
)
def test_encoded_images_give_the_results_of_the_decoded_array_when_sent_as_image_bytes(
    served, model, channels, layout, size, mean, std, fmt
):
    rng = np.random.default_rng(5)
    files = [
        encode(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), fmt)
        for h, w in ((20, 24), (7, 9), size)
    ]
    outputs = (*BASE_OUTPUTS, "HEATMAP")
    params = {"heatmap_method": "contrast"}
    encoded = np.array([[f] for f in files], dtype=np.object_)
    got = infer(served, model, {"IMAGE_BYTES": encoded}, outputs, params)
    array = decoded_array(files, size, channels, layout, mean, std)
    want = infer(served, model, {"IMAGE": array}, outputs, params)
    assert got["HEATMAP"].shape == (3, *size)
    np.testing.assert_array_equal(got["LABEL"], want["LABEL"])
    for name in ("CONFIDENCE", "GRADTRUST", "SCORES", "HEATMAP"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_normalised_entry_scores_equal_torch_when_sent_png_files(served):
    entry = ZOO_BY_NAME["softmax_cnn"]
    rng = np.random.default_rng(9)
    files = [encode(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), "PNG") for _ in range(4)]
    encoded = np.array([[f] for f in files], dtype=np.object_)
    out = infer(served, NORMALISED, {"IMAGE_BYTES": encoded}, BASE_OUTPUTS, protocol="grpc")
    images = decoded_array(files, (10, 12), 3, "NCHW", MEAN, STD)
    _check_base(out, reference_scores(entry, served.models[NORMALISED], images), LABELS)


def test_image_bytes_request_fails_alone_when_one_file_is_corrupt(served):
    bad = np.array([[encode(np.zeros((12, 12, 1), np.uint8), "PNG")], [b"GIF89a..."]], np.object_)
    with pytest.raises(InferenceServerException, match="sample 1"):
        infer(served, "gap_cnn", {"IMAGE_BYTES": bad}, ("LABEL",))
    good = np.array([[encode(np.zeros((12, 12, 1), np.uint8), "PNG")]], np.object_)
    assert infer(served, "gap_cnn", {"IMAGE_BYTES": good}, ("LABEL",))["LABEL"].shape == (1, 1)


def test_request_fails_clearly_when_it_sends_both_image_inputs(served):
    entry = ZOO_BY_NAME["gap_cnn"]
    both = {
        "IMAGE": entry.images(1),
        "IMAGE_BYTES": np.array([[encode(np.zeros((12, 12, 1), np.uint8), "PNG")]], np.object_),
    }
    with pytest.raises(InferenceServerException, match="not both"):
        infer(served, "gap_cnn", both, ("LABEL",))


def test_prepared_repository_holds_only_the_entries_when_served(served):
    repo = Path(served.server.model_repository)
    assert sorted(p.name for p in repo.iterdir()) == sorted([*served.models, DEPLOYED])


def test_wrapped_model_scores_equal_the_torch_model_when_called_through_bls(served):
    entry = ZOO_BY_NAME["gap_cnn"]
    images = entry.images(5, seed=4)
    for protocol in ("http", "grpc"):
        out = infer(served, WRAPPED, {"IMAGE": images}, BASE_OUTPUTS, protocol=protocol)
        want = reference_scores(entry, served.models[WRAPPED], images)
        _check_base(out, want, [str(c) for c in range(entry.classes)])


def test_wrapped_model_accepts_encoded_images_when_called_through_bls(served):
    files = [encode(np.full((12, 12, 1), v, np.uint8), "PNG") for v in (0, 128, 255)]
    encoded = np.array([[f] for f in files], dtype=np.object_)
    got = infer(served, WRAPPED, {"IMAGE_BYTES": encoded}, BASE_OUTPUTS)
    want = infer(
        served, "gap_cnn", {"IMAGE": decoded_array(files, (12, 12), 1, "NCHW")}, BASE_OUTPUTS
    )
    np.testing.assert_allclose(got["SCORES"], want["SCORES"], rtol=1e-5, atol=1e-6)


def test_wrapped_model_fails_with_the_deployed_models_error_when_a_name_is_wrong(served):
    entry = ZOO_BY_NAME["gap_cnn"]
    with pytest.raises(InferenceServerException, match="wrapped model 'deployed_gap' failed"):
        infer(served, MISWIRED, {"IMAGE": entry.images(2)}, BASE_OUTPUTS)


def test_wrapped_model_answers_introspective_outputs_when_its_entry_has_a_network(served):
    # The entry reads no head weight (a wrapped model has none): the network's feature width
    # is checked against what the deployed model returns.
    images = ZOO_BY_NAME["gap_cnn"].images(6, seed=5)
    first = OnnxClassifier(served.server.model_repository / "gap_cnn" / "1" / "model.onnx")
    out = first.run(images, [LOGITS, FEATURES])
    introspector = Introspector(
        served.server.model_repository / WRAPPED / "1" / INTROSPECTION_ONNX, 10, 12
    )
    want = introspector.predict(out[LOGITS], out[FEATURES])
    for protocol in ("http", "grpc"):
        got = infer(
            served,
            WRAPPED,
            {"IMAGE": images},
            (INTROSPECTIVE_CLASS_ID, INTROSPECTIVE_CONFIDENCE),
            protocol=protocol,
        )
        np.testing.assert_array_equal(got[INTROSPECTIVE_CLASS_ID][:, 0], want.class_id)
        np.testing.assert_allclose(got[INTROSPECTIVE_CONFIDENCE][:, 0], want.confidence, atol=1e-6)


def test_wrapped_model_refuses_heatmaps_clearly_when_asked(served):
    entry = ZOO_BY_NAME["gap_cnn"]
    with pytest.raises(InferenceServerException, match="cannot produce a HEATMAP"):
        infer(
            served, WRAPPED, {"IMAGE": entry.images(1)}, ("HEATMAP",), {"heatmap_method": "gradcam"}
        )


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_sends_files_as_they_are_when_model_decodes_images(served, tmp_path, protocol):
    from gradtrust_client import TrustClient

    rng = np.random.default_rng(11)
    files = [encode(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), "PNG") for _ in range(3)]
    paths = []
    for i, data in enumerate(files):
        paths.append(tmp_path / f"image_{i}.png")
        paths[-1].write_bytes(data)
    url = served.server.http_url if protocol == "http" else served.server.grpc_url
    with TrustClient(url, protocol=protocol, model=NORMALISED) as client:
        assert client.model_info().encoded_input == "IMAGE_BYTES"
        got = client.predict(paths)
    encoded = np.array([[f] for f in files], dtype=np.object_)
    want = infer(served, NORMALISED, {"IMAGE_BYTES": encoded}, BASE_OUTPUTS)
    assert [p.class_id for p in got] == want["CLASS_ID"][:, 0].tolist()
    np.testing.assert_allclose([p.gradtrust for p in got], want["GRADTRUST"][:, 0], rtol=1e-6)


def test_cli_predict_lets_server_preprocess_files_when_model_decodes_images(served, tmp_path):
    from gradtrust_client.cli import main as client_main

    rng = np.random.default_rng(13)
    files = [encode(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), "PNG") for _ in range(2)]
    paths = []
    for i, data in enumerate(files):
        paths.append(str(tmp_path / f"photo_{i}.png"))
        Path(paths[-1]).write_bytes(data)
    want = infer(
        served,
        NORMALISED,
        {"IMAGE_BYTES": np.array([[f] for f in files], np.object_)},
        BASE_OUTPUTS,
    )
    out = tmp_path / "out.json"
    argv = ["predict", *paths, "--json", "--url", served.server.http_url, "--model", NORMALISED]
    with out.open("w") as stream, contextlib.redirect_stdout(stream):
        assert client_main(argv) == 0
    rows = json.loads(out.read_text())
    assert [r["class_id"] for r in rows] == want["CLASS_ID"][:, 0].tolist()
    np.testing.assert_allclose([r["gradtrust"] for r in rows], want["GRADTRUST"][:, 0], rtol=1e-6)
