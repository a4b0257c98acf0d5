"""What gradtrust serve exposes, checked without a server: the sockets a process really
listens on (read from /proc, IPv4, IPv6 and IPv4-mapped alike) and the environment
tritonserver and its stubs inherit (never the admin key)."""

from __future__ import annotations

import argparse
import os
import socket

import pytest

from gradtrust.ops import tritonserver
from gradtrust.ops.processes import listening_sockets
from gradtrust.ops.serve_command import LOOPBACK, register
from gradtrust.ops.tritonserver import ADMIN_KEY_ENV, TritonInstall, server_env


def test_listening_sockets_reports_each_bound_address_when_this_process_listens():
    sockets = []
    try:
        for family, address in (
            (socket.AF_INET, "127.0.0.1"),
            (socket.AF_INET6, "::1"),
            (socket.AF_INET6, "::ffff:127.0.0.1"),  # how gRPC binds 127.0.0.1
        ):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind((address, 0))
            sock.listen()
            sockets.append(sock)
        idle = socket.socket()  # bound but not listening: not reported
        idle.bind(("127.0.0.1", 0))
        sockets.append(idle)
        found = listening_sockets(os.getpid())
        ports = [s.getsockname()[1] for s in sockets]
        assert ("127.0.0.1", ports[0]) in found
        assert ("::1", ports[1]) in found
        assert ("127.0.0.1", ports[2]) in found
        assert all(port != ports[3] for _, port in found)
    finally:
        for sock in sockets:
            sock.close()


def test_server_env_leaves_out_the_admin_key_when_it_is_in_ours(monkeypatch, tmp_path):
    monkeypatch.setenv(ADMIN_KEY_ENV, "a-secret-key-0123456789")
    monkeypatch.setenv("SOMETHING_ELSE", "kept")
    env = server_env(TritonInstall(binary=tmp_path / "tritonserver", backend_dir=tmp_path))
    assert ADMIN_KEY_ENV not in env and "a-secret-key-0123456789" not in env.values()
    assert env["SOMETHING_ELSE"] == "kept"


def test_serve_binds_loopback_when_no_address_is_given():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert args.address == LOOPBACK == "127.0.0.1"
    assert args.allow_vulnerable_triton is False


@pytest.mark.parametrize("address", [None, "0.0.0.0", "127.0.0.1"])
def test_server_command_binds_http_and_grpc_as_asked_and_triton_metrics_to_loopback(
    address, tmp_path
):
    install = TritonInstall(binary=tmp_path / "tritonserver", backend_dir=tmp_path)
    cmd = tritonserver.server_command(install, tmp_path, tritonserver.Ports(), address=address)
    given = dict(a[2:].split("=", 1) for a in cmd if a.split("=")[0].endswith("-address"))
    want = {"http-address": address, "grpc-address": address} if address else {}
    # the public metrics port is gradtrust serve's exporter; Triton's own stays on loopback
    assert given == {**want, "metrics-address": "127.0.0.1"}
