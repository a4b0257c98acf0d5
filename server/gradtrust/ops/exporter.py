"""The metrics endpoint of ``gradtrust serve``: Triton's metrics and ours, on one port.

Prometheus scrapes one port per server. What answers there is this small HTTP server in
the ``gradtrust serve`` process, not tritonserver, for two reasons:

- The gradtrust_* metrics are written by the Python backend stubs into memory-mapped
  files (prometheus-client's multiprocess mode, :mod:`gradtrust.serving.telemetry`), at no
  per-request cost. Something outside Triton has to merge them, and it must keep
  answering while tritonserver restarts: the supervisor replaces a server whose stub died,
  and a scrape in between must still succeed (with ``gradtrust_triton_up 0``) rather than
  leave a gap that looks like the whole host vanished.
- The serve process has metrics of its own (restarts), in its default registry.

Each scrape therefore joins three parts: Triton's own exposition, fetched from its metrics
port (moved to a loopback-only port that nothing else uses); every stub's file in the
per-server directory, merged by prometheus-client's multiprocess collector (files of dead
stubs stay, so totals survive reloads and restarts without counting twice; their "live"
gauges are dropped); and this process's default registry. The directory is created empty
when the exporter starts and removed when it stops, so a new server starts from zero.
"""

from __future__ import annotations

import glob
import http.server
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from gradtrust.errors import ServerError
from gradtrust.ops.processes import process_info

__all__ = ["METRIC_NAMES", "MULTIPROC_ENV", "PRODUCTION", "TRITON_UP", "MetricsExporter"]

log = logging.getLogger(__name__)

#: Set in tritonserver's environment (and so its stubs'): where the stubs write metrics.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: 1 when this scrape could read Triton's own metrics, 0 when tritonserver is down.
TRITON_UP = "gradtrust_triton_up"
#: 1 when the server runs the production configuration (``gradtrust serve --production``).
PRODUCTION = "gradtrust_production_mode"
#: The metrics this exporter adds itself (the stubs' are in gradtrust.serving.telemetry).
METRIC_NAMES: tuple[str, ...] = (TRITON_UP, PRODUCTION)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, a dead stub Triton has not reaped, does not)."""
    info = process_info(pid)
    return info is not None and not info.is_zombie


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _IPv6Server(http.server.ThreadingHTTPServer):
    """For ``--address ::`` (or another IPv6 address)."""

    address_family = socket.AF_INET6


class _ServeCollector(Collector):
    """The exporter's own gauges, evaluated per scrape."""

    def __init__(self, triton_up: bool, production: bool) -> None:
        self.triton_up = triton_up
        self.production = production

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            TRITON_UP,
            "1 if this scrape read tritonserver's own metrics, 0 if it is down or restarting",
            value=1.0 if self.triton_up else 0.0,
        )
        yield GaugeMetricFamily(
            PRODUCTION,
            "1 if the server runs the production configuration (gradtrust serve --production)",
            value=1.0 if self.production else 0.0,
        )


class MetricsExporter:
    """Serves ``/metrics`` on ``address:port`` for one (possibly restarted) tritonserver.

    ``triton_port`` is where tritonserver must put its own metrics (loopback only);
    :attr:`environment` is what tritonserver's environment needs. Use as a context
    manager, or :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        port: int,
        address: str = "0.0.0.0",
        *,
        triton_port: int | None = None,
        production: bool = False,
        registry: CollectorRegistry = REGISTRY,
        fetch_timeout_s: float = 3.0,
    ) -> None:
        self.port = port
        self.address = address
        self.triton_port = triton_port or _free_loopback_port()
        self.production = production
        self.registry = registry
        self.fetch_timeout_s = fetch_timeout_s
        self.directory: Path | None = None
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def triton_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.triton_port}/metrics"

    @property
    def url(self) -> str:
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(
            self.address, self.address
        )
        return (
            f"http://[{host}]:{self.port}/metrics"
            if ":" in host
            else f"http://{host}:{self.port}/metrics"
        )

    @property
    def environment(self) -> dict[str, str]:
        """Environment variables tritonserver must get so that its stubs' metrics arrive."""
        if self.directory is None:
            raise ServerError("start the metrics exporter before the server it exports")
        return {MULTIPROC_ENV: str(self.directory)}

    # --- one scrape ------------------------------------------------------------------

    def _fetch_triton(self) -> bytes | None:
        try:
            with urllib.request.urlopen(self.triton_metrics_url, timeout=self.fetch_timeout_s) as r:
                body = bytes(r.read())
        except (OSError, urllib.error.URLError):
            return None
        return body if body.endswith(b"\n") or not body else body + b"\n"

    def _forget_dead_stubs(self) -> None:
        """Drop the "live" gauges of stubs that are gone (prometheus-client's bookkeeping
        for a dead process; their counters and histograms stay, as they must)."""
        if self.directory is None:
            return
        pids = set()
        for path in glob.glob(str(self.directory / "gauge_live*_*.db")):
            match = _LIVE_GAUGE_FILE.fullmatch(os.path.basename(path))
            if match:
                pids.add(int(match.group(1)))
        for pid in pids:
            if not _alive(pid):
                mark_process_dead(pid, str(self.directory))

    def render(self) -> bytes:
        """The body of one scrape: Triton's metrics (if it answers), then ours."""
        if self.directory is None:
            raise ServerError("the metrics exporter is not running")
        triton = self._fetch_triton()
        self._forget_dead_stubs()
        ours = CollectorRegistry()
        MultiProcessCollector(ours, path=str(self.directory))
        ours.register(_ServeCollector(triton is not None, self.production))
        return (triton or b"") + generate_latest(ours) + generate_latest(self.registry)

    # --- the HTTP server -------------------------------------------------------------

    def start(self) -> MetricsExporter:
        if self._server is not None:
            return self
        self.directory = Path(tempfile.mkdtemp(prefix="gradtrust-metrics-"))
        exporter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = exporter.render()
                except Exception as err:  # noqa: BLE001 - answer 500, keep serving
                    log.exception("metrics scrape failed")
                    self.send_error(500, f"scrape failed: {type(err).__name__}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # one line per scrape would drown the server log

        try:
            server_class = _IPv6Server if ":" in self.address else http.server.ThreadingHTTPServer
            self._server = server_class((self.address, self.port), Handler)
        except OSError as err:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            raise ServerError(
                f"cannot serve metrics on {self.address}:{self.port} ({err}): is another "
                "server using that port? pass a free --metrics-port"
            ) from err
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])  # the real one when asked for port 0
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="gradtrust-metrics", daemon=True
        )
        self._thread.start()
        return self

    def listening(self) -> list[tuple[str, int]]:
        """The (address, port) this exporter listens on (none when stopped)."""
        if self._server is None:
            return []
        host, port = self._server.server_address[:2]
        return [(str(host), int(port))]

    def stop(self) -> None:
        """Stop answering and remove the stubs' files. Idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> MetricsExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
