"""Run a real ``tritonserver`` on a model repository, without Docker.

Two ways to find the server binary, in this order:

1. ``tritonserver`` on PATH with its own backends (NVIDIA's container images:
   ``/opt/tritonserver/bin/tritonserver``, backends in ``/opt/tritonserver/backends``);
2. the complete Triton 2.51 that ships inside the ``nvidia-pytriton`` wheel. That copy
   has no ready backend folder, so we assemble one (``python/`` with
   ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub for the
   running Python) in a cache directory and put the wheel's libraries on
   ``LD_LIBRARY_PATH``, which the stub needs.

The Python backend stub runs the ``python3`` found on PATH, so the interpreter running
this module is put first on PATH: ``model.py`` then imports this package and its
dependencies from the same environment.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gradtrust.errors import ServerError

_PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class TritonInstall:
    """Where a runnable tritonserver, its backends and its libraries are."""

    binary: Path
    backend_dir: Path
    library_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gradtrust"


def _pytriton_install() -> TritonInstall | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(next(iter(spec.submodule_search_locations)))
    server = pkg / "tritonserver"
    binary = server / "bin" / "tritonserver"
    stub = server / "python_backend_stubs" / _PY_VERSION / "triton_python_backend_stub"
    if not binary.exists():
        return None
    if not stub.exists():
        raise ServerError(
            f"nvidia-pytriton has no Python backend stub for Python {_PY_VERSION} ({stub}); "
            "use Python 3.8-3.13 or run tritonserver from NVIDIA's container."
        )
    backend_dir = _cache_dir() / f"backends-py{_PY_VERSION}"
    python_dir = backend_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    sources = {
        "libtriton_python.so": server / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": server
        / "backends"
        / "python"
        / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, src in sources.items():
        link = python_dir / name
        if link.is_symlink() and link.resolve() == src.resolve():
            continue
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(src)
    libs = pkg.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary=binary, backend_dir=backend_dir, library_dirs=(libs,))


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver; raise :class:`ServerError` saying how to get one if absent."""
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        backend_dir = binary.parent.parent / "backends"
        if (backend_dir / "python").is_dir():
            return TritonInstall(binary=binary, backend_dir=backend_dir)
    install = _pytriton_install()
    if install is None:
        raise ServerError(
            "no tritonserver found: install the server extra "
            "(pip install 'gradtrust-serve[server]', which brings nvidia-pytriton) "
            "or run inside NVIDIA's tritonserver container."
        )
    return install


def free_port() -> int:
    """A TCP port on loopback that is free right now (for tests and parallel servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(
    install: TritonInstall,
    model_repository: Path,
    ports: Ports,
    extra_args: Sequence[str] = (),
    exit_timeout_s: int = 30,
) -> list[str]:
    return [
        str(install.binary),
        f"--model-repository={model_repository}",
        f"--backend-directory={install.backend_dir}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--allow-metrics=true",
        "--log-verbose=0",
        f"--exit-timeout-secs={exit_timeout_s}",
        *extra_args,
    ]


def server_env(install: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    libs = [str(p) for p in install.library_dirs]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # The stub runs the first python3 on PATH: make it this interpreter's environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


@dataclass
class TritonServer:
    """A running tritonserver process; use :func:`start_server` to make one."""

    process: subprocess.Popen[bytes]
    ports: Ports
    model_repository: Path
    log_path: Path | None = None
    exit_timeout_s: int = 30
    models: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def is_ready(self) -> bool:
        try:
            status, _ = _get(f"http://{self.http_url}/v2/health/ready")
        except OSError:
            return False
        return status == 200

    def ready_models(self) -> list[str]:
        req = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/index",
            data=b"{}",
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            index = json.loads(resp.read())
        return sorted(m["name"] for m in index if m.get("state") == "READY")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(
                    f"tritonserver exited with code {code} before it was ready.\n{self.log_tail()}"
                )
            if self.is_ready():
                self.models = self.ready_models()
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(
            f"tritonserver was not ready after {timeout_s:.0f} s; its log ends:\n{self.log_tail()}"
        )

    def stop(self) -> int:
        """SIGTERM: Triton stops taking requests and drains in-flight ones for up to
        ``exit_timeout_s`` (open client connections also hold it that long); SIGKILL
        only if it is still alive well after that."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def start_server(
    model_repository: str | os.PathLike[str],
    ports: Ports | None = None,
    log_path: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    wait: bool = True,
    timeout_s: float = 120.0,
    exit_timeout_s: int = 30,
) -> TritonServer:
    """Start tritonserver on ``model_repository`` and (by default) wait until it is ready.

    With ``log_path`` the server's output goes to that file (tests); without, it is
    inherited by the caller's terminal (``gradtrust serve``).
    """
    repo = Path(model_repository).resolve()
    if not repo.is_dir():
        raise ServerError(f"model repository {repo} does not exist: pass --model-repository DIR")
    install = find_tritonserver()
    ports = ports or Ports()
    cmd = server_command(install, repo, ports, extra_args, exit_timeout_s)
    log_file = Path(log_path) if log_path is not None else None
    stdout = log_file.open("wb") if log_file is not None else None
    try:
        process = subprocess.Popen(
            cmd,
            env=server_env(install),
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            start_new_session=True,  # Ctrl-C reaches us, and we stop the server cleanly
        )
    finally:
        if stdout is not None:
            stdout.close()
    server = TritonServer(
        process=process,
        ports=ports,
        model_repository=repo,
        log_path=log_file,
        exit_timeout_s=exit_timeout_s,
    )
    if wait:
        server.wait_ready(timeout_s)
    return server


@contextlib.contextmanager
def running_server(
    model_repository: str | os.PathLike[str],
    ports: Ports | None = None,
    log_path: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float = 120.0,
    exit_timeout_s: int = 30,
) -> Iterator[TritonServer]:
    """``with running_server(repo) as server:`` starts and always stops a server."""
    server = start_server(
        model_repository, ports, log_path, extra_args, True, timeout_s, exit_timeout_s
    )
    try:
        yield server
    finally:
        server.stop()
