"""The client's copy of the wire names (the server's are in ``gradtrust.serving.contract``).

The client must install without the server's dependencies, so it cannot import them;
``tests/unit/test_contract.py`` fails when the two copies disagree.
"""

from __future__ import annotations

IMAGE = "IMAGE"
IMAGE_BYTES = "IMAGE_BYTES"

LABEL = "LABEL"
CLASS_ID = "CLASS_ID"
CONFIDENCE = "CONFIDENCE"
GRADTRUST = "GRADTRUST"
SCORES = "SCORES"
HEATMAP = "HEATMAP"
HEATMAP_STATS = "HEATMAP_STATS"
TRUST_PROB = "TRUST_PROB"
INTROSPECTIVE_CLASS_ID = "INTROSPECTIVE_CLASS_ID"
INTROSPECTIVE_LABEL = "INTROSPECTIVE_LABEL"
INTROSPECTIVE_CONFIDENCE = "INTROSPECTIVE_CONFIDENCE"
INTROSPECTIVE_AGREES = "INTROSPECTIVE_AGREES"
INTROSPECTIVE_OUTPUTS: tuple[str, ...] = (
    INTROSPECTIVE_CLASS_ID,
    INTROSPECTIVE_LABEL,
    INTROSPECTIVE_CONFIDENCE,
    INTROSPECTIVE_AGREES,
)

PARAM_SCORES = "scores"
PARAM_CONTRAST_K = "contrast_k"
PARAM_HEATMAP_METHOD = "heatmap_method"
PARAM_CONTRAST_CLASS = "contrast_class"
PARAM_HEATMAP_SIZE = "heatmap_size"

HEATMAP_METHODS: tuple[str, ...] = ("gradcam", "counterfactual", "contrast", "voice")
HEATMAP_SIZE_INPUT = "input"
HEATMAP_SIZE_ACTIVATION = "activation"
HEATMAP_SIZES: tuple[str, ...] = (HEATMAP_SIZE_INPUT, HEATMAP_SIZE_ACTIVATION)
