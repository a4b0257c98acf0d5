"""HTTP responses stay uncompressed unless a client asks otherwise: the bench's load
generator and gradtrust_client send ``Accept-Encoding: identity`` by default, and the real
tritonserver honours it. With aiohttp's automatic ``gzip, deflate`` (the load generator's
``compressed=True``) or the client's ``compress_responses=True`` the server gzips, which
shows these checks can tell the two apart.

tritonclient prints a request's headers and its response's headers in verbose mode; the
checks read them there (from the real exchange, not a stand-in)."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
import tritonclient.http.aio as http_aio

from bench.loadgen import VARIANTS, Request
from gradtrust_client import TrustClient

pytestmark = pytest.mark.integration


def _response_headers(printed: str) -> str:
    """The response part of tritonclient's verbose output (after the POST line's body)."""
    found = re.findall(r"<(?:CIMultiDictProxy|HTTPSocketPoolResponse|HTTPResponse)[^\n]*", printed)
    assert found, f"no response headers in tritonclient's verbose output: {printed[-500:]!r}"
    return found[-1]


def _loadgen_send(server, images: np.ndarray, compressed: bool) -> Request:
    """One HEATMAP (gradcam) request sent as bench.serving sends it, over a verbose client."""

    async def go() -> Request:
        client = http_aio.InferenceServerClient(server.http_url, verbose=True)
        try:
            request = Request("http", server.model_name, VARIANTS["heatmap"], images, compressed)
            await request.send(client)
            return request
        finally:
            await client.close()

    return asyncio.run(go())


def test_loadgen_gets_uncompressed_http_responses_when_it_keeps_its_default_headers(
    triton_server, digits, capsys
):
    images = digits[0][:1]
    request = _loadgen_send(triton_server, images, compressed=False)
    printed = capsys.readouterr().out
    assert request.headers == {"Accept-Encoding": "identity"}
    post = [line for line in printed.splitlines() if line.startswith("POST")][-1]
    assert "'Accept-Encoding': 'identity'" in post  # what went out on the wire
    assert "content-encoding" not in _response_headers(printed).lower()

    _loadgen_send(triton_server, images, compressed=True)
    printed = capsys.readouterr().out
    assert "'content-encoding': 'gzip'" in _response_headers(printed).lower()


@pytest.mark.parametrize("compress", [False, True])
def test_trust_client_http_compression_follows_its_option_when_explaining(
    triton_server, digits, capsys, compress
):
    images = digits[0][:2]
    with TrustClient(
        triton_server.http_url, "http", triton_server.model_name, compress_responses=compress
    ) as client:
        client._transport._client._verbose = True  # tritonclient's verbose mode, see above
        maps = [e.heatmap for e in client.explain(images, "gradcam")]
    printed = capsys.readouterr().out
    post = [line for line in printed.splitlines() if line.startswith("POST")][-1]
    response = _response_headers(printed)
    if compress:
        assert "'Accept-Encoding': 'gzip'" in post
        assert "'content-encoding': 'gzip'" in response.lower()
    else:
        assert "'Accept-Encoding': 'identity'" in post
        assert "content-encoding" not in response.lower()
    with TrustClient(triton_server.grpc_url, "grpc", triton_server.model_name) as reference:
        expected = [e.heatmap for e in reference.explain(images, "gradcam")]
    for got, want in zip(maps, expected, strict=True):
        np.testing.assert_array_equal(got, want)
