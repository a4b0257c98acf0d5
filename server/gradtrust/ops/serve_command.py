"""``gradtrust serve``: run tritonserver on a model repository until Ctrl-C or SIGTERM,
restarting it when a model's stub process dies, and draining on the way out."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from gradtrust.errors import ServerError
from gradtrust.ops.supervisor import Supervisor
from gradtrust.ops.tritonserver import (
    ADMIN_KEY_ENV,
    Ports,
    TritonServer,
    admin_key_from_env,
    start_server,
)

HELP = "run tritonserver on a model repository until Ctrl-C"


def _serve(args: argparse.Namespace) -> int:
    ports = Ports(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port)
    admin_key = admin_key_from_env() if args.production else None
    mode = " (production configuration)" if admin_key else ""
    print(f"starting tritonserver on {args.model_repository}{mode} ...", flush=True)

    def start() -> TritonServer:
        return start_server(
            args.model_repository,
            ports=ports,
            timeout_s=args.timeout,
            admin_key=admin_key,
            address=args.address,
        )

    supervisor = Supervisor(start) if args.restart else None
    server = supervisor.server if supervisor is not None else start()
    for name, reason in server.failed_models.items():
        print(f"FAILED to load {name}: {reason.strip().splitlines()[0]}", file=sys.stderr)
    admin = (
        f"  admin    model-repository/logging/trace/shared-memory APIs need the key from "
        f"${ADMIN_KEY_ENV} (header gradtrust-admin-key)\n"
        if admin_key
        else ""
    )
    print(
        "\nready: " + ", ".join(server.models) + "\n"
        f"  HTTP     http://{server.http_url}  (KServe v2: /v2/models/<name>/infer)\n"
        f"  gRPC     {server.grpc_url}\n"
        f"  metrics  {server.metrics_url}\n" + admin + "try:  gradtrust-client predict "
        "examples/digits/*.png\n"
        "stop: Ctrl-C",
        flush=True,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    while not stop.is_set():
        if supervisor is not None:
            try:
                supervisor.check()  # restarts tritonserver if a model's stub process died
            except ServerError as err:
                print(f"gradtrust: error: {err}", file=sys.stderr)
                supervisor.stop(drain_s=5)
                return 1
        elif server.process.poll() is not None:
            print(f"tritonserver exited with code {server.process.returncode}", file=sys.stderr)
            return 1
        stop.wait(0.5)
    print("\nstopping tritonserver (draining in-flight requests) ...", flush=True)
    code = supervisor.stop() if supervisor is not None else server.stop()
    print(f"stopped (exit code {code})", flush=True)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``serve`` sub-command to the ``gradtrust`` parser."""
    serve = subparsers.add_parser("serve", help=HELP, description=__doc__)
    serve.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    serve.add_argument(
        "--production",
        action="store_true",
        help=f"model control off; model-repository, logging, trace and shared-memory APIs only "
        f"with the admin key from ${ADMIN_KEY_ENV}; a model that fails to load does not stop "
        "the others (docs/SECURITY.md)",
    )
    serve.add_argument(
        "--address",
        default=None,
        help="interface for HTTP, gRPC and metrics (default: all; 127.0.0.1: this host only)",
    )
    serve.add_argument(
        "--no-restart",
        dest="restart",
        action="store_false",
        help="do not restart tritonserver when a Python backend stub process dies",
    )
    serve.set_defaults(func=_serve)
