"""``gradtrust serve``: run tritonserver on a model repository until Ctrl-C or SIGTERM,
restarting it whenever it or a model's stub process dies, and draining on the way out.

It binds the loopback interface unless ``--address`` says otherwise, prints the addresses
tritonserver really listens on, and with ``--production`` refuses a Triton release with
known critical vulnerabilities (docs/SECURITY.md) unless ``--allow-vulnerable-triton``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from gradtrust.errors import ServerError
from gradtrust.ops import drain
from gradtrust.ops.exporter import MetricsExporter
from gradtrust.ops.supervisor import Supervisor
from gradtrust.ops.triton_versions import advisories_for, refuse_vulnerable
from gradtrust.ops.tritonserver import (
    ADMIN_KEY_ENV,
    Ports,
    TritonServer,
    admin_key_from_env,
    probe_version,
    start_server,
)

HELP = "run tritonserver on a model repository until Ctrl-C"
OVERRIDE_FLAG = "--allow-vulnerable-triton"
LOOPBACK = "127.0.0.1"
#: Default of --max-request-seconds: the longest a single admissible request may take.
DEFAULT_MAX_REQUEST_S = 10.0

log = logging.getLogger("gradtrust.serve")


def _check_version(args: argparse.Namespace) -> None:
    """In production, know the Triton version before anything listens beyond a probe."""
    if not args.production:
        return
    version = probe_version()
    if args.allow_vulnerable_triton:
        found = advisories_for(version)
        if found:
            print(
                f"WARNING: tritonserver {version} has {len(found)} known vulnerabilities "
                f"({', '.join(a.ids for a in found)}); running anyway because of "
                f"{OVERRIDE_FLAG} (docs/SECURITY.md)",
                file=sys.stderr,
                flush=True,
            )
        return
    refuse_vulnerable(version, OVERRIDE_FLAG)


def _banner(server: TritonServer, admin_key: str | None) -> str:
    listening = server.listening() + (server.exporter.listening() if server.exporter else [])
    names = {server.ports.http: "HTTP", server.ports.grpc: "gRPC", server.ports.metrics: "metrics"}
    lines = []
    for port, what in names.items():
        bound = sorted(host for host, p in listening if p == port)
        where = ", ".join(f"{h}:{port}" for h in bound) or f"(not listening on {port})"
        scope = (
            "this host only"
            if bound and all(h in (LOOPBACK, "::1") for h in bound)
            else "EVERY interface: other hosts can reach it"
        )
        lines.append(f"  {what:<8} listening on {where}  [{scope}]")
    admin = (
        f"  admin    model-repository/logging/trace/shared-memory APIs need the key from "
        f"${ADMIN_KEY_ENV} (header gradtrust-admin-key)\n"
        if admin_key
        else ""
    )
    return (
        "\nready: " + ", ".join(server.models) + "\n" + "\n".join(lines) + "\n"
        f"  clients  http://{server.http_url} (KServe v2: /v2/models/<name>/infer), "
        f"grpc {server.grpc_url}, metrics {server.metrics_url}\n"
        + admin
        + "try:  gradtrust-client predict examples/digits/*.png\nstop: Ctrl-C"
    )


def _serve(args: argparse.Namespace) -> int:
    # One metrics endpoint for the life of this command: it keeps answering (and keeps the
    # stubs' counts) while the supervisor replaces a broken tritonserver.
    exporter = MetricsExporter(
        args.metrics_port, args.address or "0.0.0.0", production=args.production
    ).start()
    try:
        return _serve_until_stopped(args, exporter)
    finally:
        exporter.stop()


def _serve_until_stopped(args: argparse.Namespace, exporter: MetricsExporter) -> int:
    logging.basicConfig(level=logging.INFO, format="gradtrust: %(message)s", stream=sys.stderr)
    ports = Ports(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port)
    admin_key = admin_key_from_env() if args.production else None
    if not Path(args.model_repository).is_dir():
        raise ServerError(
            f"model repository {Path(args.model_repository).resolve()} does not exist: "
            "pass --model-repository DIR"
        )
    _check_version(args)
    queues = drain.model_queues(args.model_repository)
    exit_timeout = args.drain_timeout or drain.exit_timeout_s(queues, args.max_request_seconds)
    unbounded = [q.name for q in queues if q.max_queue_size is None]
    mode = " (production configuration)" if admin_key else ""
    print(f"starting tritonserver on {args.model_repository}{mode} ...", flush=True)
    if unbounded and not args.drain_timeout:
        print(
            f"note: {', '.join(unbounded)} set no dynamic_batching max_queue_size, so a drain "
            f"assumes at most {drain.UNBOUNDED_QUEUE_ASSUMED} queued requests each; "
            f"exit timeout {exit_timeout} s",
            flush=True,
        )

    def start() -> TritonServer:
        return start_server(
            args.model_repository,
            ports=ports,
            timeout_s=args.timeout,
            admin_key=admin_key,
            address=args.address,
            exit_timeout_s=exit_timeout,
            exporter=exporter,
        )

    supervisor = Supervisor(start) if args.restart else None
    server = supervisor.server if supervisor is not None else start()
    if server is None:  # cannot happen: a first start that fails raises
        raise ServerError("tritonserver did not start")
    for name, reason in server.failed_models.items():
        print(f"FAILED to load {name}: {reason.strip().splitlines()[0]}", file=sys.stderr)
    print(_banner(server, admin_key), flush=True)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    while not stop.is_set():
        if supervisor is not None:
            supervisor.check()  # restarts tritonserver, with backoff, whatever killed it
        elif server.process.poll() is not None:
            print(f"tritonserver exited with code {server.process.returncode}", file=sys.stderr)
            return 1
        stop.wait(0.5)
    print(
        f"\nstopping tritonserver (answering every accepted request; up to {exit_timeout} s) ...",
        flush=True,
    )
    code = supervisor.stop() if supervisor is not None else server.stop()
    print(f"stopped (exit code {code})", flush=True)
    return 0 if code == 0 else 1


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
        "the others; refuses a Triton release with known critical vulnerabilities "
        "(docs/SECURITY.md)",
    )
    serve.add_argument(
        OVERRIDE_FLAG,
        action="store_true",
        help="with --production, run a Triton release with known critical vulnerabilities "
        "anyway (only behind a reverse proxy on a network you trust)",
    )
    serve.add_argument(
        "--address",
        default=LOOPBACK,
        help=f"interface for HTTP, gRPC and metrics (default {LOOPBACK}: this host only; "
        "0.0.0.0: every interface, e.g. in a container behind deploy/nginx)",
    )
    serve.add_argument(
        "--max-request-seconds",
        type=float,
        default=DEFAULT_MAX_REQUEST_S,
        help="the longest one admissible request may take on this hardware; sets the drain "
        f"time on SIGTERM (default {DEFAULT_MAX_REQUEST_S:g})",
    )
    serve.add_argument(
        "--drain-timeout",
        type=int,
        default=0,
        help="seconds tritonserver may drain on SIGTERM (default: computed from each model's "
        "queue bound and --max-request-seconds)",
    )
    serve.add_argument(
        "--no-restart",
        dest="restart",
        action="store_false",
        help="do not restart tritonserver when it or a Python backend stub process dies",
    )
    serve.set_defaults(func=_serve)
