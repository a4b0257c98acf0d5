"""One interface over tritonclient's HTTP and gRPC clients, with errors translated.

The two tritonclient flavours differ in what they return (dicts vs protobuf, int64 as
numbers vs strings), how they time out and how they fail (OSError vs
InferenceServerException). Everything above this module sees plain dicts and the
client's own exceptions.
"""

from __future__ import annotations

import contextlib
import http.client
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException

from gradtrust_client.errors import (
    InvalidRequestError,
    ModelNotReadyError,
    ServerUnavailableError,
    TrustClientError,
)

PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}

_INVALID = {"400", "StatusCode.INVALID_ARGUMENT"}
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "503"}
_TIMEOUT = {"StatusCode.DEADLINE_EXCEEDED", "504"}
_NOT_FOUND = {"404", "StatusCode.NOT_FOUND"}
_MODEL_MISSING_HINTS = ("unknown model", "no available versions")
# Triton's Python backend, once a model's stub process has died (INTERNAL / 500).
_STUB_DEAD_HINT = "is not healthy"
# gRPC channel options: tritonclient's defaults (unlimited message size, its keepalive
# settings) plus quick reconnection, so a restarted server is found again within about a
# second instead of gRPC's default backoff of up to two minutes.
_GRPC_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 2**31 - 1),
    ("grpc.keepalive_timeout_ms", 20000),
    ("grpc.keepalive_permit_without_calls", False),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

ParamValue = str | int | float | bool

#: HTTP responses uncompressed, said explicitly (:class:`Transport`'s default). Why: a
#: heatmap is float32 noise to gzip (a 224 x 224 map shrinks by about 12 %), yet
#: tritonserver spends about 5 ms of CPU compressing one, more than computing it
#: (docs/BENCHMARKS.md); on a loopback or LAN link the bytes saved never pay for that.
#: tritonclient's synchronous client sends no Accept-Encoding, but a proxy or another HTTP
#: stack in between may add one: saying ``identity`` keeps the response uncompressed.
IDENTITY = {"Accept-Encoding": "identity"}


def start_hint(url: str) -> str:
    """The advice every connection error carries: what to start, or what to fix."""
    return (
        f"start the server with `gradtrust serve` (or `make serve` in the project), "
        f"or point the client at the right address (url=..., --url) instead of {url}"
    )


