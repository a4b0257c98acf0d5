"""The supervisor's restart policy: it never gives up, waits longer the more often the
fault comes back, and counts every restart by cause. Real crashes of a real tritonserver
are in tests/integration/test_security_abuse.py and test_faults.py; here the server is a
stand-in whose process exits when told, so the timing can be stepped through exactly."""

from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass, field

import pytest

from gradtrust.errors import ServerError
from gradtrust.ops import supervisor as supervisor_module
from gradtrust.ops.supervisor import RESTARTS, Supervisor, backoff_s, describe_exit


@dataclass
class _Process:
    code: int | None = None
    pid: int = field(default_factory=itertools.count(1000).__next__)

    def poll(self) -> int | None:
        return self.code


@dataclass
class _Server:
    process: _Process = field(default_factory=_Process)
    stopped: bool = False

    def dead_stubs(self) -> list[int]:
        return []

    def log_errors(self, limit: int = 20) -> str:
        return ""

    def stop(self, drain_s: float | None = None) -> int:
        self.stopped = True
        return 0


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(supervisor_module.time, "monotonic", fake)
    return fake


def _counted() -> dict[str, float]:
    return {
        s.labels["cause"]: s.value
        for metric in RESTARTS.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }


def test_backoff_doubles_from_nothing_to_the_cap_when_faults_repeat():
    waits = [backoff_s(n, 1.0, 60.0) for n in range(9)]
    assert waits == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


@pytest.mark.parametrize(
    ("code", "cause", "words"),
    [(-signal.SIGSEGV, "crashed", "killed by SIGSEGV"), (1, "exited", "exited by itself")],
)
def test_exit_is_described_by_cause_when_tritonserver_ends(code, cause, words):
    fault = describe_exit(code)
    assert fault.cause == cause and words in fault.reason


def test_supervisor_never_gives_up_and_backs_off_when_the_server_keeps_crashing(clock):
    servers: list[_Server] = []

    def start() -> _Server:
        servers.append(_Server())
        return servers[-1]

    before = _counted()
    sup = Supervisor(start, initial_backoff_s=1.0, max_backoff_s=8.0)  # type: ignore[arg-type]
    waits = []
    for _ in range(12):  # far more than any "give up after N" limit
        servers[-1].process.code = -signal.SIGSEGV
        crashed_at = clock.now
        while (event := sup.check()) is None:
            assert sup.server is None  # down, waiting out the backoff
            clock.now += 0.5
        waits.append(clock.now - crashed_at)
        assert event.cause == "crashed" and "SIGSEGV" in event.reason
        assert sup.server is servers[-1] and servers[-2].stopped
    assert waits == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    assert len(sup.restarts) == 12
    assert _counted()["crashed"] - before.get("crashed", 0) == 12


def test_supervisor_keeps_trying_and_counts_failed_starts_when_a_start_fails(clock):
    attempts = []

    def start() -> _Server:
        attempts.append(clock.now)
        if 2 <= len(attempts) <= 3:  # the first two restarts fail (a port still taken)
            raise ServerError("tritonserver exited with code 1 before it was ready")
        return _Server()

    before = _counted()
    sup = Supervisor(start, initial_backoff_s=1.0, max_backoff_s=60.0)  # type: ignore[arg-type]
    assert sup.server is not None
    sup.server.process.code = 0
    events = []
    for _ in range(40):
        events.append(sup.check())
        clock.now += 0.5
    restarted = [e for e in events if e is not None]
    assert len(restarted) == 1 and sup.server is not None
    assert [a - attempts[1] for a in attempts[1:]] == [0.0, 1.0, 3.0]  # waits of 1, then 2
    counted = _counted()
    assert counted["exited"] - before.get("exited", 0) == 1
    assert counted["start_failed"] - before.get("start_failed", 0) == 2


def test_supervisor_resets_its_backoff_when_the_server_stays_healthy(clock):
    servers: list[_Server] = []

    def start() -> _Server:
        servers.append(_Server())
        return servers[-1]

    sup = Supervisor(start, initial_backoff_s=1.0, healthy_after_s=300.0)  # type: ignore[arg-type]
    for _ in range(3):
        servers[-1].process.code = -signal.SIGKILL
        while sup.check() is None:
            clock.now += 0.5
    assert sup.streak == 3
    clock.now += 301.0
    assert sup.check() is None and sup.streak == 0
    servers[-1].process.code = -signal.SIGKILL
    assert sup.check() is not None  # the first restart after a healthy spell is immediate
