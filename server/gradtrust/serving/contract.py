"""The wire contract: every name a client, a config file or a prepared ONNX file shares
with the server, defined once.

Everything on the server side imports these names from here (the service, the Triton
adapter, ``gradtrust prepare`` writing config.pbtxt). The client library, which must not
depend on the server package, keeps its own copy in ``gradtrust_client/_contract.py``;
``tests/unit/test_contract.py`` checks that both agree.
"""

from __future__ import annotations

from gradtrust.core.heatmaps import METHODS as HEATMAP_METHODS

# Input tensors.
IMAGE = "IMAGE"
#: PNG/JPEG bytes, decoded and preprocessed in the server (entries made by `prepare`).
IMAGE_BYTES = "IMAGE_BYTES"

# Output tensors, as in config.pbtxt.
LABEL = "LABEL"
CLASS_ID = "CLASS_ID"
CONFIDENCE = "CONFIDENCE"
GRADTRUST = "GRADTRUST"
SCORES = "SCORES"
HEATMAP = "HEATMAP"
HEATMAP_STATS = "HEATMAP_STATS"
TRUST_PROB = "TRUST_PROB"
#: The introspective (second-stage) prediction, computed only when a request names one of
#: these and only by entries that hold :data:`INTROSPECTION_ONNX` (`gradtrust introspect`).
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

#: Every output an entry declares: (name, Triton data type, dims without the batch).
OUTPUT_SPECS: tuple[tuple[str, str, str], ...] = (
    (LABEL, "TYPE_STRING", "[ 1 ]"),
    (CLASS_ID, "TYPE_INT64", "[ 1 ]"),
    (CONFIDENCE, "TYPE_FP32", "[ 1 ]"),
    (GRADTRUST, "TYPE_FP32", "[ 1 ]"),
    (SCORES, "TYPE_FP32", "[ -1 ]"),
    (HEATMAP, "TYPE_FP32", "[ -1, -1 ]"),
    (HEATMAP_STATS, "TYPE_FP32", "[ 2 ]"),
    (TRUST_PROB, "TYPE_FP32", "[ 1 ]"),
    (INTROSPECTIVE_CLASS_ID, "TYPE_INT64", "[ 1 ]"),
    (INTROSPECTIVE_LABEL, "TYPE_STRING", "[ 1 ]"),
    (INTROSPECTIVE_CONFIDENCE, "TYPE_FP32", "[ 1 ]"),
    (INTROSPECTIVE_AGREES, "TYPE_BOOL", "[ 1 ]"),
)
OUTPUTS: tuple[str, ...] = tuple(name for name, _, _ in OUTPUT_SPECS)

#: What a request that names no outputs gets, besides SCORES and HEATMAP (its parameters
#: decide those); TRUST_PROB only from a calibrated model.
DEFAULT_OUTPUTS: tuple[str, ...] = (LABEL, CLASS_ID, CONFIDENCE, GRADTRUST, TRUST_PROB)

# Request parameters (HTTP/gRPC ``parameters``).
PARAM_SCORES = "scores"
PARAM_CONTRAST_K = "contrast_k"
PARAM_HEATMAP_METHOD = "heatmap_method"
PARAM_CONTRAST_CLASS = "contrast_class"
#: Where the HEATMAP is drawn: at the input's resolution (default) or at the activation's
#: own (h, w), a few dozen values that the client can upsample itself.
PARAM_HEATMAP_SIZE = "heatmap_size"
REQUEST_PARAMETERS: tuple[str, ...] = (
    PARAM_SCORES,
    PARAM_CONTRAST_K,
    PARAM_HEATMAP_METHOD,
    PARAM_CONTRAST_CLASS,
    PARAM_HEATMAP_SIZE,
)
DEFAULT_HEATMAP_METHOD = "gradcam"
HEATMAP_SIZE_INPUT = "input"
HEATMAP_SIZE_ACTIVATION = "activation"

# The introspective network of an entry (written by `gradtrust introspect`, run by
# gradtrust.serving.introspector): a file in the version folder beside the classifier,
# inputs the two unit factors of the introspective feature, output its logits.
INTROSPECTION_ONNX = "introspection.onnx"
INTROSPECTION_GRADIENT = "gradient_unit"
INTROSPECTION_FEATURES = "features_unit"
INTROSPECTION_LOGITS = "introspective_logits"
HEATMAP_SIZES: tuple[str, ...] = (HEATMAP_SIZE_INPUT, HEATMAP_SIZE_ACTIVATION)

# Outputs of a prepared ONNX file (written by `gradtrust prepare`, read by the classifier).
LOGITS = "logits"
FEATURES = "features"
ACTIVATION = "activation"

# The introspective network of an entry (written by `gradtrust introspect`, run by
# gradtrust.serving.introspector): a file in the version folder beside the classifier,
# inputs the two unit factors of the introspective feature, output its logits.
INTROSPECTION_ONNX = "introspection.onnx"
INTROSPECTION_GRADIENT = "gradient_unit"
INTROSPECTION_FEATURES = "features_unit"
INTROSPECTION_LOGITS = "introspective_logits"

__all__ = [
    "ACTIVATION",
    "CLASS_ID",
    "CONFIDENCE",
    "DEFAULT_HEATMAP_METHOD",
    "DEFAULT_OUTPUTS",
    "FEATURES",
    "GRADTRUST",
    "HEATMAP",
    "HEATMAP_METHODS",
    "HEATMAP_SIZES",
    "HEATMAP_SIZE_ACTIVATION",
    "HEATMAP_SIZE_INPUT",
    "HEATMAP_STATS",
    "IMAGE",
    "IMAGE_BYTES",
    "INTROSPECTION_FEATURES",
    "INTROSPECTION_GRADIENT",
    "INTROSPECTION_LOGITS",
    "INTROSPECTION_ONNX",
    "INTROSPECTIVE_AGREES",
    "INTROSPECTIVE_CLASS_ID",
    "INTROSPECTIVE_CONFIDENCE",
    "INTROSPECTIVE_LABEL",
    "INTROSPECTIVE_OUTPUTS",
    "LABEL",
    "LOGITS",
    "OUTPUTS",
    "OUTPUT_SPECS",
    "PARAM_CONTRAST_CLASS",
    "PARAM_CONTRAST_K",
    "PARAM_HEATMAP_METHOD",
    "PARAM_HEATMAP_SIZE",
    "PARAM_SCORES",
    "REQUEST_PARAMETERS",
    "SCORES",
    "TRUST_PROB",
]
