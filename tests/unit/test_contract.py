"""The wire contract is written once on each side, and both sides agree.

The server's names live in ``gradtrust.serving.contract``; the client, which installs
without the server's dependencies, keeps a copy in ``gradtrust_client._contract``.
"""

from __future__ import annotations

import re

from gradtrust.serving import contract as server
from gradtrust_client import _contract as client
from tests.conftest import MODEL_REPOSITORY


def _public(module: object) -> dict[str, object]:
    return {k: v for k, v in vars(module).items() if k.isupper() and not k.startswith("_")}


def test_client_copy_equals_the_server_contract_for_every_name_it_holds() -> None:
    ours, theirs = _public(client), _public(server)
    missing = sorted(set(ours) - set(theirs))
    assert not missing, f"client names unknown to the server contract: {missing}"
    different = {k: (v, theirs[k]) for k, v in ours.items() if theirs[k] != v}
    assert not different, different


def test_client_copy_holds_every_tensor_and_request_parameter_of_the_server() -> None:
    wire = [*server.OUTPUTS, server.IMAGE, server.IMAGE_BYTES, *server.REQUEST_PARAMETERS]
    held = set(_public(client).values())
    assert not [name for name in wire if name not in held]


def test_demo_config_declares_exactly_the_contract_outputs() -> None:
    config = (MODEL_REPOSITORY / "gradtrust_mnist" / "config.pbtxt").read_text()
    outputs = config.split("output [", 1)[1].split("\n]", 1)[0]
    declared = re.findall(r'name:\s*"([A-Z_]+)"', outputs)
    assert tuple(declared) == server.OUTPUTS
