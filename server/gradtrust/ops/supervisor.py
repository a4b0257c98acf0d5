"""Keep a tritonserver serving, whatever kills it, for as long as ``gradtrust serve`` runs.

Two faults need a new server process. Triton 2.51 does not recover a Python-backend model
whose stub died (OOM killer, a crash in native code, ``kill -9``): the model keeps
reporting READY while every request to it fails with INTERNAL "Stub process '<instance>'
is not healthy", for good; and tritonserver itself can die (an 80 kB request nested
40,000 levels deep segfaults 2.51: docs/SECURITY.md). :class:`Supervisor` watches for
both and starts a new server on the same ports.

It never gives up: a fault that comes back at once (a client resending the crashing
request, a port still taken) only makes the restarts wait longer, doubling from
``initial_backoff_s`` to ``max_backoff_s``; a server that then stays healthy for
``healthy_after_s`` resets the wait. Every restart is logged with its cause and counted
in ``gradtrust_server_restarts_total{cause}`` (prometheus_client's default registry of the
``gradtrust serve`` process), which deploy/prometheus/rules alert on. Clients see
connection errors while the server is down, which :mod:`gradtrust_client.retry` retries.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from prometheus_client import Counter

from gradtrust.errors import ServerError
from gradtrust.ops.processes import dead_stubs, process_info
from gradtrust.ops.tritonserver import TritonServer

log = logging.getLogger(__name__)

#: Causes of a restart (the ``cause`` label): tritonserver killed by a signal (a crash),
#: exited by itself, a Python backend stub died, or a new server failed to start.
CAUSES: tuple[str, ...] = ("crashed", "exited", "stub_died", "start_failed")
#: The exported name of :data:`RESTARTS` (deploy/prometheus/rules/gradtrust-serve.rules.yml).
RESTARTS_METRIC = "gradtrust_server_restarts_total"
RESTARTS = Counter(
    RESTARTS_METRIC.removesuffix("_total"),
    "Restarts of tritonserver by gradtrust serve's supervisor, by cause",
    ["cause"],
)
for _cause in CAUSES:  # every series exists from the start, so increase() sees the first
    RESTARTS.labels(cause=_cause)


@dataclass(frozen=True)
class Restart:
    """One restart: when (``time.time()``), why, and how long serving was down."""

    at: float
    reason: str
    downtime_s: float
    cause: str = "exited"


@dataclass(frozen=True)
class Fault:
    """Why the current server must be replaced: ``cause`` (one of :data:`CAUSES`) and a
    sentence for the log."""

    cause: str
    reason: str


def describe_exit(code: int) -> Fault:
    """A server's exit status as a fault: negative codes are the signal that killed it."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return Fault("crashed", f"tritonserver was killed by {name} (exit code {code})")
    return Fault("exited", f"tritonserver exited by itself with code {code}")


def backoff_s(streak: int, initial_s: float, max_s: float) -> float:
    """Wait before the restart number ``streak`` (0-based) of a run of faults: none for
    the first, then ``initial_s`` doubling up to ``max_s``."""
    if streak <= 0:
        return 0.0
    return float(min(max_s, initial_s * 2.0 ** (streak - 1)))


