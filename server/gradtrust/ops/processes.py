"""What Linux's ``/proc`` says about a tritonserver and its Python backend stubs.

Triton runs every Python-backend model instance in its own stub process. Three facts about
Triton 2.51 make watching those processes necessary (each was observed, see
docs/SECURITY.md and tests/integration/test_faults.py):

- a stub that dies (OOM killer, a crash in native code, ``kill -9``) is not restarted and
  not reaped: it stays a zombie child of tritonserver, the model still reports READY, and
  every request to it fails after about a second with "Stub process ... is not healthy";
- stubs outlive a tritonserver that was killed, ignoring SIGTERM, and keep their
  ``/dev/shm`` region;
- the server's memory is the sum over its own process and every stub.

Everything here reads ``/proc`` only; on systems without it the functions return nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
STUB_BINARY = "triton_python_backend_stub"
# The kernel truncates a process name to 15 characters.
_STUB_COMM = STUB_BINARY[:15]
# The stub's argv: binary, model.py, shm region, shm default size, shm growth size,
# parent pid, backend dir, ipc handle, instance name, runtime model dir.
_ARG_SHM_REGION = 2
_ARG_PARENT_PID = 5
_ARG_INSTANCE = 8


@dataclass(frozen=True)
class ProcessInfo:
    """One process as ``/proc/<pid>/stat`` and ``status`` describe it."""

    pid: int
    ppid: int
    state: str  # R, S, D, Z (zombie), ...
    name: str
    rss_bytes: int

    @property
    def is_stub(self) -> bool:
        return self.name == _STUB_COMM

    @property
    def is_zombie(self) -> bool:
        return self.state == "Z"


@dataclass(frozen=True)
class StubProcess:
    """A live Python backend stub and what it needs cleaning up if it is orphaned."""

    pid: int
    server_pid: int
    instance: str
    shm_region: str


def process_info(pid: int) -> ProcessInfo | None:
    """The process, or None when it does not exist (any more)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The name is in parentheses and may itself contain spaces or parentheses.
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return ProcessInfo(
        pid=pid, ppid=int(fields[1]), state=fields[0], name=name, rss_bytes=_rss_bytes(pid)
    )


def _rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0  # zombies and kernel threads have no VmRSS line


def _pids() -> list[int]:
    if not PROC.is_dir():
        return []
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def children(pid: int) -> list[ProcessInfo]:
    """Direct children of ``pid``, zombies included."""
    found = []
    for other in _pids():
        info = process_info(other)
        if info is not None and info.ppid == pid:
            found.append(info)
    return found


def dead_stubs(server_pid: int) -> list[ProcessInfo]:
    """Stubs of this server that have died: Triton leaves them as zombie children."""
    return [c for c in children(server_pid) if c.is_stub and c.is_zombie]


def _argv(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def stubs_launched_by(server_pid: int) -> list[StubProcess]:
    """Live stubs whose command line names ``server_pid`` as their parent, wherever they
    have been re-parented to (a killed server leaves them under init)."""
    found = []
    for pid in _pids():
        argv = _argv(pid)
        if (
            len(argv) > _ARG_INSTANCE
            and Path(argv[0]).name == STUB_BINARY
            and argv[_ARG_PARENT_PID] == str(server_pid)
        ):
            found.append(StubProcess(pid, server_pid, argv[_ARG_INSTANCE], argv[_ARG_SHM_REGION]))
    return found


def stub_regions(server_pid: int) -> set[str]:
    """Shared-memory region names of this server's live stubs (record them while the stubs
    live: a dead stub's command line is gone, and its region outlives it)."""
    regions = set()
    for child in children(server_pid):
        argv = _argv(child.pid) if child.is_stub and not child.is_zombie else []
        if len(argv) > _ARG_SHM_REGION:
            regions.add(argv[_ARG_SHM_REGION])
    return regions


def remove_orphaned_stubs(server_pid: int, known_regions: Iterable[str] = ()) -> list[StubProcess]:
    """After ``server_pid`` has exited: SIGKILL the stubs it left behind (they ignore
    SIGTERM once orphaned) and unlink their shared-memory regions, and those of
    ``known_regions`` (stubs that died before the server) if they are still there."""
    server = process_info(server_pid)
    if server is not None and not server.is_zombie:
        return []  # still running: its stubs are not orphans
    stubs = stubs_launched_by(server_pid)
    for stub in stubs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(stub.pid, signal.SIGKILL)
    for region in {*(s.shm_region for s in stubs), *known_regions}:
        if region.startswith("triton_") and "/" not in region:
            with contextlib.suppress(OSError):
                (Path("/dev/shm") / region).unlink()
    return stubs


def tree_rss(server_pid: int) -> dict[str, int]:
    """RSS in bytes of the server and each of its live children, keyed ``tritonserver``
    and ``<name>[<pid>]``. Shared memory mapped by several processes counts in each."""
    out: dict[str, int] = {}
    info = process_info(server_pid)
    if info is None:
        return out
    out["tritonserver"] = info.rss_bytes
    for child in children(server_pid):
        if not child.is_zombie:
            out[f"{child.name}[{child.pid}]"] = child.rss_bytes
    return out


_TCP_LISTEN = "0A"


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in (PROC / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _address(hex_address: str) -> str:
    """``/proc/net/tcp``'s hex address (little-endian 32-bit words) as text."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as gRPC binds
    return str(mapped or address)


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """The TCP (address, port) pairs process ``pid`` listens on, from its own view of
    ``/proc/net/tcp`` and ``tcp6``: what it really binds, whatever it was told."""
    inodes = _socket_inodes(pid)
    found = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            lines = (PROC / str(pid) / "net" / table).read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[3] == _TCP_LISTEN and fields[9] in inodes:
                    host, port = fields[1].split(":")
                    found.add((_address(host), int(port, 16)))
    return sorted(found, key=lambda item: (item[1], item[0]))
