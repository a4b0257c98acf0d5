"""Hostile input through the real server: random requests never cost a good request its
answer, and never crash the Python backend stub.

Each example sends one random request, built at the wire level so that nothing in a
client library can tidy it up (raw HTTP bodies in JSON or binary-tensor encoding,
possibly malformed; raw gRPC protobufs with any datatype, shape, byte count and
parameter types), at the same moment as three good requests for real digits. The good
answers must equal onnxruntime on the same pixels; the random one must either be
rejected as a client error (HTTP 400, gRPC INVALID_ARGUMENT) or be answered correctly.
Afterwards the server is still ready and still runs the same stub process.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gradtrust.core import scores
from gradtrust.ops.processes import stubs_launched_by
from tests.conftest import DEMO_ONNX

pytestmark = pytest.mark.integration

MODEL = "gradtrust_mnist"
OUTPUTS = ("LABEL", "CLASS_ID", "CONFIDENCE", "GRADTRUST", "SCORES", "HEATMAP", "HEATMAP_STATS")
DATATYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT32": np.int32,
    "UINT8": np.uint8,
    "INT64": np.int64,
    "BOOL": np.bool_,
}

#: How a malformed request may break the wire format.
CORRUPTIONS = ("truncate", "extend", "garbage-body", "lie-size")
#: What a rejected request may answer: a client error, never a server error.
CLIENT_ERRORS = {"400", "INVALID_ARGUMENT"}
#: ... except Triton's own HTTP JSON parser, which reports its failures as 500.
TRITON_HTTP_PARSE_ERRORS = ("Unable to parse 'data'", "failed to parse the request JSON buffer")


@dataclass
class Outcome:
    """What came back: outputs by name, or an error with its status."""

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    status: str | None = None  # None: success; "400", "INVALID_ARGUMENT", ...
    message: str = ""


class RandomRequest:
    """One request as it goes on the wire (a plain class: its repr stays short)."""

    def __init__(
        self,
        protocol: str,  # http-json, http-binary, grpc
        input_name: str,
        datatype: str,
        shape: tuple[int, ...],
        payload: bytes,  # raw tensor bytes, little endian
        parameters: dict[str, Any],
        outputs: tuple[str, ...],
        corrupt: str,  # "" or one of CORRUPTIONS
    ) -> None:
        self.protocol = protocol
        self.input_name = input_name
        self.datatype = datatype
        self.shape = shape
        self.payload = payload
        self.parameters = parameters
        self.outputs = outputs
        self.corrupt = corrupt

    def __repr__(self) -> str:
        return (
            f"RandomRequest({self.protocol}, {self.input_name} {self.datatype} {self.shape}, "
            f"{len(self.payload)} bytes, parameters={self.parameters}, outputs={self.outputs}, "
            f"corrupt={self.corrupt!r})"
        )

    def pixels(self) -> np.ndarray | None:
        """The FP32 batch Triton would hand the model, if the request is well formed."""
        if self.corrupt or self.datatype != "FP32" or self.input_name != "IMAGE":
            return None
        count = int(np.prod(self.shape)) if self.shape else 1
        if len(self.payload) != 4 * count or len(self.shape) != 4:
            return None
        return np.frombuffer(self.payload, dtype="<f4").reshape(self.shape)


def _wire_dtype(datatype: str) -> np.dtype:
    return np.dtype(DATATYPES[datatype]).newbyteorder("<")


# --- strategies -------------------------------------------------------------------------

param_values = (
    st.text(max_size=20)
    | st.integers(-(2**40), 2**40)
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["msp,margin", "gradcam", "contrast", "3", "7", "", "msp,msp"])
)
param_keys = st.sampled_from(
    ["scores", "contrast_k", "heatmap_method", "contrast_class"]
) | st.text(alphabet="abcdefgh_", min_size=1, max_size=10)


@st.composite
def random_requests(draw: st.DrawFn) -> RandomRequest:
    """Half of them a well-formed tensor (so the parameters and pixels reach our code),
    the other half anything: other datatypes, shapes, input names, broken encodings."""
    wild = draw(st.booleans())
    if wild:
        datatype = draw(st.sampled_from(list(DATATYPES)))
        shape = draw(
            st.tuples(st.integers(0, 3), st.just(1), st.just(28), st.just(28))
            | st.tuples(
                st.integers(1, 2), st.integers(1, 3), st.integers(27, 29), st.integers(28, 29)
            )
            | st.lists(st.integers(0, 5), max_size=5).map(tuple)
        )
    else:
        datatype, shape = "FP32", (draw(st.integers(1, 4)), 1, 28, 28)
    count = int(np.prod(shape)) if shape else 1
    kind = draw(st.sampled_from(["constant", "noise", "special"]))
    values = np.full(count, draw(st.floats(0, 1)))
    if kind == "noise":
        values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(count)
    elif kind == "special" and count:
        values[draw(st.integers(0, count - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf, 1.5, -0.5, 255.0])
        )
    with np.errstate(invalid="ignore", over="ignore"):
        payload = values.astype(_wire_dtype(datatype)).tobytes()
    names = ["IMAGE", "IMAGE", "IMAGE", "IMAGE_BYTES", "PIXELS"] if wild else ["IMAGE"]
    return RandomRequest(
        protocol=draw(st.sampled_from(["http-json", "http-binary", "grpc"])),
        input_name=draw(st.sampled_from(names)),
        datatype=datatype,
        shape=tuple(shape),
        payload=payload,
        parameters=draw(st.dictionaries(param_keys, param_values, max_size=3)),
        outputs=tuple(
            draw(st.lists(st.sampled_from([*OUTPUTS, "LOGITS"]), max_size=3, unique=True))
        ),
        corrupt=draw(st.sampled_from(["", "", "", *CORRUPTIONS])) if wild else "",
    )


# --- sending at the wire level ------------------------------------------------------------


def _json_data(request: RandomRequest) -> list[Any]:
    array = np.frombuffer(request.payload, dtype=_wire_dtype(request.datatype))
    return [v if np.isfinite(v) else str(v) for v in array.astype(np.float64).tolist()]


def _send_http(server: Any, request: RandomRequest) -> Outcome:
    tensor: dict[str, Any] = {
        "name": request.input_name,
        "shape": list(request.shape),
        "datatype": request.datatype,
    }
    body_json: dict[str, Any] = {"inputs": [tensor]}
    if request.outputs:
        body_json["outputs"] = [{"name": n} for n in request.outputs]
    if request.parameters:
        body_json["parameters"] = request.parameters
    headers = {"Content-Type": "application/json"}
    if request.protocol == "http-json":
        tensor["data"] = _json_data(request)
        body = json.dumps(body_json).encode()
    else:
        payload = request.payload
        if request.corrupt == "truncate":
            payload = payload[: len(payload) // 2]
        elif request.corrupt == "extend":
            payload = payload + b"\x00" * 8
        size = len(payload) + (16 if request.corrupt == "lie-size" else 0)
        tensor["parameters"] = {"binary_data_size": size}
        header = json.dumps(body_json).encode()
        body = header + payload
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
    if request.corrupt == "garbage-body":
        body = body[: len(body) // 3] + b"\xff{]"
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{MODEL}/infer", data=body, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return Outcome(status=str(err.code), message=err.read().decode(errors="replace"))
    return Outcome(
        outputs={
            o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer.get("outputs", [])
        }
    )


def _param(value: Any) -> service_pb2.InferParameter:
    if isinstance(value, bool):
        return service_pb2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return service_pb2.InferParameter(int64_param=value)
    if isinstance(value, float):
        return service_pb2.InferParameter(double_param=value)
    return service_pb2.InferParameter(string_param=str(value))


def _send_grpc(server: Any, request: RandomRequest) -> Outcome:
    payload = request.payload
    if request.corrupt in ("truncate", "garbage-body"):
        payload = payload[: len(payload) // 2]
    elif request.corrupt in ("extend", "lie-size"):
        payload = payload + b"\x00" * 8
    message = service_pb2.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name=request.input_name, datatype=request.datatype, shape=list(request.shape)
            )
        ],
        outputs=[
            service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n)
            for n in request.outputs
        ],
        raw_input_contents=[payload],
    )
    for key, value in request.parameters.items():
        message.parameters[key].CopyFrom(_param(value))
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = stub.ModelInfer(message, timeout=60)
        except grpc.RpcError as err:
            return Outcome(status=err.code().name, message=str(err.details()))
    outputs = {}
    for meta, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if meta.datatype == "BYTES":
            items, offset = [], 0
            while offset < len(raw):
                (length,) = struct.unpack_from("<I", raw, offset)
                items.append(raw[offset + 4 : offset + 4 + length].decode())
                offset += 4 + length
            values = np.asarray(items, dtype=object)
        else:
            values = np.frombuffer(raw, dtype={"FP32": "<f4", "INT64": "<i8"}[meta.datatype])
        outputs[meta.name] = values.reshape(list(meta.shape))
    return Outcome(outputs=outputs)


def send(server: Any, request: RandomRequest) -> Outcome:
    if request.protocol == "grpc":
        return _send_grpc(server, request)
    return _send_http(server, request)


def good_request(images: np.ndarray, protocol: str) -> RandomRequest:
    return RandomRequest(
        protocol=protocol,
        input_name="IMAGE",
        datatype="FP32",
        shape=images.shape,
        payload=np.ascontiguousarray(images, dtype="<f4").tobytes(),
        parameters={},
        outputs=("CLASS_ID", "GRADTRUST"),
        corrupt="",
    )


# --- the property -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(DEMO_ONNX), providers=["CPUExecutionProvider"])


def _assert_right(outcome: Outcome, pixels: np.ndarray, session: ort.InferenceSession) -> None:
    assert outcome.status is None, f"{outcome.status}: {outcome.message[:300]}"
    (logits,) = session.run(["logits"], {"image": np.ascontiguousarray(pixels, np.float32)})
    if "CLASS_ID" in outcome.outputs:
        np.testing.assert_array_equal(
            np.asarray(outcome.outputs["CLASS_ID"], np.int64).reshape(-1), logits.argmax(axis=1)
        )
    if "GRADTRUST" in outcome.outputs:
        np.testing.assert_allclose(
            np.asarray(outcome.outputs["GRADTRUST"], np.float64).reshape(-1),
            scores.gradtrust(logits),
            rtol=1e-5,
        )


def _triton_json_parse_error(request: RandomRequest, outcome: Outcome) -> bool:
    """Triton 2.51's HTTP frontend answers 500, not 400, when it cannot parse a request's
    JSON (a broken body, or a tensor's ``data`` of the wrong JSON type such as the string
    "nan" for FP32). Such a request never reaches the model, so nothing of ours can change
    the status; the message still says what is wrong."""
    return (
        request.protocol.startswith("http")
        and outcome.status == "500"
        and any(m in outcome.message for m in TRITON_HTTP_PARSE_ERRORS)
    )


@pytest.fixture(scope="module")
def stub_before(triton_server) -> list[int]:
    return sorted(s.pid for s in stubs_launched_by(triton_server.process.pid))


def _typed_parameter(protocol: str, parameters: dict[str, Any]) -> RandomRequest:
    """A well-formed digit-sized request whose parameters have an unexpected JSON type."""
    return RandomRequest(
        protocol, "IMAGE", "FP32", (2, 1, 28, 28), bytes(2 * 784 * 4), parameters, (), ""
    )


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(random_requests(), st.integers(0, 120))
@example(_typed_parameter("grpc", {"scores": 5}), 0)
@example(_typed_parameter("http-json", {"scores": True, "contrast_k": 2}), 7)
@example(_typed_parameter("http-binary", {"contrast_k": False}), 3)
@example(_typed_parameter("grpc", {"contrast_class": 2.5, "heatmap_method": "voice"}), 9)
def test_server_answers_good_requests_and_rejects_or_answers_random_one_when_sent_together(
    triton_server, digits, session, stub_before, bad, first
):
    goods = [
        good_request(digits[0][first + i : first + i + 1 + i % 2], ("http-json", "grpc")[i % 2])
        for i in range(3)
    ]
    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(send, triton_server, r) for r in [*goods, bad]]
        outcomes = [f.result() for f in futures]
    for request, outcome in zip(goods, outcomes[:3], strict=True):
        _assert_right(
            outcome, np.frombuffer(request.payload, "<f4").reshape(request.shape), session
        )
    odd = outcomes[3]
    if odd.status is not None:
        assert odd.status in CLIENT_ERRORS or _triton_json_parse_error(bad, odd), (
            f"{odd.status}: {odd.message[:500]}"
        )
        assert odd.message.strip()
        assert "Traceback" not in odd.message and "/gradtrust/" not in odd.message
    else:
        pixels = bad.pixels()
        assert pixels is not None, f"a malformed request was answered: {bad}"
        _assert_right(odd, pixels, session)


def test_server_is_ready_with_the_same_stub_process_when_fuzzing_is_over(
    triton_server, stub_before
):
    assert triton_server.is_ready()
    assert triton_server.dead_stubs() == []
    assert sorted(s.pid for s in stubs_launched_by(triton_server.process.pid)) == stub_before
