"""The client's exception hierarchy.

Callers catch :class:`TrustClientError` for everything, or one subclass to react to one
cause: fix the request (:class:`InvalidRequestError`), retry later or start the server
(:class:`ServerUnavailableError`), wait for or fix the model (:class:`ModelNotReadyError`).
tritonclient's own exceptions never escape :class:`gradtrust_client.TrustClient`.
"""


class TrustClientError(Exception):
    """Base class of every error raised by :mod:`gradtrust_client`."""


class InvalidRequestError(TrustClientError, ValueError):
    """The request cannot be served as sent.

    Raised when the server rejects a request (HTTP 400, gRPC INVALID_ARGUMENT; the
    message is the server's own) or when the client can tell before sending it
    (wrong image shape, unknown explanation method).
    """


class InvalidImageError(InvalidRequestError):
    """An image file or array cannot be read or does not fit the model's input."""


class ServerUnavailableError(TrustClientError, ConnectionError):
    """No Triton server answered at the URL (connection refused, unknown host, timeout),
    or the model's backend process on it has died and is being restarted.

    ``timed_out`` is True when the server took longer than the client's timeout: the
    request may still be running there, so :mod:`gradtrust_client.retry` does not repeat it
    unless asked to.
    """

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ModelNotReadyError(TrustClientError):
    """The server answers but the model is unknown to it, still loading, or failed to load."""
