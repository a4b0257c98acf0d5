"""GradTrust Serve: a trust score next to every prediction of a Triton-served classifier.

The numeric core is importable without Triton or torch::

    from gradtrust import gradtrust, compute_scores, explain
"""

from importlib.metadata import PackageNotFoundError, version

from gradtrust.core.heatmaps import explain
from gradtrust.core.scores import (
    SCORE_NAMES,
    compute_scores,
    contrast_trust,
    energy,
    entropy,
    gradnorm,
    gradtrust,
    gradtrust_released,
    margin,
    max_logit,
    msp,
    softmax,
)
from gradtrust.errors import ConfigError, GradTrustError, InvalidInputError, ServerError

try:
    __version__ = version("gradtrust-serve")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "SCORE_NAMES",
    "ConfigError",
    "GradTrustError",
    "InvalidInputError",
    "ServerError",
    "__version__",
    "compute_scores",
    "contrast_trust",
    "energy",
    "entropy",
    "explain",
    "gradnorm",
    "gradtrust",
    "gradtrust_released",
    "margin",
    "max_logit",
    "msp",
    "softmax",
]