class Transport:
    """A tritonclient connection for one protocol and URL.

    ``compress_responses`` (HTTP only): ask tritonserver to gzip the response. Off by
    default (:data:`IDENTITY`); worth turning on only over a slow link, where the bytes
    of full-size heatmaps cost more than the server's CPU.
    """

    def __init__(
        self, url: str, protocol: str, timeout_s: float, compress_responses: bool = False
    ) -> None:
        if protocol not in PROTOCOLS:
            raise InvalidRequestError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        if not timeout_s > 0:
            raise InvalidRequestError(f"timeout_s must be positive, got {timeout_s}")
        for scheme in ("http://", "grpc://"):
            if url.startswith(scheme):
                url = url[len(scheme) :]
        self.url = url
        self.protocol = protocol
        self.timeout_s = float(timeout_s)
        self._grpc_timeout: dict[str, float] = {}
        self.compress_responses = bool(compress_responses)
        self._client: Any
        self._module: Any
        with self.translated():
            if protocol == "http":
                import tritonclient.http as httpclient

                self._module = httpclient
                self._client = httpclient.InferenceServerClient(
                    url=url, connection_timeout=timeout_s, network_timeout=timeout_s
                )
            else:
                import tritonclient.grpc as grpcclient

                self._module = grpcclient
                self._client = grpcclient.InferenceServerClient(
                    url=url, channel_args=_GRPC_CHANNEL_ARGS
                )
                self._grpc_timeout = {"client_timeout": self.timeout_s}

    @property
    def location(self) -> str:
        return f"{self.protocol}://{self.url}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    def server_live(self) -> bool:
        with self.translated():
            return bool(self._client.is_server_live(**self._grpc_timeout))

    def model_ready(self, model: str) -> bool:
        with self.translated(model):
            return bool(self._client.is_model_ready(model, **self._grpc_timeout))

    def model_config(self, model: str) -> dict[str, Any]:
        """The model's config as a dict, the same shape for both protocols."""
        with self.translated(model):
            if self.protocol == "http":
                config = self._client.get_model_config(model)
            else:
                config = self._client.get_model_config(model, as_json=True, **self._grpc_timeout)
                config = config.get("config", config)
        return dict(config)

    def infer(
        self,
        model: str,
        input_name: str,
        batch: np.ndarray,
        outputs: Sequence[str],
        parameters: Mapping[str, ParamValue],
    ) -> dict[str, np.ndarray]:
        """Send one batch; return the requested outputs as numpy arrays."""
        if batch.dtype == np.object_:  # encoded files for a BYTES input
            tensor = self._module.InferInput(input_name, list(batch.shape), "BYTES")
            tensor.set_data_from_numpy(batch)
        else:
            tensor = self._module.InferInput(input_name, list(batch.shape), "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        requested = [self._module.InferRequestedOutput(name) for name in outputs]
        with self.translated(model):
            result = self._client.infer(
                model,
                [tensor],
                outputs=requested,
                parameters=dict(parameters) or None,
                **self._grpc_timeout,
                **self.http_options(),
            )
            arrays = {name: result.as_numpy(name) for name in outputs}
        missing = [name for name, value in arrays.items() if value is None]
        if missing:
            raise TrustClientError(
                f"model {model!r} at {self.location} did not return output(s) {missing}; "
                "is it a GradTrust model?"
            )
        return arrays

    def http_options(self) -> dict[str, Any]:
        """The compression arguments of an HTTP infer call (none over gRPC). A fresh dict
        each call: tritonclient adds its own entries to the headers it is given."""
        if self.protocol != "http":
            return {}
        if self.compress_responses:
            return {"response_compression_algorithm": "gzip"}
        return {"headers": dict(IDENTITY)}

    @contextlib.contextmanager
    def translated(self, model: str | None = None) -> Iterator[None]:
        """Re-raise tritonclient and socket errors as the client's own exceptions."""
        try:
            yield
        except InferenceServerException as exc:
            raise self._from_triton(exc, model) from None
        except TimeoutError:
            raise self._timed_out() from None
        except (OSError, http.client.HTTPException) as exc:
            # HTTPException: the server closed the connection (it is shutting down).
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise ServerUnavailableError(
                f"cannot reach a Triton server at {self.location} ({reason}): "
                + start_hint(self.url)
            ) from None

    def _timed_out(self) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"the Triton server at {self.location} did not answer within {self.timeout_s:g} s: "
            "raise timeout_s (--timeout) for large batches, or check that the server is healthy",
            timed_out=True,
        )

    def _from_triton(self, exc: InferenceServerException, model: str | None) -> TrustClientError:
        status = str(exc.status() or "")
        message = str(exc.message() or exc)
        lowered = message.lower()
        if status in _UNAVAILABLE:
            return ServerUnavailableError(
                f"cannot reach a Triton server at {self.location} ({message}): "
                + start_hint(self.url)
            )
        if status in _TIMEOUT:
            return self._timed_out()
        if _STUB_DEAD_HINT in lowered and "stub process" in lowered:
            return ServerUnavailableError(
                f"the backend process of model {model!r} on {self.location} has died "
                f"({message}); the server cannot answer for it until it restarts "
                "(`gradtrust serve` restarts it by itself): retry in a few seconds"
            )
        if model is not None and (
            status in _NOT_FOUND
            or (status in _INVALID and any(hint in lowered for hint in _MODEL_MISSING_HINTS))
        ):
            return ModelNotReadyError(
                f"model {model!r} is not ready on {self.location}: {message}. Check the model "
                "name (--model), and the server log for a model that failed to load"
            )
        if status in _INVALID:
            return InvalidRequestError(message)
        where = f" [{status}]" if status else ""
        return TrustClientError(f"request to {self.location} failed{where}: {message}")
