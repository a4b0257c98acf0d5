"""Bounded work per request, against a real tritonserver serving a 224 x 224 RGB classifier
that takes image files (IMAGE_BYTES), as in docs/SECURITY.md's abuse table:

- 64 copies of a 6300 x 6300 PNG (accepted before: 27 s of decoding while every other
  client waited) are refused from the files' headers, and so are many images that are each
  allowed but together too many pixels; the worst request still admitted is decoded;
- a 16-bit grayscale PNG gets exactly the answer of its 8-bit equivalent (it used to be
  decoded as all white);
- the server answers normally afterwards.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from torch import nn
from tritonclient.utils import InferenceServerException

from gradtrust.ops.tritonserver import Ports, TritonServer, free_port, start_server
from gradtrust.serving.decoding import IMAGE_FACTOR, REQUEST_FACTOR
from gradtrust.tools.prepare import cli
from tests.unit.test_prepare_zoo import ZooModel, _conv, export

pytestmark = pytest.mark.integration

PHOTO = ZooModel(
    "photo_gap",
    lambda: nn.Sequential(
        _conv(3, 4),
        nn.MaxPool2d(4),
        _conv(4, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ),  # fmt: skip
    (3, 224, 224),
    10,
    heatmap_layer="2",
)
OUTPUTS = ("CLASS_ID", "CONFIDENCE", "GRADTRUST")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("limits")
    onnx_path = export(PHOTO, PHOTO.model(), root / "photo.onnx")
    repo = root / "repo"
    args = ["--onnx", str(onnx_path), "--name", PHOTO.name, "--repository", str(repo)]
    assert cli.main(args) == 0
    started = start_server(
        repo,
        ports=Ports(free_port(), free_port(), free_port()),
        log_path=root / "tritonserver.log",
        exit_timeout_s=5,
        address="127.0.0.1",
    )
    try:
        yield started
    finally:
        started.stop()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _photo(seed: int, size: int = 224) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return _png(Image.fromarray(pixels))


def _infer(server: TritonServer, files: list[bytes], protocol: str = "http") -> dict:
    lib = httpclient if protocol == "http" else grpcclient
    url = server.http_url if protocol == "http" else server.grpc_url
    client = (
        lib.InferenceServerClient(url, network_timeout=120.0)
        if protocol == "http"
        else (lib.InferenceServerClient(url))
    )
    try:
        tensor = lib.InferInput("IMAGE_BYTES", [len(files), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[f] for f in files], dtype=np.object_))
        outputs = [lib.InferRequestedOutput(n) for n in OUTPUTS]
        result = client.infer(PHOTO.name, [tensor], outputs=outputs)
        return {n: result.as_numpy(n) for n in OUTPUTS}
    finally:
        client.close()


def _refused(server: TritonServer, files: list[bytes], protocol: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    with pytest.raises(InferenceServerException) as info:
        _infer(server, files, protocol)
    took = time.perf_counter() - t0
    assert str(info.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), info.value
    return str(info.value), took


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_huge_images_are_refused_from_their_headers_when_64_are_sent(server, protocol):
    bomb = _png(Image.new("L", (6300, 6300), 255))  # 6300x6300 pixels in a few tens of kB
    message, took = _refused(server, [bomb] * 64, protocol)
    assert "IMAGE_BYTES sample 0: image of 6300x6300 pixels" in message
    assert IMAGE_FACTOR in message and "downscale it to at most 896x896" in message
    print(f"\n64 x 6300x6300 PNG refused over {protocol} in {took * 1000:.0f} ms")


def test_many_allowed_images_are_refused_together_when_they_exceed_the_request_total(server):
    big = _photo(1, size=896)  # 16 x 224 x 224: the most one image may have
    message, took = _refused(server, [big] * 17, "http")
    assert "17 images of 13647872 pixels" in message and REQUEST_FACTOR in message
    assert "send fewer or smaller images per request" in message
    print(f"\n17 x 896x896 PNG refused in {took * 1000:.0f} ms")


def test_worst_admissible_request_is_answered_within_the_stated_multiple_when_timed(server):
    normal = [_photo(i) for i in range(64)]  # a full batch at the model's size
    worst = [_photo(100 + i, size=896) for i in range(16)]  # the request total, at 16x each
    _infer(server, normal[:2])  # warm up
    timings = {}
    for name, files in (("normal", normal), ("worst", worst)):
        t0 = time.perf_counter()
        out = _infer(server, files)
        timings[name] = time.perf_counter() - t0
        assert out["CLASS_ID"].shape == (len(files), 1)
    print(
        f"\nfull batch of 64 x 224x224 PNG: {timings['normal']:.3f} s; worst admissible "
        f"(16 x 896x896): {timings['worst']:.3f} s; "
        f"ratio {timings['worst'] / timings['normal']:.1f}"
    )


def _png16_gray(pixels: np.ndarray) -> bytes:
    h, w = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_16_bit_png_gets_the_answer_of_its_8_bit_equivalent_when_sent(server, protocol):
    rng = np.random.default_rng(7)
    wide = rng.integers(0, 65536, (224, 224)).astype(np.uint16)
    narrow = np.rint(wide / 257.0).astype(np.uint8)
    got = _infer(server, [_png16_gray(wide)], protocol)
    want = _infer(server, [_png(Image.fromarray(narrow, "L"))], protocol)
    white = _infer(server, [_png(Image.new("L", (224, 224), 255))], protocol)
    for name in OUTPUTS:
        np.testing.assert_array_equal(got[name], want[name])
    assert not np.array_equal(got["GRADTRUST"], white["GRADTRUST"])  # not decoded as white


def test_server_answers_normally_when_oversized_requests_came_before(server):
    _refused(server, [_png(Image.new("L", (6300, 6300)))] * 4, "http")
    out = _infer(server, [_photo(5), _photo(6)])
    assert out["CLASS_ID"].shape == (2, 1) and np.isfinite(out["GRADTRUST"]).all()
