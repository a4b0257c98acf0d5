"""What the real server returns depends on the outputs a request names (HTTP and gRPC)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.conftest import DEMO_MODEL


def _returned_names(server: Any, protocol: str, images: np.ndarray, outputs: list[str]) -> set:
    lib: Any = httpclient if protocol == "http" else grpcclient
    if protocol == "http":
        client = httpclient.InferenceServerClient(server.http_url)
    else:
        client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensor = lib.InferInput("IMAGE", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        requested = [lib.InferRequestedOutput(name) for name in outputs]
        response = client.infer(DEMO_MODEL, [tensor], outputs=requested or None).get_response()
    finally:
        client.close()
    if protocol == "http":
        return {o["name"] for o in response["outputs"]}
    return {o.name for o in response.outputs}


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_returns_exactly_gradtrust_when_a_request_names_only_gradtrust(
    triton_server, digits, protocol
):
    names = _returned_names(triton_server, protocol, digits[0][:2], ["GRADTRUST"])
    assert names == {"GRADTRUST"}


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_returns_cheap_outputs_scores_and_trust_prob_when_a_request_names_none(
    triton_server, digits, protocol
):
    names = _returned_names(triton_server, protocol, digits[0][:2], [])
    # Triton lists every output when none is named: the cheap ones, TRUST_PROB (the demo is
    # calibrated) and SCORES come back; heatmaps only when a parameter asks for one.
    assert names == {"LABEL", "CLASS_ID", "CONFIDENCE", "GRADTRUST", "TRUST_PROB", "SCORES"}
