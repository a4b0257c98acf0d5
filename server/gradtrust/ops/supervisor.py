"""Keep a tritonserver serving when a Python backend stub dies.

Triton 2.51 does not recover a Python-backend model whose stub process died (OOM killer,
a segfault in native code, ``kill -9``): the model keeps reporting READY while every
request to it fails, after about a second, with INTERNAL "Stub process '<instance>' is not
healthy.", and it stays that way. With model control off (production) nothing can reload
the model, so the only cure is a new server process. :class:`Supervisor` watches for dead
stubs (zombie children of tritonserver) and for tritonserver itself exiting, and then
stops the server (draining for ``drain_s``) and starts a new one on the same ports.
Clients see connection errors for the few seconds that takes, which
:mod:`gradtrust_client.retry` retries.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from gradtrust.errors import ServerError
from gradtrust.ops.processes import dead_stubs, process_info
from gradtrust.ops.tritonserver import TritonServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restart:
    """One restart: when (``time.time()``), why, and how long serving was down."""

    at: float
    reason: str
    downtime_s: float


class Supervisor:
    """Owns a server made by ``start`` and replaces it when it breaks.

    ``check()`` looks once (call it from a loop, as ``gradtrust serve`` does);
    ``watch()`` does so every ``poll_s`` seconds on a background thread. More than
    ``max_restarts`` restarts within ``window_s`` seconds means the fault is not
    transient: the supervisor gives up and raises :class:`ServerError`.
    """

    def __init__(
        self,
        start: Callable[[], TritonServer],
        *,
        poll_s: float = 0.5,
        drain_s: float = 5.0,
        max_restarts: int = 5,
        window_s: float = 600.0,
    ) -> None:
        self._start = start
        self.poll_s = poll_s
        self.drain_s = drain_s
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.restarts: list[Restart] = []
        self.error: ServerError | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.server = start()

    def fault(self) -> str | None:
        """Why the current server needs replacing, or None when it is healthy."""
        code = self.server.process.poll()
        if code is not None:
            return f"tritonserver exited with code {code}"
        dead = self.server.dead_stubs()
        if dead:
            return (
                f"Python backend stub process(es) {dead} died; Triton would fail every "
                "request to their model until restarted"
            )
        return None

    def check(self) -> Restart | None:
        """Restart the server if it is broken; return what was done (None: nothing)."""
        with self._lock:
            if self._stopping.is_set():
                return None
            reason = self.fault()
            if reason is None:
                return None
            now = time.time()
            recent = [r for r in self.restarts if r.at > now - self.window_s]
            if len(recent) >= self.max_restarts:
                raise ServerError(
                    f"{reason}; already restarted {len(recent)} times in the last "
                    f"{self.window_s:.0f} s, so this is not transient: giving up. "
                    f"Server log:\n{self.server.log_tail()}"
                )
            log.warning("restarting tritonserver: %s", reason)
            t0 = time.monotonic()
            self.server.stop(drain_s=self.drain_s)
            self.server = self._start()
            event = Restart(at=now, reason=reason, downtime_s=time.monotonic() - t0)
            self.restarts.append(event)
            log.warning("tritonserver serving again after %.1f s", event.downtime_s)
            return event

    def watch(self) -> None:
        """Check every ``poll_s`` seconds on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stopping.wait(self.poll_s):
                try:
                    self.check()
                except ServerError as err:
                    self.error = err
                    log.error("%s", err)
                    return

        self._thread = threading.Thread(target=loop, name="gradtrust-supervisor", daemon=True)
        self._thread.start()

    def stop(self, drain_s: float | None = None) -> int:
        """Stop watching, then stop the server (a normal, draining shutdown)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
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
