"""Client for GradTrust Serve: predictions with trust scores from a Triton server.

Needs only numpy, tritonclient and pillow (the ``client`` extra)::

    from gradtrust_client import TrustClient, load_images

    with TrustClient("localhost:8000") as client:
        for p in client.predict(load_images(["digit.png"]), scores=True):
            print(p.label, p.confidence, p.gradtrust, p.scores)
"""

from gradtrust_client.client import (
    DEFAULT_MODEL,
    METHODS,
    Explanation,
    Introspection,
    ModelInfo,
    Prediction,
    TrustClient,
)
from gradtrust_client.errors import (
    InvalidImageError,
    InvalidRequestError,
    ModelNotReadyError,
    ServerUnavailableError,
    TrustClientError,
)
from gradtrust_client.images import (
    QUESTIONS,
    as_model_batch,
    load_images,
    load_images_with_names,
    overlay_png,
    question_for,
    upsample_heatmap,
)
from gradtrust_client.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_RETRY",
    "METHODS",
    "NO_RETRY",
    "QUESTIONS",
    "Explanation",
    "InvalidImageError",
    "Introspection",
    "InvalidRequestError",
    "ModelInfo",
    "ModelNotReadyError",
    "Prediction",
    "RetryPolicy",
    "ServerUnavailableError",
    "TrustClient",
    "TrustClientError",
    "as_model_batch",
    "load_images",
    "load_images_with_names",
    "overlay_png",
    "question_for",
    "upsample_heatmap",
]
