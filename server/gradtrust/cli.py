"""``gradtrust``: the server-side command line (serve a model repository)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from gradtrust.errors import GradTrustError
from gradtrust.evaluation.cli import register as register_evaluation
from gradtrust.prepare.cli import register as register_prepare
from gradtrust.serve import Ports, start_server


def _serve(args: argparse.Namespace) -> int:
    ports = Ports(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port)
    print(f"starting tritonserver on {args.model_repository} ...", flush=True)
    server = start_server(args.model_repository, ports=ports, timeout_s=args.timeout)
    print(
        "\nready: " + ", ".join(server.models) + "\n"
        f"  HTTP     http://127.0.0.1:{ports.http}  (KServe v2: /v2/models/<name>/infer)\n"
        f"  gRPC     127.0.0.1:{ports.grpc}\n"
        f"  metrics  {server.metrics_url}\n"
        "try:  gradtrust-client predict examples/digits/*.png\n"
        "stop: Ctrl-C",
        flush=True,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    while not stop.is_set():
        if server.process.poll() is not None:
            print(f"tritonserver exited with code {server.process.returncode}", file=sys.stderr)
            return 1
        stop.wait(0.5)
    print("\nstopping tritonserver (draining in-flight requests) ...", flush=True)
    code = server.stop()
    print(f"stopped (exit code {code})", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradtrust", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run tritonserver on a model repository until Ctrl-C")
    serve.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    serve.set_defaults(func=_serve)
    register_prepare(sub)
    register_evaluation(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except GradTrustError as err:
        print(f"gradtrust: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
