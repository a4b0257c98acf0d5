"""Prove numerically, with onnxruntime, that the rewritten graph is the same classifier.

Finding the head is pattern matching; this check is what makes it safe. On a random batch,
the original model's output must equal the exposed logits passed through the tail that was
pruned (Softmax, LogSoftmax or nothing), and the exposed activation, averaged over its
spatial grid, must equal the exposed features (the premise of the closed-form heatmaps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from gradtrust.errors import ConfigError
from gradtrust.serving.contract import ACTIVATION, FEATURES, LOGITS
from gradtrust.tools.prepare.graph import Head

#: Rows of the random probe batch.
PROBE_BATCH = 3


def session(model: onnx.ModelProto, what: str) -> Any:
    """An onnxruntime CPU session, or a :class:`ConfigError` saying why it cannot be made."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise ConfigError(
            f"onnxruntime cannot load {what}: {err}. The server runs models with onnxruntime: "
            "re-export with operators and an opset it supports (opset 17 is safe)"
        ) from None


def _run(sess: Any, outputs: Sequence[str], x: np.ndarray, per_sample: bool) -> list[np.ndarray]:
    name = sess.get_inputs()[0].name
    try:
        if not per_sample:
            return list(sess.run(list(outputs), {name: x}))
        rows = [sess.run(list(outputs), {name: x[i : i + 1]}) for i in range(len(x))]
        return [np.concatenate([r[j] for r in rows]) for j in range(len(outputs))]
    except Exception as err:  # onnxruntime's errors are untyped
        raise ConfigError(
            f"the model fails on a probe batch of shape {list(x.shape)}: {err}. Check "
            "--input-size and --layout, and that the model runs in onnxruntime"
        ) from None


def _tail(logits: np.ndarray, tail: Sequence[str]) -> np.ndarray:
    """What the pruned tail (output side first) computes from the logits."""
    out = logits.astype(np.float64)  # the other tail ops keep (N, C) values as they are
    for op in reversed(tail):
        if op in ("Softmax", "LogSoftmax"):
            shifted = out - out.max(axis=1, keepdims=True)
            log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            out = np.exp(log_p) if op == "Softmax" else log_p
    return out


def _close(got: np.ndarray, want: np.ndarray, dtype: np.dtype) -> bool:
    tol = max(1e-4, 100 * float(np.finfo(dtype).eps))
    got, want = got.astype(np.float64), want.astype(np.float64)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=tol, atol=tol * scale))


def probe_batch(sample_shape: Sequence[int], dtype: str, batch: int = PROBE_BATCH) -> np.ndarray:
    """A fixed random batch in [0, 1) (the usual pixel range, also fine for normalised input)."""
    rng = np.random.default_rng(20240605)
    return rng.random((batch, *sample_shape)).astype(dtype)


def verify(
    original: onnx.ModelProto,
    original_output: str,
    rewritten: onnx.ModelProto,
    head: Head,
    probe: np.ndarray,
    original_per_sample: bool,
    rewritten_per_sample: bool,
) -> bool:
    """Raise :class:`ConfigError` unless the rewritten logits reproduce the original output.

    Returns whether the exposed activation (if any) really pools into the features; when
    it does not, the caller must not serve closed-form heatmaps from it.
    """
    (want,) = _run(session(original, "the model"), [original_output], probe, original_per_sample)
    names = [o.name for o in rewritten.graph.output]
    got = dict(
        zip(
            names,
            _run(session(rewritten, "the rewritten model"), names, probe, rewritten_per_sample),
            strict=True,
        )
    )
    logits, features = got[LOGITS], got[FEATURES]
    classes, width = head.weight.shape
    if logits.shape != (len(probe), classes) or features.shape != (len(probe), width):
        raise ConfigError(
            f"the exposed logits {logits.shape} and features {features.shape} do not have the "
            f"expected shapes ({len(probe)}, {classes}) and ({len(probe)}, {width}): the model "
            "does not look like a (batch, features) -> (batch, classes) classifier"
        )
    if not _close(_tail(logits, head.tail), want, logits.dtype):
        raise ConfigError(
            f"the model's output {original_output!r} is not a function of the final linear "
            "layer alone (the rewritten logits do not reproduce it on a probe batch): "
            "something after the last linear layer changes the scores. Export the model so "
            "that it ends in its last linear layer, optionally followed by Softmax"
        )
    if ACTIVATION not in got:
        return False
    activation = got[ACTIVATION]
    return (
        activation.ndim == 4
        and activation.shape[1] == width
        and _close(activation.astype(np.float64).mean(axis=(2, 3)), features, features.dtype)
    )
