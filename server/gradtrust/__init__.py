"""GradTrust Serve: a trust score next to every prediction of a Triton-served classifier."""

from importlib.metadata import PackageNotFoundError, version

from gradtrust.errors import ConfigError, GradTrustError, InvalidInputError, ServerError

try:
    __version__ = version("gradtrust-serve")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["ConfigError", "GradTrustError", "InvalidInputError", "ServerError", "__version__"]
