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

:func:`production_args` is the hardened flag set (model control off, management APIs behind
an admin key, a failed model not taking the others down); docs/SECURITY.md explains it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gradtrust.errors import ServerError
from gradtrust.ops.exporter import MetricsExporter
from gradtrust.ops.processes import (
    dead_stubs,
    listening_sockets,
    remove_orphaned_stubs,
    stub_regions,
    tree_rss,
)

_PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"

#: Environment variable holding the key that unlocks the restricted APIs in production.
ADMIN_KEY_ENV = "GRADTRUST_ADMIN_KEY"
#: HTTP header carrying it.
ADMIN_HEADER = "gradtrust-admin-key"
#: gRPC metadata key carrying it: Triton 2.51 prefixes the configured key for gRPC.
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
#: Triton APIs that only holders of the admin key may call in production. Inference,
#: health, metadata, model-config (the client reads it) and statistics stay open.
RESTRICTED_APIS = ("model-repository", "logging", "trace", "shared-memory")
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,256}")


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


def check_admin_key(key: str) -> str:
    """The key, if it is usable on Triton's command line and long enough to resist guessing."""
    if not _KEY_PATTERN.fullmatch(key):
        raise ServerError(
            f"the admin key (${ADMIN_KEY_ENV}) must be 16-256 characters of A-Z, a-z, 0-9, '-' "
            "or '_'; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return key


def admin_key_from_env(env: dict[str, str] | None = None) -> str:
    """Read the admin key from ``$GRADTRUST_ADMIN_KEY``; a missing or weak key is an error."""
    key = (os.environ if env is None else env).get(ADMIN_KEY_ENV, "").strip()
    if not key:
        raise ServerError(
            f"production mode needs an admin key in ${ADMIN_KEY_ENV} (it guards the "
            f"{', '.join(RESTRICTED_APIS)} APIs); make one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return check_admin_key(key)


def production_args(admin_key: str) -> list[str]:
    """Triton flags of the production configuration.

    Model control off (nothing can load, unload or replace a model at run time); the
    model-repository, logging, trace and shared-memory APIs answer only requests carrying
    the key (HTTP header ``gradtrust-admin-key``, gRPC metadata
    ``triton-grpc-protocol-gradtrust-admin-key``); a model that fails to load leaves the
    server up serving the others (its reason is in the log and the repository index);
    SageMaker and Vertex AI endpoints off. The key is visible in the host's process list:
    see docs/SECURITY.md.
    """
    key = check_admin_key(admin_key)
    restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={key}"
    return [
        "--model-control-mode=none",
        "--exit-on-error=false",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
        "--allow-sagemaker=false",
        "--allow-vertex-ai=false",
    ]


def server_command(
    install: TritonInstall,
    model_repository: Path,
    ports: Ports,
    extra_args: Sequence[str] = (),
    exit_timeout_s: int = 30,
    address: str | None = None,
) -> list[str]:
    """``address`` binds HTTP and gRPC to one interface (None: Triton's 0.0.0.0). Triton's own
    metrics go to ``ports.metrics`` on loopback only: :class:`MetricsExporter` serves the
    public metrics port, Triton's metrics included."""
    bind = [f"--http-address={address}", f"--grpc-address={address}"] if address else []
    return [
        str(install.binary),
        f"--model-repository={model_repository}",
        f"--backend-directory={install.backend_dir}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--metrics-address=127.0.0.1",
        *bind,
        "--allow-metrics=true",
        "--log-verbose=0",
        f"--exit-timeout-secs={exit_timeout_s}",
        *extra_args,
    ]


def server_env(install: TritonInstall) -> dict[str, str]:
    """tritonserver's environment: ours, minus the admin key (tritonserver gets it on its
    command line; every Python backend stub inherits the environment, and model code has
    no business holding the key), plus the libraries and Python the stub needs."""
    env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}
    libs = [str(p) for p in install.library_dirs]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # The stub runs the first python3 on PATH: make it this interpreter's environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    # One BLAS thread per stub: onnxruntime already uses the cores for the forward pass,
    # and idle OpenBLAS threads busy-wait; with two, a VOICE request cost 21 ms of CPU
    # instead of 15 (docs/BENCHMARKS.md). An explicit setting in our environment wins.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def _request(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
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
    #: Models that failed to load -> Triton's reason (only with ``--exit-on-error=false``,
    #: as in production; otherwise such a server exits).
    failed_models: dict[str, str] = field(default_factory=dict)
    admin_key: str | None = field(default=None, repr=False)
    #: Where clients on this host reach it (loopback when it binds every interface).
    address: str = "127.0.0.1"
    #: The interface given to Triton's --http/grpc/metrics-address; None: Triton's default,
    #: every interface (0.0.0.0).
    bind_address: str | None = None
    #: What answers on ``ports.metrics``: Triton's metrics and the stubs' gradtrust_* metrics.
    exporter: MetricsExporter | None = None
    #: Whether :meth:`stop` stops the exporter too (not when ``gradtrust serve`` keeps one
    #: exporter across restarts).
    owns_exporter: bool = False
    _stub_regions: set[str] = field(default_factory=set, repr=False)

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.ports.metrics}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that unlock the restricted APIs (empty outside production)."""
        return {ADMIN_HEADER: self.admin_key} if self.admin_key else {}

    @property
    def admin_grpc_headers(self) -> dict[str, str]:
        """gRPC metadata that unlocks the restricted APIs (empty outside production)."""
        return {GRPC_ADMIN_HEADER: self.admin_key} if self.admin_key else {}

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def log_errors(self, limit: int = 20) -> str:
        """The error lines of the server log (Triton's ``E<date>`` lines and ``error:``),
        which say why a server or a model failed; the last ``limit`` of them."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        errors = [
            line[:600] for line in lines if re.match(r"E\d{4} ", line) or line.startswith("error:")
        ]
        return "\n".join(errors[-limit:])

    def _health(self, what: str) -> bool:
        try:
            status, _ = _request(f"http://{self.http_url}/v2/health/{what}")
        except OSError:
            return False
        return status == 200

    def listening(self) -> list[tuple[str, int]]:
        """The (address, port) pairs tritonserver really listens on, from ``/proc``."""
        return listening_sockets(self.process.pid)

    def metadata(self) -> dict[str, object]:
        """``GET /v2``: the server's name, version and extensions."""
        status, body = _request(f"http://{self.http_url}/v2", timeout=5)
        if status != 200:
            raise ServerError(f"GET /v2 answered HTTP {status}: {body[:200]!r}")
        return dict(json.loads(body))

    @property
    def version(self) -> str:
        """Triton's server version, e.g. ``2.51.0`` (not the container release)."""
        return str(self.metadata().get("version", ""))

    def is_ready(self) -> bool:
        return self._health("ready")

    def is_live(self) -> bool:
        return self._health("live")

    def repository_index(self) -> list[dict[str, str]]:
        """Every model in the repository with its state and, when it failed, Triton's reason."""
        status, body = _request(
            f"http://{self.http_url}/v2/repository/index",
            data=b"{}",
            headers=self.admin_headers,
            timeout=5,
        )
        if status != 200:
            raise ServerError(f"repository index answered HTTP {status}: {body[:300]!r}")
        return list(json.loads(body))

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Wait until the server answers and no model is still loading.

        Models that failed to load are listed in :attr:`failed_models`; the server counts
        as started unless every model it tried to load failed.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(
                    f"tritonserver exited with code {code} before it was ready; its errors:\n"
                    + (self.log_errors() or self.log_tail())
                )
            try:
                index = self.repository_index() if self.is_live() else None
            except OSError:  # still coming up
                index = None
            if index is not None and not any(
                m.get("state") in ("LOADING", "UNLOADING") for m in index
            ):
                self.models = sorted(m["name"] for m in index if m.get("state") == "READY")
                self.failed_models = {  # not those never asked for (explicit mode)
                    m["name"]: m.get("reason", "") or "failed to load"
                    for m in index
                    if m.get("state") == "UNAVAILABLE"
                }
                self._stub_regions |= stub_regions(self.process.pid)
                if self.failed_models and not self.models:
                    self.stop()
                    raise ServerError(
                        "no model could be loaded:\n"
                        + "\n".join(f"  {n}: {r}" for n, r in self.failed_models.items())
                    )
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(
            f"tritonserver was not ready after {timeout_s:.0f} s; its log ends:\n{self.log_tail()}"
        )

    def dead_stubs(self) -> list[int]:
        """Pids of Python backend stubs that died: their models fail every request
        (Triton 2.51 does not restart them; :mod:`gradtrust.ops.supervisor` restarts the server)."""
        dead = [p.pid for p in dead_stubs(self.process.pid)]
        if not dead:
            self._stub_regions |= stub_regions(self.process.pid)
        return dead

    def memory(self) -> dict[str, int]:
        """RSS in bytes of tritonserver and each live child (the Python backend stubs)."""
        return tree_rss(self.process.pid)

    def stop(self, drain_s: float | None = None) -> int:
        """SIGTERM: Triton stops taking requests and drains in-flight ones for up to
        ``exit_timeout_s`` (open client connections also hold it that long); SIGKILL if it
        is still alive after ``drain_s`` (default: well after that). Stubs a killed server
        leaves behind are killed and their shared memory removed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.exit_timeout_s + 15 if drain_s is None else drain_s)
            except subprocess.TimeoutExpired:
                # Triton 2.51 can also crash and hang when the exit timeout expires with
                # requests still in flight.
                self.process.kill()
                self.process.wait()
        remove_orphaned_stubs(self.process.pid, self._stub_regions)
        if self.owns_exporter and self.exporter is not None:
            self.exporter.stop()
        return int(self.process.returncode)


def start_server(
    model_repository: str | os.PathLike[str],
    ports: Ports | None = None,
    log_path: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    wait: bool = True,
    timeout_s: float = 120.0,
    exit_timeout_s: int = 30,
    admin_key: str | None = None,
    address: str | None = None,
    exporter: MetricsExporter | None = None,
) -> TritonServer:
    """Start tritonserver on ``model_repository`` and (by default) wait until it is ready.

    With ``log_path`` the server's output goes to that file (tests); without, it is
    inherited by the caller's terminal (``gradtrust serve``). With ``admin_key`` it runs
    the production configuration (:func:`production_args`). ``address`` binds every
    endpoint to that interface, e.g. ``127.0.0.1`` for loopback only. ``ports.metrics`` is
    served by ``exporter`` (:mod:`gradtrust.ops.exporter`); without one, a new exporter is
    started for this server and stopped with it.
    """
    repo = Path(model_repository).resolve()
    if not repo.is_dir():
        raise ServerError(f"model repository {repo} does not exist: pass --model-repository DIR")
    install = find_tritonserver()
    ports = ports or Ports()
    args = [*production_args(admin_key), *extra_args] if admin_key else list(extra_args)
    owns_exporter = exporter is None
    if exporter is None:
        exporter = MetricsExporter(
            ports.metrics, address or "0.0.0.0", production=admin_key is not None
        ).start()
    triton_ports = Ports(http=ports.http, grpc=ports.grpc, metrics=exporter.triton_port)
    cmd = server_command(install, repo, triton_ports, args, exit_timeout_s, address)
    log_file = Path(log_path) if log_path is not None else None
    stdout = log_file.open("wb") if log_file is not None else None
    try:
        process = subprocess.Popen(
            cmd,
            env={**server_env(install), **exporter.environment},
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            start_new_session=True,  # Ctrl-C reaches us, and we stop the server cleanly
        )
    except BaseException:
        if owns_exporter:
            exporter.stop()
        raise
    finally:
        if stdout is not None:
            stdout.close()
    server = TritonServer(
        process=process,
        ports=ports,
        model_repository=repo,
        log_path=log_file,
        exit_timeout_s=exit_timeout_s,
        admin_key=admin_key,
        address=address if address and address not in ("0.0.0.0", "::") else "127.0.0.1",
        bind_address=address,
        exporter=exporter,
        owns_exporter=owns_exporter,
    )
    if wait:
        try:
            server.wait_ready(timeout_s)
        except BaseException:
            server.stop(drain_s=5)
            raise
    return server


def probe_version(timeout_s: float = 60.0) -> str:
    """The version of the tritonserver that :func:`start_server` would run, asked from a
    throw-away instance serving an empty repository on loopback (HTTP only): nothing is
    exposed before the version is known."""
    install = find_tritonserver()
    with tempfile.TemporaryDirectory(prefix="gradtrust-probe-") as empty:
        http = free_port()
        cmd = [
            str(install.binary),
            f"--model-repository={empty}",
            f"--backend-directory={install.backend_dir}",
            "--http-address=127.0.0.1",
            f"--http-port={http}",
            "--allow-grpc=false",
            "--allow-metrics=false",
            "--exit-timeout-secs=1",
        ]
        process = subprocess.Popen(
            cmd,
            env=server_env(install),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    status, body = _request(f"http://127.0.0.1:{http}/v2", timeout=2)
                    if status == 200:
                        return str(json.loads(body)["version"])
                time.sleep(0.2)
            raise ServerError(
                f"could not read tritonserver's version from {install.binary} "
                f"(exit code {process.poll()})"
            )
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
