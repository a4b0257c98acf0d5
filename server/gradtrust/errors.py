"""One exception hierarchy for the server package.

Every message says what was wrong *and* what to do, because it ends up in a
Triton error response read by someone who did not write this code.
"""


class GradTrustError(Exception):
    """Base class of every error raised by :mod:`gradtrust`."""


class InvalidInputError(GradTrustError, ValueError):
    """A request (images, logits or parameters) cannot be scored as sent."""


class ConfigError(GradTrustError, ValueError):
    """A model configuration or model file cannot be served."""


class ServerError(GradTrustError, RuntimeError):
    """The local tritonserver could not be started or did not become ready."""