class Supervisor:
    """Owns a server made by ``start`` and replaces it when it breaks, forever.

    ``check()`` looks once (call it from a loop, as ``gradtrust serve`` does) and never
    raises; ``watch()`` does so every ``poll_s`` seconds on a background thread. While a
    restart waits out its backoff, :attr:`server` is None.
    """

    def __init__(
        self,
        start: Callable[[], TritonServer],
        *,
        poll_s: float = 0.5,
        drain_s: float = 5.0,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        healthy_after_s: float = 300.0,
    ) -> None:
        self._start = start
        self.poll_s = poll_s
        self.drain_s = drain_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_after_s = healthy_after_s
        self.restarts: list[Restart] = []
        #: Restart attempts (successful or not) since the server was last healthy for
        #: ``healthy_after_s``: the exponent of the backoff.
        self.streak = 0
        self._fault: Fault | None = None
        self._down_since = 0.0
        self._next_attempt = 0.0
        self._up_since = time.monotonic()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.server: TritonServer | None = start()  # a first start that fails is an error

    def fault(self) -> Fault | None:
        """Why the current server needs replacing, or None when it is healthy."""
        if self.server is None:
            return self._fault
        code = self.server.process.poll()
        if code is not None:
            return describe_exit(code)
        dead = self.server.dead_stubs()
        if dead:
            return Fault(
                "stub_died",
                f"Python backend stub process(es) {dead} died; Triton would fail every "
                "request to their model until restarted",
            )
        return None

    def check(self) -> Restart | None:
        """Replace the server if it is broken and its backoff is over; return the restart
        that brought it back (None: nothing to do yet, or a start that failed)."""
        with self._lock:
            if self._stopping.is_set():
                return None
            now = time.monotonic()
            if self.server is not None:
                fault = self.fault()
                if fault is None:
                    if self.streak and now - self._up_since >= self.healthy_after_s:
                        self.streak = 0
                    return None
                self._take_down(fault, now)
            if now < self._next_attempt:
                return None
            return self._bring_up(now)

    def _take_down(self, fault: Fault, now: float) -> None:
        server = self.server
        if server is None:
            return
        errors = server.log_errors(limit=5)
        log.warning(
            "tritonserver fault: %s; restart %d of this run in %.0f s%s",
            fault.reason,
            self.streak + 1,
            backoff_s(self.streak, self.initial_backoff_s, self.max_backoff_s),
            f"; its last errors:\n{errors}" if errors else "",
        )
        server.stop(drain_s=self.drain_s)
        self.server = None
        self._fault = fault
        self._down_since = now
        self._next_attempt = now + backoff_s(
            self.streak, self.initial_backoff_s, self.max_backoff_s
        )

    def _bring_up(self, now: float) -> Restart | None:
        fault = self._fault or Fault("exited", "tritonserver is not running")
        RESTARTS.labels(cause=fault.cause).inc()
        self.streak += 1
        try:
            self.server = self._start()
        except ServerError as err:
            wait = backoff_s(self.streak, self.initial_backoff_s, self.max_backoff_s)
            log.error("restarting tritonserver failed (%s); trying again in %.0f s", err, wait)
            self._fault = Fault("start_failed", f"the last start failed: {err}")
            self._next_attempt = time.monotonic() + wait
            return None
        done = time.monotonic()
        event = Restart(
            at=time.time(),
            reason=fault.reason,
            downtime_s=done - self._down_since,
            cause=fault.cause,
        )
        self.restarts.append(event)
        self._fault = None
        self._up_since = done
        log.warning(
            "tritonserver serving again after %.1f s down (cause: %s)",
            event.downtime_s,
            fault.reason,
        )
        return event

    def watch(self) -> None:
        """Check every ``poll_s`` seconds on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stopping.wait(self.poll_s):
                self.check()

        self._thread = threading.Thread(target=loop, name="gradtrust-supervisor", daemon=True)
        self._thread.start()

    def stop(self, drain_s: float | None = None) -> int:
        """Stop watching, then stop the server (a normal, draining shutdown); 0 when no
        server was running (between a fault and its restart)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self.server is None:
                return 0
            return self.server.stop(drain_s=drain_s)

    def __enter__(self) -> Supervisor:
        self.watch()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradtrust.ops.supervisor --pid PID``: exit 1 if that tritonserver has a dead
    Python backend stub. A liveness probe for containers that run tritonserver directly
    (without ``gradtrust serve``), so that the orchestrator restarts them."""
    parser = argparse.ArgumentParser(
        prog="python -m gradtrust.ops.supervisor", description=main.__doc__
    )
    parser.add_argument("--pid", type=int, default=1, help="tritonserver's pid (default: 1)")
    args = parser.parse_args(argv)
    server = process_info(args.pid)
    if server is None or server.is_zombie:
        print(f"no running process {args.pid}", file=sys.stderr)
        return 1
    dead = [p.pid for p in dead_stubs(args.pid)]
    if dead:
        print(
            f"tritonserver {args.pid}: Python backend stub(s) {dead} died; their models fail "
            "every request until the server restarts",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
